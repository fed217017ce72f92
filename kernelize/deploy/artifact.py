"""The artifact: a folder (or its single-file ``.tar.gz`` form) that runs on its target
without kernelize or torch.

Layout::

    model.onnx [+ model.onnx.data]     backend ort
    model.so   (or model.tar)          backend tvm (a .tar is linked on the target)
    report.json, report.txt            what was rewritten and the measured errors
    report.html                        the same as a page with plots (written by the compiler)
    manifest.json                      format version, backend, target, signature,
                                       library versions, rewrites, SHA-256 of every other file

:func:`write` builds the folder in a temporary folder beside the destination and renames it,
so there is never a half-written artifact. :func:`load` verifies the manifest and every
checksum and refuses an artifact built for another machine; its ``.tar.gz`` form is
:mod:`kernelize.deploy.archive`'s. This module imports only the
standard library at import time (numpy, onnx, onnxruntime and tvm are imported lazily where
needed), so that it stays usable on a bare target.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Mapping

from kernelize.errors import KernelizeError

FORMAT = "kernelize-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARCHIVE_SUFFIX = ".tar.gz"
MODEL_FILES = {"ort": ("model.onnx",), "tvm": ("model.so", "model.tar")}
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64",
                 "armv8": "aarch64", "i686": "x86", "i386": "x86"}
_CHUNK = 1 << 20


# ----------------------------------------------------------------------------- targets

def normalize_arch(arch: str | None) -> str | None:
    if not arch:
        return None
    arch = str(arch).lower()
    return _ARCH_ALIASES.get(arch, arch)


def host() -> dict:
    """This machine, in the terms the manifest uses."""
    return {"arch": normalize_arch(platform.machine()), "os": _host_os()}


def _host_os() -> str:
    return "linux" if sys.platform.startswith("linux") else sys.platform


def _os_from_triple(triple: str) -> str | None:
    triple = triple.lower()
    for needle, name in (("android", "android"), ("linux", "linux"), ("darwin", "darwin"), ("apple", "darwin"),
                         ("macos", "darwin"), ("windows", "win32"), ("msvc", "win32"), ("mingw", "win32")):
        if needle in triple:
            return name
    return None


def _tvm_target_fields(string: str) -> dict:
    """kind, mtriple (of the host code) from a TVM target string: JSON (TVM 0.27's str(Target))
    or the older ``llvm -mtriple=... -mcpu=...`` spelling."""
    text = string.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except ValueError:
            spec = {}
        kind = spec.get("kind", "")
        triple = spec.get("mtriple") or ""
        host_spec = spec.get("host")
        if not triple and isinstance(host_spec, dict):
            triple = host_spec.get("mtriple") or ""
        return {"kind": kind, "mtriple": triple}
    words = text.split()
    kind = words[0] if words else ""
    triple = ""
    for word in words[1:]:
        if word.startswith("-mtriple="):
            triple = word.split("=", 1)[1]
    return {"kind": kind, "mtriple": triple}


def describe_target(backend: str, preset: str | None = None, string: str | None = None, *,
                    device: str | None = None, arch: str | None = None, os_name: str | None = None) -> dict:
    """The manifest's ``target`` entry: preset name, full target string, and the device,
    architecture and OS the artifact needs (None: any).

    For ort the model is portable: no architecture. For tvm the architecture and OS come from
    the target triple (of the host code for a GPU target); a target without a triple was
    compiled for this machine.
    """
    if backend == "ort":
        string = string or "onnxruntime:CPUExecutionProvider"
        device = device or ("cuda" if "cuda" in string.lower() else "cpu")
        preset = preset or device
    else:
        string = string or json.dumps({"kind": "llvm"})
        fields = _tvm_target_fields(string)
        kind = fields["kind"]
        device = device or {"llvm": "cpu", "c": "cpu", "nvptx": "cuda"}.get(kind, kind or "cpu")
        triple = fields["mtriple"]
        if triple:
            arch = arch or triple.split("-")[0]
            os_name = os_name or _os_from_triple(triple)
        else:
            arch = arch or host()["arch"]
            os_name = os_name or _host_os()
        arch = normalize_arch(arch)
        preset = preset or f"{arch}-{device}"
    return {"preset": preset, "string": string, "device": device, "arch": normalize_arch(arch), "os": os_name}


def target_mismatch(manifest: Mapping) -> str | None:
    """Why this machine cannot run the artifact locally (None when it can)."""
    target = manifest.get("target") or {}
    name = target.get("preset") or target.get("string") or "?"
    here = host()
    arch = normalize_arch(target.get("arch"))
    if arch and arch != here["arch"]:
        return (f"the artifact targets {name} ({arch}) but this machine is {here['arch']}: run it on the "
                "target device (kernelize deploy ART --rpc HOST:PORT) or rebuild it for this machine")
    os_name = target.get("os")
    if os_name and os_name != here["os"]:
        return (f"the artifact targets {name} ({os_name}) but this machine runs {here['os']}: run it on the "
                "target device or rebuild it for this machine")
    device = target.get("device") or "cpu"
    if device != "cpu" and not _device_available(manifest.get("backend"), device):
        return (f"the artifact targets {name} (device {device}) but this machine has no {device} device: "
                "run it on the target device or rebuild it for cpu")
    return None


def _device_available(backend: str | None, device: str) -> bool:
    try:
        if backend == "ort":
            import onnxruntime

            wanted = {"cuda": "CUDAExecutionProvider", "rocm": "ROCMExecutionProvider"}.get(device)
            return wanted is not None and wanted in onnxruntime.get_available_providers()
        import tvm

        return bool(tvm.device(device, 0).exist)
    except Exception:  # noqa: BLE001 - no runtime, or a device kind it does not know
        return False


# ----------------------------------------------------------------------------- signatures

def _dim(d) -> int | str | None:
    if d is None:
        return None
    if isinstance(d, int):
        return int(d)
    value = getattr(d, "value", d)  # onnx_ir SymbolicDim / tvm IntImm
    if isinstance(value, int):
        return int(value)
    if value is None:
        return None
    name = getattr(d, "name", None)
    return str(name if isinstance(name, str) else value)


def signature_from_onnx(model: Any) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of an ONNX model (path, ``onnx.ModelProto`` or ``onnx_ir.Model``):
    [{"name", "shape" (ints, dim names, None for an unnamed dim; None for unknown rank),
    "dtype" (numpy name)}]."""
    import numpy as np

    if isinstance(model, (str, os.PathLike)):
        import onnx

        model = onnx.load(str(model), load_external_data=False)
    if hasattr(model, "graph") and hasattr(model.graph, "inputs"):  # onnx_ir
        def entry(value):
            shape = None if value.shape is None else [_dim(d) for d in value.shape]
            dtype = np.dtype(value.dtype.numpy()).name if value.dtype is not None else None
            return {"name": value.name, "shape": shape, "dtype": dtype}

        return [entry(v) for v in model.graph.inputs], [entry(v) for v in model.graph.outputs]
    from onnx import helper

    initializers = {t.name for t in model.graph.initializer}

    def entry_proto(info):
        tensor = info.type.tensor_type
        shape = None
        if tensor.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name if tensor.elem_type else None
        return {"name": info.name, "shape": shape, "dtype": dtype}

    return ([entry_proto(v) for v in model.graph.input if v.name not in initializers],
            [entry_proto(v) for v in model.graph.output])


def signature_from_relax(func: Any, output_names: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of a Relax function (``mod["main"]``): parameters in call order;
    outputs named ``output`` (one) or ``output_0..`` (a tuple) unless ``output_names``."""
    def entry(name, ty):
        shape_expr = getattr(ty, "shape", None)
        values = getattr(shape_expr, "values", None)
        if values is None:
            shape = None
        else:
            shape = []
            for v in values:
                value = getattr(v, "value", None)
                shape.append(int(value) if isinstance(value, int) else str(getattr(v, "name", None) or v))
        return {"name": name, "shape": shape, "dtype": str(ty.dtype)}

    inputs = []
    for param in func.params:
        ty = param.ty
        if not hasattr(ty, "dtype"):
            raise KernelizeError(f"parameter {param.name} of the Relax function is not a tensor ({ty})")
        inputs.append(entry(param.name, ty))
    ret = func.ret_ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    names = output_names or (["output"] if len(fields) == 1 and not hasattr(ret, "fields")
                             else [f"output_{i}" for i in range(len(fields))])
    if len(names) != len(fields):
        raise KernelizeError(f"{len(names)} output names for {len(fields)} outputs")
    return inputs, [entry(n, t) for n, t in zip(names, fields)]


# ----------------------------------------------------------------------------- writing

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_name(name: str) -> None:
    if (not isinstance(name, str) or not name or name in (".", "..") or name.startswith(".")
            or "/" in name or "\\" in name or name == MANIFEST or "\0" in name):
        raise KernelizeError(f"invalid artifact file name {name!r} (a plain file name, not {MANIFEST})")


def _lib_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions(backend: str) -> dict:
    """Versions of kernelize and the backend's runtime, read from the installed metadata
    (without importing the libraries)."""
    found = {"kernelize": _lib_version("kernelize") or _kernelize_version(),
             "python": platform.python_version()}
    if backend == "ort":
        found["onnxruntime"] = _lib_version("onnxruntime") or _lib_version("onnxruntime-gpu")
    elif backend == "tvm":
        found["tvm"] = _lib_version("apache-tvm") or _lib_version("tvm")
    return found


def _kernelize_version() -> str | None:
    module = sys.modules.get("kernelize")
    return getattr(module, "__version__", None)


def rewrites_from_report(report: Mapping | None) -> list[dict]:
    """The rewrites applied, each with its measured error, from the report's sites and its
    applied custom rewrites."""
    if not report:
        return []
    entries = []
    for site in report.get("sites", []) or []:
        entry = {"site": site.get("id"), "pattern": site.get("pattern"), "rewrite": site.get("rewrite"),
                 "max_abs_error": site.get("max_abs_error")}
        if site.get("error_measured"):
            entry["error_measured"] = site["error_measured"]
        entries.append(entry)
    for custom in report.get("custom_rewrites", []) or []:
        if custom.get("status") == "applied":
            entries.append({"site": None, "pattern": "custom", "rewrite": custom.get("name"),
                            "exact": custom.get("exact"), "sites": custom.get("sites"),
                            "max_abs_error": custom.get("max_abs_error")})
    return entries


def _report_text(report: Mapping) -> str:
    from kernelize import report as report_mod

    try:
        return report_mod.table(dict(report))
    except (KeyError, TypeError, ValueError):  # a partial report: a plain listing
        return "".join(f"{k}: {json.dumps(v, default=str)}\n" for k, v in report.items())


def _signature_entries(entries: Any, what: str) -> list[dict]:
    if not isinstance(entries, (list, tuple)) or not entries:
        raise KernelizeError(f"manifest {what} must be a non-empty list of {{name, shape, dtype}}")
    out = []
    for e in entries:
        if not isinstance(e, Mapping) or not isinstance(e.get("name"), str) or "dtype" not in e:
            raise KernelizeError(f"manifest {what} entry {e!r} needs a name, a shape and a dtype")
        shape = e.get("shape")
        if shape is not None:
            if not isinstance(shape, (list, tuple)):
                raise KernelizeError(f"manifest {what} {e['name']}: shape must be a list")
            shape = [d if d is None or isinstance(d, (int, str)) else _dim(d) for d in shape]
        entry = dict(e)
        entry["shape"] = shape
        out.append(entry)
    return out


def output_parent(out_path: Path, force: bool = False, inputs=()) -> Path:
    """The folder a new output folder goes into; refuses an existing output without force,
    a missing parent, the root, the current folder or one above it, and a folder that is or
    contains one of ``inputs`` (the user's files: replacing it would delete them)."""
    out_path = Path(out_path)
    resolved = out_path.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if source == resolved or resolved in source.parents:
            raise KernelizeError(f"output folder {out_path} contains the input {source}; choose another folder")
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise KernelizeError(f"refusing to write the output to {out_path}: it is the current folder or one above it; "
                             "name a new folder")
    if out_path.exists() and not force:
        raise KernelizeError(f"output folder {out_path} exists (use --force to replace it)")
    parent = out_path.resolve().parent
    if not parent.is_dir():
        raise KernelizeError(f"parent folder of the output does not exist: {parent}")
    return parent


def user_mode(mode: int) -> int:
    """``mode`` with the process's umask applied (what a plain ``open``/``mkdir`` would give)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def write(out_path: str | os.PathLike, files: Mapping[str, bytes | str | os.PathLike],
          manifest_fields: Mapping[str, Any], report: Mapping | None, force: bool = False) -> Path:
    """Write an artifact folder atomically and return its path.

    ``files``: artifact file name -> bytes, or a path to copy. ``manifest_fields``: at least
    ``backend`` ("ort" or "tvm"), ``inputs`` and ``outputs`` (see :func:`signature_from_onnx`),
    and ``target`` (a dict from :func:`describe_target`, a preset name, or absent for the
    backend's default); anything else is kept as is. report.json and report.txt are written
    from ``report``. An existing ``out_path`` is replaced only with ``force``.
    """
    out_path = Path(out_path)
    fields = dict(manifest_fields)
    backend = fields.get("backend")
    if backend not in MODEL_FILES:
        raise KernelizeError(f"unknown artifact backend {backend!r} (choose from: {', '.join(MODEL_FILES)})")
    for name in files:
        _check_name(name)
    model = fields.pop("model", None) or next((n for n in MODEL_FILES[backend] if n in files), None)
    if model not in MODEL_FILES[backend] or model not in files:
        raise KernelizeError(f"a {backend} artifact needs one of: {', '.join(MODEL_FILES[backend])}")
    inputs = _signature_entries(fields.pop("inputs", None), "inputs")
    outputs = _signature_entries(fields.pop("outputs", None), "outputs")
    target = fields.pop("target", None)
    if not isinstance(target, Mapping):
        target = describe_target(backend, preset=target)
    else:
        target = {**describe_target(backend, target.get("preset"), target.get("string"),
                                    device=target.get("device"), arch=target.get("arch"),
                                    os_name=target.get("os")), **{k: v for k, v in target.items() if v is not None}}
        target["arch"] = normalize_arch(target.get("arch"))
    parent = output_parent(out_path, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=parent))
    try:
        contents = dict(files)
        if report is not None:
            from kernelize import report as report_mod

            contents.setdefault("report.json", report_mod.dumps(dict(report)).encode())
            contents.setdefault("report.txt", _report_text(report).encode())
        for name, content in contents.items():
            dest = tmp / name
            if isinstance(content, (bytes, bytearray, memoryview)):
                dest.write_bytes(bytes(content))
            else:
                source = Path(content)
                if not source.is_file():
                    raise KernelizeError(f"file for {name} not found: {source}")
                shutil.copyfile(source, dest)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
            "backend": backend,
            "model": model,
            "target": target,
            "inputs": inputs,
            "outputs": outputs,
            "versions": {**versions(backend), **(fields.pop("versions", None) or {})},
            "rewrites": fields.pop("rewrites", None) if "rewrites" in fields else rewrites_from_report(report),
        }
        e2e = (report or {}).get("end_to_end") or {}
        if e2e.get("outputs"):
            manifest["end_to_end_max_abs_error"] = max(e2e["outputs"].values())
        manifest.update(fields)
        manifest["files"] = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                             for name in sorted(contents)}
        (tmp / MANIFEST).write_text(dumps(manifest))
        tmp.chmod(user_mode(0o777))  # mkdtemp makes it private; the artifact follows the user's umask
        _replace(tmp, out_path, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_path


def dumps(manifest: Mapping) -> str:
    """JSON with indentation, but lists of scalars (shapes) on one line."""
    text = json.dumps(manifest, indent=2, default=str)
    return re.sub(r"\[\s*((?:(?:-?[\d.eE+-]+|\"[^\"\n]*\"|null|true|false)\s*,\s*)*"
                  r"(?:-?[\d.eE+-]+|\"[^\"\n]*\"|null|true|false))\s*\]",
                  lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text) + "\n"


def _replace(tmp: Path, out_path: Path, force: bool) -> None:
    """Move ``tmp`` to ``out_path``; an existing one is set aside first and removed after."""
    old = None
    if out_path.exists() or out_path.is_symlink():
        if not force:
            raise KernelizeError(f"output folder {out_path} exists (use --force to replace it)")
        old = out_path.with_name(f".{out_path.name}.old.{os.getpid()}")
        os.replace(out_path, old)
    try:
        os.replace(tmp, out_path)
    except BaseException:
        if old is not None:
            os.replace(old, out_path)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


# ----------------------------------------------------------------------------- reading

class Artifact:
    """A verified artifact: ``path`` is the folder holding its files (a temporary folder,
    removed by :meth:`close`, when it was loaded from an archive)."""

    def __init__(self, path: Path, manifest: dict, source: Path, tmp: tempfile.TemporaryDirectory | None = None):
        self.path = path
        self.manifest = manifest
        self.source = source
        self._tmp = tmp

    backend = property(lambda self: self.manifest["backend"])
    inputs = property(lambda self: self.manifest["inputs"])
    outputs = property(lambda self: self.manifest["outputs"])
    target = property(lambda self: self.manifest["target"])
    model_path = property(lambda self: self.path / self.manifest["model"])

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"Artifact({str(self.source)!r}, backend={self.backend!r}, target={self.target.get('preset')!r})"


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise KernelizeError(f"not a kernelize artifact: no {MANIFEST} in {folder}")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise KernelizeError(f"{MANIFEST} in {folder} is not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KernelizeError(f"not a kernelize artifact: {path} has no format {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise KernelizeError(f"{path}: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise KernelizeError(f"artifact format version {version} is newer than this kernelize reads "
                             f"({FORMAT_VERSION}): upgrade kernelize")
    backend = manifest.get("backend")
    if backend not in MODEL_FILES:
        raise KernelizeError(f"{path}: unknown backend {backend!r}")
    for key in ("model", "target", "inputs", "outputs", "files"):
        if key not in manifest:
            raise KernelizeError(f"{path}: the manifest has no {key!r}")
    if manifest["model"] not in MODEL_FILES[backend] or manifest["model"] not in manifest["files"]:
        raise KernelizeError(f"{path}: bad model file {manifest['model']!r} for backend {backend}")
    _signature_entries(manifest["inputs"], "inputs")
    _signature_entries(manifest["outputs"], "outputs")
    return manifest


def verify(folder: str | os.PathLike) -> dict:
    """Check the manifest and the SHA-256 of every file; return the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    listed = manifest["files"]
    if not isinstance(listed, dict):
        raise KernelizeError(f"{folder / MANIFEST}: 'files' must map names to checksums")
    for name, entry in listed.items():
        _check_name(name)
        path = folder / name
        if path.is_symlink():
            raise KernelizeError(f"artifact {folder}: {name} is a link (an artifact holds plain files only)")
        if not path.is_file():
            raise KernelizeError(f"artifact {folder}: file {name} is missing")
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(expected, str):
            raise KernelizeError(f"artifact {folder}: no checksum for {name} in the manifest")
        if "bytes" in entry and path.stat().st_size != entry["bytes"]:
            raise KernelizeError(f"artifact {folder}: {name} has {path.stat().st_size} bytes, the manifest says "
                                 f"{entry['bytes']} (modified or truncated)")
        if sha256_file(path) != expected.lower():
            raise KernelizeError(f"artifact {folder}: checksum mismatch for {name} (the file or the manifest "
                                 "was modified)")
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST and rel not in listed and not path.is_dir():
            raise KernelizeError(f"artifact {folder}: unexpected file {rel} (not in the manifest)")
        if path.is_dir():
            raise KernelizeError(f"artifact {folder}: unexpected folder {rel}")
    return manifest


def load(path: str | os.PathLike, check_target: bool = True) -> Artifact:
    """Open an artifact folder or ``.tar.gz`` archive and verify it.

    Refuses a missing or modified file, a wrong checksum, an unknown format version and, with
    ``check_target``, an artifact this machine cannot run (another architecture, OS or device).
    """
    source = Path(path)
    if not source.exists():
        raise KernelizeError(f"artifact not found: {source}")
    tmp = None
    if source.is_dir():
        folder = source
    elif tarfile.is_tarfile(source):
        tmp = tempfile.TemporaryDirectory(prefix="kernelize-artifact-")
        try:
            from kernelize.deploy.archive import extract

            folder = extract(source, Path(tmp.name))
        except BaseException:
            tmp.cleanup()
            raise
    else:
        raise KernelizeError(f"not an artifact folder or {ARCHIVE_SUFFIX} archive: {source}")
    try:
        manifest = verify(folder)
        if check_target:
            reason = target_mismatch(manifest)
            if reason:
                raise KernelizeError(f"cannot run {source} here: {reason}")
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise
    return Artifact(folder, manifest, source, tmp)


def __getattr__(name: str):
    """``artifact.pack`` and ``artifact.unpack``, which live in :mod:`kernelize.deploy.archive`."""
    if name in ("pack", "unpack"):
        from kernelize.deploy import archive

        return getattr(archive, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
