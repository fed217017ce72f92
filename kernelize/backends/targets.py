"""TVM target presets: ``cpu`` (this machine), ``cuda`` (sm_80, or ``cuda:sm_90``), ``arm64``
(aarch64 Linux with NEON), or a raw TVM target as a JSON string for anything else.

``resolve(name)`` gives a :class:`Preset` (the TVM target, its kind and what is needed to link
a shared library for it); ``linker(preset)`` checks the linker is installed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil

from kernelize.errors import KernelizeError, UsageError

PRESETS = ("cpu", "cuda", "arm64")
CUDA_ARCHS = ("sm_80", "sm_90")
ARM64_TRIPLE = "aarch64-linux-gnu"
ARM64_LINKER = "aarch64-linux-gnu-gcc"
ARM64_HINT = "apt-get install gcc-aarch64-linux-gnu"


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str  # the name it was asked by ("cpu", "cuda:sm_90", "arm64" or "json")
    config: dict  # the TVM target as a dict (Target(config) builds it)
    kind: str  # "cpu" | "gpu": which schedules apply
    runs_here: bool  # whether the compiled code can run on this machine
    linker: str | None  # cross linker needed for a .so (None: the host compiler)

    def target(self):
        import tvm

        return tvm.target.Target(self.config)

    def describe(self) -> str:
        return json.dumps(self.config, sort_keys=True)


def choices_line() -> str:
    return ("cpu, cuda (sm_80; also cuda:sm_90), arm64, or a TVM target as JSON "
            "(e.g. '{\"kind\": \"llvm\", \"mcpu\": \"skylake-avx512\"}')")


@functools.lru_cache(maxsize=1)
def host_cpu() -> dict:
    """The host's LLVM target: its triple and CPU model (ISA) as TVM detects them."""
    import tvm

    detected = tvm.target.Target.from_device(tvm.cpu())
    config = {"kind": "llvm"}
    attrs = detected.attrs
    for key in ("mtriple", "mcpu"):
        if key in attrs and str(attrs[key]):
            config[key] = str(attrs[key])
    return config


def resolve(name: str) -> Preset:
    """The preset called ``name`` (or a raw TVM target JSON). Unknown names raise UsageError."""
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"unknown target {name!r} (choose from: {choices_line()})")
    text = name.strip()
    if text == "cpu":
        return Preset("cpu", host_cpu(), "cpu", True, None)
    if text == "cuda" or text.startswith("cuda:"):
        arch = text.partition(":")[2] or "sm_80"
        if arch not in CUDA_ARCHS:
            raise UsageError(f"unknown CUDA architecture {arch!r} (choose from: {', '.join(CUDA_ARCHS)})")
        config = {"kind": "cuda", "arch": arch, "host": {"kind": "llvm"}}
        return Preset(text, config, "gpu", False, None)
    if text == "arm64":
        config = {"kind": "llvm", "mtriple": ARM64_TRIPLE, "mattr": ["+neon"]}
        return Preset("arm64", config, "cpu", False, ARM64_LINKER)
    if text.startswith("{"):
        return _from_json(text)
    raise UsageError(f"unknown target {name!r} (choose from: {choices_line()})")


def _from_json(text: str) -> Preset:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"target JSON does not parse: {err}") from None
    if not isinstance(config, dict) or "kind" not in config:
        raise UsageError("a target JSON must be an object with a \"kind\" (e.g. {\"kind\": \"llvm\"})")
    import tvm

    try:
        target = tvm.target.Target(config)
    except Exception as err:  # noqa: BLE001 - TVM raises its own error types
        raise UsageError(f"TVM does not accept the target {text}: {str(err).strip().splitlines()[-1]}") from None
    kind = target.kind.name
    if kind == "llvm":
        host = host_cpu()
        triple = str(target.attrs.get("mtriple", "") or "")
        foreign = bool(triple) and triple.split("-")[0] != host.get("mtriple", "x86_64").split("-")[0]
        linker = ARM64_LINKER if triple.startswith("aarch64") else None
        return Preset("json", config, "cpu", not foreign, linker if foreign else None)
    if kind in ("cuda", "rocm", "vulkan", "metal", "opencl", "webgpu"):
        return Preset("json", config, "gpu", False, None)
    raise UsageError(f"unsupported target kind {kind!r} (choose from: {choices_line()})")


INT8_DOT_PRODUCT = ("avx512vnni", "avxvnni", "dotprod")  # LLVM feature names: x86 VNNI, aarch64 SDOT/UDOT


def int8_dot_product(preset: Preset) -> str | None:
    """The int8 dot-product instruction set ``preset``'s CPU has (an LLVM feature name from
    ``INT8_DOT_PRODUCT``), or None (GPU targets: None; their int8 paths are not kernelize's)."""
    if preset.kind != "cpu":
        return None
    from tvm.target import codegen

    target = preset.target()
    return next((f for f in INT8_DOT_PRODUCT if codegen.target_has_features(f, target)), None)


def linker(preset: Preset) -> str | None:
    """The cross linker ``preset`` needs to export a .so, checked to be installed; None when
    the host compiler does. Raises KernelizeError with the install hint when it is missing."""
    if preset.linker is None:
        return None
    path = shutil.which(preset.linker)
    if path is None:
        hint = ARM64_HINT if preset.linker == ARM64_LINKER else f"install {preset.linker}"
        raise KernelizeError(f"linking for {preset.name} needs {preset.linker}, which is not installed "
                             f"(Debian/Ubuntu: {hint}); or export a .tar and link on the device")
    return path
