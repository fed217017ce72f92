"""The TVM backend: target presets, each operator's TVM lowering against its NumPy reference,
all-MiniLM-L6-v2 through TVM against ONNX Runtime, CUDA and arm64 builds, the schedules and
MetaSchedule tuning with a persistent database.

Operator cases build a one-node model with ``Operator.make_node`` (as ``tests/test_ops.py``
does) and compile it with ``kernelize.backends.tvm.build`` for this machine's CPU.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from kernelize import ops
from kernelize.backends import targets
from kernelize.backends import tvm as tvm_backend
from kernelize.backends.tvm import registry
from kernelize.deploy import runner as runner_mod
from kernelize.errors import KernelizeError, UsageError
from kernelize.ops.base import add_initializer

pytest.importorskip("tvm")

RTOL = 1e-5
SHAPES = [(1, 7), (2, 13)]  # (batch, sequence): batch 1 and > 1, odd lengths
HEADS, HEAD_SIZE = 4, 8
HIDDEN = HEADS * HEAD_SIZE
INNER = 64
ELF_AARCH64 = 183


# -- helpers ------------------------------------------------------------------------------
from test_ops import COVERED, build, normal, rng_for  # noqa: E402  (the one-node models of the ORT tests)


def one_node_model(op: ops.Operator, args: list[tuple[str, np.ndarray | None]], attrs: dict,
                   consts: set[str] = frozenset()):
    """One node of ``op`` in a fresh model (see test_ops.build). Returns (model, feeds)."""
    model, feeds, _ = build(op, args, attrs, consts)
    return model, feeds


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = RTOL, what: str = ""):
    """|actual - expected| <= rtol * max(1, max |expected|), same shape, finite."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    scale = max(1.0, float(np.max(np.abs(expected))))
    err = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
    assert err <= rtol * scale, f"{what}: max abs error {err:.3g} > {rtol:g} * {scale:.3g}"


def check_lowering(op, args, attrs, consts=frozenset()):
    """Compile the one-node model with TVM (cpu) and compare every output with the reference."""
    model, feeds = one_node_model(op, args, attrs, consts)
    built = tvm_backend.build(model, "cpu")
    actual = built.run(feeds)
    expected = op.reference(*[a for _, a in args], **attrs)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    assert len(actual) == len(expected) == len(op.outputs)
    for name, a, e in zip(op.outputs, actual, expected):
        assert_close(a, e, what=f"{op.name} TVM output {name}")
    return built




def test_every_operator_has_a_tvm_lowering():
    """One registered lowering per operator, in ``backends/tvm/lower/`` under the name of the
    operator's own module in ``kernelize/ops``; none for an operator that does not exist."""
    assert set(ops.registered()) == set(COVERED), "list new operators (and their test file) in test_ops.COVERED"
    lowerings = registry.registered()
    assert set(lowerings) == set(ops.registered()), "register a TVM lowering for every operator (and only those)"
    for name, lower in lowerings.items():
        op_module = type(ops.get(name)).__module__.rsplit(".", 1)[-1]
        assert callable(lower) and lower.__module__ == f"kernelize.backends.tvm.lower.{op_module}", \
            f"{name}'s lowering lives in {lower.__module__}"
    assert registry.lookup("NoSuchOperator") is None


def test_operator_without_a_lowering_is_refused(monkeypatch):
    op = ops.get("RMSNorm")
    model, _ = one_node_model(op, [("input", np.ones((1, 3, 8), np.float32)),
                                   ("weight", np.ones(8, np.float32))], {"epsilon": 1e-6})
    registry.registered()  # load the lowerings before one is taken away
    monkeypatch.delitem(registry._LOWERINGS, "RMSNorm")
    with pytest.raises(KernelizeError, match="kernelize operator RMSNorm has no TVM lowering"):
        tvm_backend.build(model, "cpu")


