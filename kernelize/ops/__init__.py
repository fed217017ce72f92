"""kernelize-domain operators, one module each.

Every operator has four parts that agree with each other: its schema (inputs,
attributes), a NumPy reference, an ONNX function body in standard ops (so any ONNX
runtime can run the model) and, where a backend has a faster kernel, a lowering to it.
"""

from kernelize.ops.base import DOMAIN, Operator, get, registered  # noqa: F401
from kernelize.ops import (  # noqa: F401  (importing registers each operator)
    attention,
    feed_forward,
    gated_feed_forward,
    multi_head_attention,
    rms_norm,
    skip_layer_norm,
)
