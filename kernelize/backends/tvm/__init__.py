"""TVM backend: kernelize's fused model (before ONNX Runtime lowering) -> Apache TVM Relax
-> compiled code for a target preset (``cpu``, ``cuda``, ``arm64`` or a TVM target JSON).

    frontend.py   ONNX -> Relax (``to_relax``, ``input_shapes``, ``specialize``); kernelize nodes
                  through the lowerings registered by operator name in ``registry.py``
    lower/        one module per kernelize operator holding its TVM lowering (``@lowering("Name")``)
    te.py         Relax / TE helpers the lowerings share (``linear``, ``softmax``, ``gelu``, ``sdpa``)
    build.py      ``build`` (legalize, fuse, schedule, compile) -> ``Built``; ``tune`` (MetaSchedule);
                  ``compare_with_onnx``, ``benchmark``
    schedules.py  kernelize's own CPU schedule rules (and dlight's GPU rules)

A built module runs on ``kernelize.deploy.runner.TvmVM``, the VM runner deployed artifacts
use too. Importing this package does not import ``tvm``; building does.
"""

from kernelize.backends.tvm.build import Built, benchmark, build, compare_with_onnx, tune  # noqa: F401
from kernelize.backends.tvm.frontend import DEFAULT_SHAPE, input_shapes, specialize, to_relax  # noqa: F401
from kernelize.backends.tvm.te import gelu, linear, sdpa, softmax  # noqa: F401