def test_importing_the_backend_does_not_import_tvm():
    code = ("import sys; import kernelize.backends.tvm as b; b.build, b.to_relax, b.Built; "
            "assert 'tvm' not in sys.modules, 'tvm imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


# -- targets -------------------------------------------------------------------------------
def test_cpu_preset_detects_the_host():
    preset = targets.resolve("cpu")
    assert preset.kind == "cpu" and preset.runs_here and preset.linker is None
    assert preset.config["kind"] == "llvm" and preset.config.get("mcpu")  # the ISA, not generic x86-64
    assert preset.target().kind.name == "llvm"


def test_cuda_and_arm64_presets():
    assert targets.resolve("cuda").config["arch"] == "sm_80"
    assert targets.resolve("cuda:sm_90").config["arch"] == "sm_90"
    arm = targets.resolve("arm64")
    assert arm.config["mtriple"] == "aarch64-linux-gnu" and "+neon" in arm.config["mattr"]
    assert arm.linker == "aarch64-linux-gnu-gcc" and not arm.runs_here


def test_raw_json_target():
    preset = targets.resolve('{"kind": "llvm", "mcpu": "skylake-avx512"}')
    assert preset.kind == "cpu" and preset.target().attrs["mcpu"] == "skylake-avx512"


@pytest.mark.parametrize("name", ["tpu", "cuda:sm_75", "", '{"kind": "no-such-kind"}', "{not json"])
def test_unknown_target_is_a_usage_error(name):
    with pytest.raises(UsageError) as info:
        targets.resolve(name)
    message = str(info.value)
    assert "\n" not in message
    if name in ("tpu", ""):
        assert "cpu" in message and "cuda" in message and "arm64" in message


def test_build_with_unknown_target_is_a_usage_error():
    op = ops.get("RMSNorm")
    model, _ = one_node_model(op, [("input", np.ones((1, 3, 8), np.float32)),
                                   ("weight", np.ones(8, np.float32))], {"epsilon": 1e-6})
    with pytest.raises(UsageError):
        tvm_backend.build(model, "tpu")


def test_missing_cross_linker_names_the_package(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(KernelizeError, match="apt-get install gcc-aarch64-linux-gnu"):
        targets.linker(targets.resolve("arm64"))
    assert targets.linker(targets.resolve("cpu")) is None


# -- Attention -----------------------------------------------------------------------------
def attention_bias(kind: str, rng, batch: int, seq_q: int, seq_k: int) -> np.ndarray | None:
    if kind == "none":
        return None
    if kind == "padding":  # [B, 1, 1, Sk]: drop the tail of the last row
        mask = np.zeros((batch, 1, 1, seq_k), np.float32)
        mask[-1, ..., seq_k - seq_k // 3:] = -1e9
        return mask
    if kind == "padding_inf":
        mask = np.zeros((batch, 1, 1, seq_k), np.float32)
        mask[-1, ..., seq_k - seq_k // 3:] = -np.inf
        return mask
    if kind == "causal":
        return np.triu(np.full((seq_q, seq_k), -1e9, np.float32), 1)[None, None]
    if kind == "full":
        return normal(rng, batch, HEADS, seq_q, seq_k)
    raise ValueError(kind)


@pytest.mark.parametrize("batch,seq_q,seq_k", [(1, 7, 7), (2, 13, 13), (2, 7, 13)])
@pytest.mark.parametrize("bias", ["none", "padding_inf", "full"])
def test_attention(batch, seq_q, seq_k, bias):
    op = ops.get("Attention")
    rng = rng_for("tvm-attention", batch, seq_q, seq_k, bias)
    args = [("query", normal(rng, batch, HEADS, seq_q, HEAD_SIZE)),
            ("key", normal(rng, batch, HEADS, seq_k, HEAD_SIZE)),
            ("value", normal(rng, batch, HEADS, seq_k, HEAD_SIZE)),
            ("bias", attention_bias(bias, rng, batch, seq_q, seq_k))]
    check_lowering(op, args, {"scale": HEAD_SIZE ** -0.5})


# -- MultiHeadAttention --------------------------------------------------------------------
def mha_args(rng, batch, seq_q, seq_k, bias, self_attention: bool):
    w = lambda: normal(rng, HIDDEN, HIDDEN, scale=HIDDEN ** -0.5)  # noqa: E731
    b = lambda: normal(rng, HIDDEN, scale=0.1)  # noqa: E731
    if self_attention:
        x = normal(rng, batch, seq_q, HIDDEN)
        inputs = [("x", x), ("x", x), ("x", x)]
    else:
        kv = normal(rng, batch, seq_k, HIDDEN)
        inputs = [("xq", normal(rng, batch, seq_q, HIDDEN)), ("xkv", kv), ("xkv", kv)]
    params = [("wq", w()), ("bq", b()), ("wk", w()), ("bk", b()), ("wv", w()), ("bv", b())]
    return inputs + params + [("bias", attention_bias(bias, rng, batch, seq_q, seq_k))]


MHA_PARAMS = {"wq", "bq", "wk", "bk", "wv", "bv"}


@pytest.mark.parametrize("batch,seq_q,seq_k,bias,consts", [
    (1, 7, 7, "padding", True), (2, 13, 13, "causal", True), (2, 13, 13, "full", False),
    (2, 7, 13, "padding", True), (1, 7, 7, "none", False)])
def test_multi_head_attention(batch, seq_q, seq_k, bias, consts):
    op = ops.get("MultiHeadAttention")
    rng = rng_for("tvm-mha", batch, seq_q, seq_k, bias)
    args = mha_args(rng, batch, seq_q, seq_k, bias, self_attention=seq_q == seq_k)
    check_lowering(op, args, {"num_heads": HEADS, "scale": HEAD_SIZE ** -0.5},
                   consts=MHA_PARAMS if consts else set())


# -- SkipLayerNorm, RMSNorm ------------------------------------------------------------------
@pytest.mark.parametrize("batch,seq", SHAPES)
@pytest.mark.parametrize("with_beta", [True, False], ids=["beta", "no-beta"])
def test_skip_layer_norm(batch, seq, with_beta):
    op = ops.get("SkipLayerNorm")
    rng = rng_for("tvm-sln", batch, seq, with_beta)
    args = [("input", normal(rng, batch, seq, HIDDEN)), ("skip", normal(rng, batch, seq, HIDDEN)),
            ("gamma", normal(rng, HIDDEN, scale=0.5) + 1.0),
            ("beta", normal(rng, HIDDEN, scale=0.5) if with_beta else None)]
    check_lowering(op, args, {"epsilon": 1e-12 if with_beta else 1e-5}, consts={"gamma", "beta"})


def test_skip_layer_norm_broadcast_skip():
    op = ops.get("SkipLayerNorm")
    rng = rng_for("tvm-sln-broadcast")
    args = [("input", normal(rng, 2, 7, HIDDEN)), ("skip", normal(rng, 1, 7, HIDDEN)),
            ("gamma", normal(rng, HIDDEN) + 1.0), ("beta", normal(rng, HIDDEN))]
    check_lowering(op, args, {"epsilon": 1e-5})


@pytest.mark.parametrize("batch,seq", SHAPES)
@pytest.mark.parametrize("epsilon", [1e-6, 0.5])
def test_rms_norm(batch, seq, epsilon):
    op = ops.get("RMSNorm")
    rng = rng_for("tvm-rms", batch, seq, epsilon)
    args = [("input", normal(rng, batch, seq, HIDDEN, scale=3.0)), ("weight", normal(rng, HIDDEN) + 1.0)]
    check_lowering(op, args, {"epsilon": epsilon}, consts={"weight"})


# -- FeedForward, GatedFeedForward -----------------------------------------------------------
@pytest.mark.parametrize("batch,seq", SHAPES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_feed_forward(batch, seq, activation):
    op = ops.get("FeedForward")
    rng = rng_for("tvm-ffn", batch, seq, activation)
    args = [("input", normal(rng, batch, seq, HIDDEN)),
            ("w1", normal(rng, HIDDEN, INNER, scale=HIDDEN ** -0.5)), ("b1", normal(rng, INNER, scale=0.5)),
            ("w2", normal(rng, INNER, HIDDEN, scale=INNER ** -0.5)), ("b2", normal(rng, HIDDEN, scale=0.5))]
    built = check_lowering(op, args, {"activation": activation}, consts={"w1", "b1", "w2", "b2"})
    assert list(built.schedules.values()).count("MatmulCPU") == 2, built.schedules


@pytest.mark.parametrize("batch,seq", SHAPES)
def test_gated_feed_forward(batch, seq):
    op = ops.get("GatedFeedForward")
    rng = rng_for("tvm-swiglu", batch, seq)
    args = [("input", normal(rng, batch, seq, HIDDEN)),
            ("w_gate", normal(rng, HIDDEN, INNER, scale=HIDDEN ** -0.5)),
            ("w_up", normal(rng, HIDDEN, INNER, scale=HIDDEN ** -0.5)),
            ("w_down", normal(rng, INNER, HIDDEN, scale=INNER ** -0.5))]
    check_lowering(op, args, {}, consts={"w_gate", "w_up", "w_down"})


# -- building, exporting, loading ---------------------------------------------------------
def ffn_model(batch=1, seq=None, hidden=HIDDEN, inner=INNER, symbolic=False):
    """A FeedForward model, optionally with symbolic batch/sequence axes."""
    op = ops.get("FeedForward")
    rng = rng_for("ffn-model", hidden, inner)
    x = normal(rng, batch, seq or 7, hidden)
    args = [("input", x), ("w1", normal(rng, hidden, inner, scale=hidden ** -0.5)),
            ("b1", normal(rng, inner)), ("w2", normal(rng, inner, hidden, scale=inner ** -0.5)),
            ("b2", normal(rng, hidden))]
    model, _ = one_node_model(op, args, {"activation": "gelu"}, consts={"w1", "b1", "w2", "b2"})
    if symbolic:
        model.graph.inputs[0].shape = ir.Shape(["batch", "seq", hidden])
    return model, args


def test_symbolic_axes_are_specialized():
    model, args = ffn_model(symbolic=True)
    built = tvm_backend.build(model, "cpu", shape={"batch": 2, "seq": 5})
    assert built.shapes == {"input": [2, 5, HIDDEN]}
    x = rng_for("specialized").standard_normal((2, 5, HIDDEN)).astype(np.float32)
    (y,) = built.run({"input": x})
    ref = ops.get("FeedForward").reference(x, *[a for _, a in args[1:]], activation="gelu")
    assert_close(y, ref, what="specialized FFN")
    with pytest.raises(KernelizeError, match="built for"):
        built.run({"input": x[:1]})
    with pytest.raises(KernelizeError, match="missing input"):
        built.run({})


def write_and_load(built, model, folder):
    """``built`` as the artifact ``kernelize optimize --backend tvm`` writes, loaded by the
    deploy runner (the one TVM VM runner)."""
    from kernelize.api import write_tvm_artifact

    return runner_mod.load(write_tvm_artifact(built, model, {}, folder))


def test_export_and_load_roundtrip(tmp_path):
    model, args = ffn_model(batch=2, seq=9)
    built = tvm_backend.build(model, "cpu")
    assert isinstance(built.runner(), runner_mod.TvmVM)  # the runner deployed artifacts use
    path = built.export_library(tmp_path / "ffn.so")
    assert path.is_file() and (tmp_path / "ffn.so.json").is_file()
    x = args[0][1]
    with write_and_load(built, model, tmp_path / "ffn") as loaded:
        (name,) = [o.name for o in model.graph.outputs]
        np.testing.assert_array_equal(loaded.run({"input": x})[name], built.run({"input": x})[0])
    with pytest.raises(KernelizeError):
        runner_mod.load(tmp_path / "missing")


@pytest.mark.parametrize("seq, width", [(13, 20), (16, 32)])
def test_matmul_rule_covers_odd_shapes(seq, width):
    """Tiles that do not divide the shape stay correct: seq 13, width 20 (partial row and
    column tiles); seq 16, width 32 (rows padded to the row tile, columns exact)."""
    op = ops.get("FeedForward")
    rng = rng_for("odd-widths", seq, width)
    args = [("input", normal(rng, 1, seq, width)), ("w1", normal(rng, width, 36 if width == 20 else 64, scale=0.2)),
            ("b1", normal(rng, 36 if width == 20 else 64)),
            ("w2", normal(rng, 36 if width == 20 else 64, width, scale=0.2)), ("b2", normal(rng, width))]
    built = check_lowering(op, args, {"activation": "relu"}, consts={"w1", "b1", "w2", "b2"})
    assert list(built.schedules.values()).count("MatmulCPU") == 2, built.schedules


def elf_header(path) -> tuple[bytes, int, int]:
    """(magic, e_type, e_machine) of an ELF file."""
    head = open(path, "rb").read(20)
    e_type, e_machine = struct.unpack("<HH", head[16:20])
    return head[:4], e_type, e_machine


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                    reason="needs the aarch64 cross compiler (apt-get install gcc-aarch64-linux-gnu)")
def test_arm64_exports_an_aarch64_shared_object(tmp_path):
    model, _ = ffn_model(batch=1, seq=9)
    built = tvm_backend.build(model, "arm64")
    assert list(built.schedules.values()).count("MatmulCPU") == 2, built.schedules
    path = built.export_library(tmp_path / "ffn_arm64.so")
    magic, e_type, e_machine = elf_header(path)
    assert magic == b"\x7fELF" and e_type == 3 and e_machine == ELF_AARCH64  # ET_DYN, EM_AARCH64
    with pytest.raises(KernelizeError, match="cannot run"):
        built.run({})


@pytest.mark.parametrize("target", ["cuda", "cuda:sm_90"])
def test_cuda_builds(tmp_path, target):
    """CUDA code is generated and exported with dlight's GPU schedules (not run: no GPU here)."""
    op = ops.get("MultiHeadAttention")
    rng = rng_for("cuda-mha")
    model, _ = one_node_model(op, mha_args(rng, 1, 16, 16, "padding", True),
                              {"num_heads": HEADS, "scale": HEAD_SIZE ** -0.5}, consts=MHA_PARAMS)
    built = tvm_backend.build(model, target)
    assert "unscheduled" not in built.schedules.values(), built.schedules
    assert "Matmul" in built.schedules.values()
    path = built.export_library(tmp_path / "mha_cuda.so")
    assert b"__global__" in path.read_bytes()
    with pytest.raises(KernelizeError, match="cannot run"):
        built.run({})


# -- all-MiniLM-L6-v2 ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_fused():
    """all-MiniLM-L6-v2 captured from torch, canonicalized and fused (no ORT lowering)."""
    from kernelize.frontends import torch as torch_frontend
    from kernelize.models import minilm
    from kernelize.passes.canonicalize import canonicalize
    from kernelize.passes.fuse import fuse

    module, example = minilm.build(batch=2, seq=16)
    model = torch_frontend.capture(module, example)
    canonicalize(model)
    fuse(model)
    return model


@pytest.fixture(scope="module")
def minilm_tokens():
    from kernelize.models import minilm

    ids, mask = minilm.tokenize(minilm.SENTENCES)  # two sentences, the shorter one padded
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def minilm_built(minilm_fused, minilm_tokens):
    batch, seq = minilm_tokens["input_ids"].shape
    return tvm_backend.build(minilm_fused, "cpu", shape={"batch": batch, "seq": seq})


@pytest.mark.slow
def test_minilm_kernelize_ops_are_lowered_not_inlined(minilm_fused, minilm_built):
    kinds = {n.op_type for n in minilm_fused.graph if n.domain == ops.DOMAIN}
    assert {"MultiHeadAttention", "SkipLayerNorm", "FeedForward"} <= kinds
    values = list(minilm_built.schedules.values())
    assert "unscheduled" not in values, minilm_built.schedules
    assert values.count("MatmulCPU") >= 5  # projections, FFN up/down, both attention products
    assert any(name.startswith("softmax_fast") for name in minilm_built.schedules)


@pytest.mark.slow
def test_minilm_matches_onnx_runtime(minilm_fused, minilm_built, minilm_tokens, tmp_path):
    from kernelize.backends import ort as ort_backend

    lowered = ir.from_proto(ir.to_proto(minilm_fused))
    ort_backend.lower(lowered)
    expected = ort_backend.run(ort_backend.session(lowered), minilm_tokens)
    actual = minilm_built.run(minilm_tokens)
    assert len(actual) == len(minilm_built.outputs) == 2
    for name, a in zip(minilm_built.outputs, actual):
        e = expected[name]
        assert a.shape == e.shape
        assert float(np.max(np.abs(a - e))) <= 1e-4, f"{name}: {np.max(np.abs(a - e)):.3g}"
    # random token ids, against the fused model's function bodies run by ONNX Runtime
    errors = tvm_backend.compare_with_onnx(minilm_built, minilm_fused)
    assert set(errors) == set(minilm_built.outputs) and max(errors.values()) <= 1e-4, errors
    # the deployed artifact gives the same numbers
    with write_and_load(minilm_built, minilm_fused, tmp_path / "minilm") as loaded:
        np.testing.assert_array_equal(loaded.run(minilm_tokens)[minilm_built.outputs[0]], actual[0])


# -- MetaSchedule tuning ----------------------------------------------------------------------
def linear_model(rows=16, width=64, out=64):
    """A plain ONNX MatMul + Add: one fused kernel, one tuning task."""
    rng = rng_for("linear", rows, width, out)
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 20}, name="linear")
    x = ir.Value(name="x", shape=ir.Shape([1, rows, width]), type=ir.TensorType(ir.DataType.FLOAT))
    graph.inputs.append(x)
    w = add_initializer(graph, ir.Value(name="w", const_value=ir.tensor(normal(rng, width, out, scale=0.2))))
    b = add_initializer(graph, ir.Value(name="b", const_value=ir.tensor(normal(rng, out))))
    mm = ir.Node("", "MatMul", [x, w], num_outputs=1)
    add = ir.Node("", "Add", [mm.outputs[0], b], num_outputs=1)
    graph.extend([mm, add])
    add.outputs[0].name = "y"
    add.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(add.outputs[0])
    return ir.Model(graph, ir_version=10), (w.const_value.numpy(), b.const_value.numpy())


@pytest.mark.slow
def test_tuning_database_is_reused(tmp_path):
    model, (w, b) = linear_model()
    db = tmp_path / "tuning"
    first = tvm_backend.build(model, "cpu", tune_trials=2, tuning_db=db)
    assert first.tuning["tuned"] == 1 and first.tuning["reused"] == 0
    assert (db / "database_tuning_record.json").stat().st_size > 0
    (kernel,) = first.tuning["kernels"].values()
    assert kernel["tuner_default_ms"] is not None  # the default schedule is a record too
    assert kernel["chosen"] in ("tuned", "default")
    second = tvm_backend.build(model, "cpu", tune_trials=2, tuning_db=db)
    assert second.tuning["tuned"] == 0 and second.tuning["reused"] == 1
    assert second.timings["tune_s"] < first.timings["tune_s"] / 3
    (chosen,) = [k["chosen"] for k in second.tuning["kernels"].values()]
    assert list(second.schedules.values()) == ["tuned" if chosen == "tuned" else "MatmulCPU"]
    x = rng_for("tuned-input").standard_normal((1, 16, 64)).astype(np.float32)
    for built in (first, second):
        assert_close(built.run({"x": x})[0], (x.astype(np.float64) @ w + b).astype(np.float32), what="tuned")


def test_tuning_is_refused_for_other_targets():
    model, _ = linear_model()
    with pytest.raises(UsageError):
        tvm_backend.build(model, "arm64", tune_trials=2)
