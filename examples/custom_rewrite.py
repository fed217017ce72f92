"""Register custom rewrites and watch kernelize apply one and reject another.

Run: .venv/bin/python examples/custom_rewrite.py

The model spells GELU out by hand (0.5 * x * (1 + erf(x / sqrt 2))), which the built-in
feed-forward pattern does not take. The exact rewrite ``erf_gelu`` turns it into the
standard Gelu op, after which the built-in pattern fuses the whole feed-forward block.
The second rewrite claims to be exact but swaps in the tanh approximation; kernelize
measures the change and rejects it.
"""

import math

import torch

import kernelize

SQRT_HALF = 1.0 / math.sqrt(2.0)


def erf_gelu_pattern(op, x):
    return op.Mul(op.Mul(x, 0.5), op.Add(op.Erf(op.Mul(x, SQRT_HALF)), 1.0))


def gelu(op, x):
    return op.Gelu(x, approximate="none")


def exact_gelu_pattern(op, x):
    return op.Gelu(x, approximate="none")


def tanh_gelu(op, x):
    return op.Gelu(x, approximate="tanh")


class HandWrittenFFN(torch.nn.Module):
    def __init__(self, width=64, inner=256):
        super().__init__()
        self.up, self.down = torch.nn.Linear(width, inner), torch.nn.Linear(inner, width)

    def forward(self, x):
        h = self.up(x)
        return self.down(h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0))))


def main():
    kernelize.register_rewrite(kernelize.Rewrite("erf_gelu", erf_gelu_pattern, gelu, exact=True))
    kernelize.register_rewrite(kernelize.Rewrite("tanh_gelu_claimed_exact", exact_gelu_pattern, tanh_gelu,
                                                 exact=True))
    torch.manual_seed(0)
    result = kernelize.optimize(HandWrittenFFN(), (torch.randn(2, 9, 64) * 3,), measure_latency=False)
    for entry in result.report["custom_rewrites"]:
        print(f"{entry['name']}: {entry['status']} - {entry['detail']}")
    print("sites:", [(s["id"], s["rewrite"]) for s in result.report["sites"]])


if __name__ == "__main__":
    main()
