"""The compiler's side of the artifact: an optimized model (backend ort) or a TVM build
(backend tvm) written as an artifact folder through :func:`kernelize.deploy.artifact.write`.

Unlike the rest of :mod:`kernelize.deploy` this module needs the compiler (onnx, onnx_ir,
ONNX Runtime's converter, a TVM build), so ``kernelize.deploy`` does not import it: an
artifact still loads and runs on a bare target.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from kernelize.deploy import artifact

ONNX_INLINE_LIMIT = 1_800_000_000  # bytes; past this the weights go to model.onnx.data (protobuf's 2 GB cap)


def write_artifact(model: ir.Model, report: dict, out_path: Path, force: bool = False,
                   target: str | dict | None = None) -> Path:
    """Write the artifact folder of an ONNX Runtime model: model.onnx (+ model.onnx.data past
    1.8 GB; + model.ort, ONNX Runtime's mobile format, for target arm64), report.json,
    report.txt and manifest.json (signature, target, versions, rewrites with their errors,
    SHA-256 of every file), atomically."""
    from kernelize.backends import ort as ort_backend

    out_path = Path(out_path)
    parent = artifact.output_parent(out_path, force)
    inputs, outputs = artifact.signature_from_onnx(model)
    _token_ranges(inputs, model)
    proto = ir.to_proto(model)
    manifest = {"backend": "ort", "inputs": inputs, "outputs": outputs, "target": target,
                "opsets": {op.domain or "ai.onnx": op.version for op in proto.opset_import}}
    if target == "arm64":  # ONNX Runtime's mobile format beside the ONNX file (portable: no arch)
        data = proto.SerializeToString()
        with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.ort.", dir=parent) as tmp:
            mobile = Path(tmp) / "model.ort"
            ort_backend.save_ort_format(data, mobile)
            manifest["target"] = artifact.describe_target("ort", preset="arm64")
            manifest["mobile_model"] = "model.ort"
            files = {"model.onnx": data, "model.ort": mobile}
            _add_html(report, files, "model.onnx", len(data))
            return artifact.write(out_path, files, manifest, report, force)
    if proto.ByteSize() <= ONNX_INLINE_LIMIT:
        data = proto.SerializeToString()
        files = {"model.onnx": data}
        _add_html(report, files, "model.onnx", len(data))
        return artifact.write(out_path, files, manifest, report, force)
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.model.", dir=parent) as tmp:
        onnx.save_model(proto, Path(tmp) / "model.onnx", save_as_external_data=True,
                        location="model.onnx.data", all_tensors_to_one_file=True)
        files = {"model.onnx": Path(tmp) / "model.onnx", "model.onnx.data": Path(tmp) / "model.onnx.data"}
        _add_html(report, files, "model.onnx", sum(p.stat().st_size for p in files.values()))
        return artifact.write(out_path, files, manifest, report, force)


def _token_ranges(inputs: list[dict], model: ir.Model) -> None:
    """``range`` [0, rows) on each integer input that indexes an embedding table (random
    inputs stay inside it; the runner refuses ids outside it)."""
    from kernelize.passes import verify

    values = {v.name: v for v in model.graph.inputs}
    for entry in inputs:
        value = values.get(entry["name"])
        rows = verify.embedding_rows(model, value) if value is not None else None
        if rows:
            entry["range"] = [0, int(rows)]


def write_tvm_artifact(built, model: ir.Model, report: dict, out_path: Path, force: bool = False) -> Path:
    """Write the artifact folder of a TVM build: the compiled library (``model.so``;
    ``model.tar`` of objects when the target's cross linker is missing, with a note in the
    report), manifest.json and the report, atomically."""
    out_path = Path(out_path)
    parent = artifact.output_parent(out_path, force)
    linker = built.target.linker
    name = "model.tar" if linker is not None and shutil.which(linker) is None else "model.so"
    _, outputs = artifact.signature_from_onnx(model)
    inputs = [dict(entry) for entry in built.inputs]
    _token_ranges(inputs, model)  # the runner refuses ids past the table: TVM's Gather does not
    manifest = {"backend": "tvm", "entry": "main", "model": name, "inputs": inputs, "outputs": outputs,
                "target": artifact.describe_target("tvm", preset=built.target.name,
                                                   string=built.target.describe())}
    if name == "model.tar":
        report.setdefault("notes", []).append(f"{linker} not found: object files (model.tar) to link on the device")
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.lib.", dir=parent) as tmp:
        library = built.export_library(Path(tmp) / name)
        files = {name: library}
        _add_html(report, files, name, Path(library).stat().st_size)
        return artifact.write(out_path, files, manifest, report, force)


def _add_html(report: dict, files: dict, model_name: str, model_bytes: int) -> None:
    """The model file's size into the report's ``size`` section, and ``report.html`` (drawn
    from the same report as report.json) into ``files``."""
    from kernelize import report_html

    if report is None:
        return
    report.setdefault("size", {}).update(artifact_model=model_name, artifact_model_bytes=int(model_bytes))
    files["report.html"] = report_html.render(report).encode()
