"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU count, CPU model, load and library versions."""
    import numpy
    import onnx
    import onnxruntime
    import onnxscript
    import torch
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1m": os.getloadavg()[0],
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__,
            "onnx": onnx.__version__,
            "transformers": transformers.__version__,
            "numpy": numpy.__version__,
        },
    }


def write_json(name: str, data: dict) -> Path:
    """Write ``results/<name>.json`` atomically (temp file in the same folder, then rename)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"{name}.json"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".json", dir=RESULTS)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates the file private
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return target
