"""Deploy a tvm artifact to a device over TVM RPC: upload, run on random inputs, time there,
and compare with a local run when the target is this machine.

A device is reached directly (``rpc.connect``) or through a tracker that pools devices by key
(``rpc.connect_tracker(...).request(key)``). Every network step has a timeout, so an address
with nothing listening fails in seconds with a one-line error instead of hanging.
"""

from __future__ import annotations

import gc
import os
import socket
import threading
from typing import Any, Callable, Mapping

from kernelize.deploy import artifact as artifact_mod
from kernelize.deploy import runner as runner_mod
from kernelize.errors import KernelizeError, UsageError

DEFAULT_TIMEOUT = 10.0  # seconds for each connection step
COMPARE_RTOL = 1e-4
COMPARE_ATOL = 1e-5


def parse_address(text: str, what: str = "--rpc") -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT') -> (host, port); a UsageError otherwise."""
    host, sep, port = str(text).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{what} wants HOST:PORT, got {text!r}")
    return host, int(port)


def check_port(host: str, port: int, timeout: float, what: str) -> None:
    """Fail fast, with one line, when nothing accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.timeout:
        raise KernelizeError(f"cannot connect to {what} {host}:{port}: no answer within {timeout:g} s") from None
    except OSError as err:
        reason = err.strerror or _first(err)
        raise KernelizeError(f"cannot connect to {what} {host}:{port}: {reason.lower()} (is it running and "
                             "reachable?)") from None


def _first(err: BaseException) -> str:
    return runner_mod._first_line(err)


def _with_timeout(fn: Callable[[], Any], timeout: float, message: str) -> Any:
    """Run ``fn`` in a daemon thread; a KernelizeError(message) if it has not returned in time
    (the RPC handshake itself has no timeout of its own)."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise KernelizeError(message)
    if "error" in box:
        raise box["error"]
    return box["value"]


def connect(rpc_addr: str | None = None, tracker_addr: str | None = None, key: str = "",
            timeout: float = DEFAULT_TIMEOUT):
    """An RPC session to a device: directly (``rpc_addr``) or from a tracker's pool (``key``)."""
    if bool(rpc_addr) == bool(tracker_addr):
        raise UsageError("give either --rpc HOST:PORT or --tracker HOST:PORT --key KEY")
    if tracker_addr and not key:
        raise UsageError("--tracker needs --key (the device key the servers registered with)")
    if rpc_addr:
        host, port = parse_address(rpc_addr, "--rpc")
        check_port(host, port, timeout, "RPC server")  # before the slow TVM import
        runner_mod.import_tvm()
        from tvm import rpc

        def direct():
            try:
                return rpc.connect(host, port, key=key)
            except Exception as err:  # noqa: BLE001 - TVM raises its own types
                raise KernelizeError(f"RPC connection to {host}:{port} failed: {_first(err)}") from None

        return _with_timeout(direct, timeout, f"RPC server {host}:{port} accepted the connection but did not "
                                              f"answer within {timeout:g} s (is it a TVM RPC server?)")
    host, port = parse_address(tracker_addr, "--tracker")
    check_port(host, port, timeout, "RPC tracker")
    runner_mod.import_tvm()
    from tvm import rpc

    def pooled():
        try:
            tracker = rpc.connect_tracker(host, port)
            sock = getattr(tracker, "_sock", None)
            if sock is not None:  # the request waits for a free device for ever otherwise
                sock.settimeout(timeout)
            summary = tracker.summary()
        except Exception as err:  # noqa: BLE001
            raise KernelizeError(f"RPC tracker {host}:{port} failed: {_first(err)}") from None
        summary = summary if isinstance(summary, dict) else {}
        queue = summary.get("queue_info") or {}
        servers = {str(s.get("key", "")).split(":", 1)[-1] for s in summary.get("server_info") or []}
        if key not in queue and key not in servers:
            keys = ", ".join(sorted(set(queue) | servers)) or "none"
            raise KernelizeError(f"no device with key {key!r} at tracker {host}:{port} (keys there: {keys})")
        try:
            return tracker.request(key, max_retry=1)
        except Exception as err:  # noqa: BLE001
            text = _first(err)
            if "timed out" in text or "timeout" in text.lower():
                raise KernelizeError(f"no free device with key {key!r} at tracker {host}:{port} within "
                                     f"{timeout:g} s") from None
            raise KernelizeError(f"tracker {host}:{port} could not give a device with key {key!r}: {text}") \
                from None

    return _with_timeout(pooled, 2 * timeout + 5, f"tracker {host}:{port} did not give a device with key "
                                                   f"{key!r} within {2 * timeout + 5:g} s")


def deploy(path: str | os.PathLike, *, rpc: str | None = None, tracker: str | None = None, key: str = "",
           runs: int = 10, shapes: Mapping[str, int] | None = None, seed: int = 0,
           timeout: float = DEFAULT_TIMEOUT, compare: bool = True,
           progress: Callable[[str], None] | None = None) -> dict:
    """Upload a tvm artifact to a device, run it on random inputs, time it there; compare its
    outputs with a local run when the artifact targets this machine.

    Returns {"latency": stats (ms), "outputs": {name: shape/dtype/finite}, "arrays": {name:
    the device's output array}, "local_check": {"status": "match" | "skipped", ...}, "address",
    "key", "target", "shapes", "seed", "artifact"}. Raises KernelizeError when the outputs differ.
    """
    say = progress or (lambda message: None)
    if runs < 1:
        raise UsageError("--runs must be at least 1")
    if bool(rpc) == bool(tracker):
        raise UsageError("give either --rpc HOST:PORT or --tracker HOST:PORT --key KEY")
    if tracker and not key:
        raise UsageError("--tracker needs --key (the device key the servers registered with)")
    if rpc:
        parse_address(rpc, "--rpc")
    else:
        parse_address(tracker, "--tracker")
    art = artifact_mod.load(path, check_target=False)
    try:
        if art.backend != "tvm":
            raise KernelizeError(f"{path} is an {art.backend} artifact: deploy over TVM RPC needs a tvm artifact "
                                 "(copy the folder or its .tar.gz to the device and use `kernelize run` there)")
        feeds = runner_mod.random_inputs(art.inputs, shapes, seed)
        local_reason = artifact_mod.target_mismatch(art.manifest)
        where = rpc or f"{tracker} (key {key})"
        say(f"connecting to {where}")
        session = connect(rpc, tracker, key, timeout)
        try:
            result = _run_remote(session, art, feeds, runs, say)
        finally:
            # TVM closes the connection (and gives a tracker's device back to the pool) when the
            # session object dies; its objects hold reference cycles, so collect them now.
            del session
            gc.collect()
        result.update(artifact=str(path), address=rpc or tracker, key=key or None,
                      target=art.target.get("preset"), shapes={k: list(v.shape) for k, v in feeds.items()},
                      seed=seed)
        outputs = result["arrays"]
        if not compare:
            result["local_check"] = {"status": "skipped", "reason": "--no-compare"}
        elif local_reason:
            result["local_check"] = {"status": "skipped", "reason": "the target is not this machine"}
        else:
            say("running locally to compare")
            local = runner_mod.Runner(artifact_mod.Artifact(art.path, art.manifest, art.source), threads=1)
            try:
                expected = local.run(feeds)
            finally:
                local.close()  # the folder stays: this Artifact owns no temporary copy
            result["local_check"] = _compare(outputs, expected)
            if result["local_check"]["status"] != "match":
                worst = result["local_check"]
                raise KernelizeError(f"remote outputs differ from the local run: max abs diff "
                                     f"{worst['max_abs_diff']:.3g} on {worst['worst_output']}")
        return result
    finally:
        art.close()


def _run_remote(session, art: artifact_mod.Artifact, feeds: dict, runs: int, say) -> dict:
    import numpy as np

    tvm = runner_mod.import_tvm()
    manifest = art.manifest
    digest = manifest["files"][manifest["model"]]["sha256"][:12]
    suffix = os.path.splitext(manifest["model"])[1]
    remote_name = f"kernelize-{digest}{suffix}"
    device_kind = art.target.get("device") or "cpu"
    try:
        say(f"uploading {manifest['model']} ({art.model_path.stat().st_size} bytes)")
        session.upload(str(art.model_path), target=remote_name)
        lib = session.load_module(remote_name)
        device = session.device(device_kind, 0)
        vm = runner_mod.vm_class(tvm)(lib, device)
    except KernelizeError:
        raise
    except Exception as err:  # noqa: BLE001 - TVM raises its own types
        raise KernelizeError(f"the device could not load {manifest['model']}: {_first(err)} (does its "
                             f"architecture match the target {art.target.get('preset')}?)") from None
    entry = manifest.get("entry", "main")
    try:
        say("running on the device")
        tensors = [tvm.runtime.tensor(a, device) for a in feeds.values()]
        vm.set_input(entry, *tensors)
        vm.invoke_stateful(entry)
        values = runner_mod.flatten_outputs(vm.get_outputs(entry))
        say(f"timing {runs} runs on the device")
        timer = vm.time_evaluator("invoke_stateful", device, number=1, repeat=runs)
        seconds = list(timer(entry).results)
    except Exception as err:  # noqa: BLE001
        raise KernelizeError(f"running on the device failed: {_first(err)}") from None
    names = [o["name"] for o in art.outputs]
    if len(values) != len(names):
        raise KernelizeError(f"the device returned {len(values)} outputs, the manifest lists {len(names)}")
    outputs = dict(zip(names, values))
    return {"latency": runner_mod.latency_stats([s * 1e3 for s in seconds]),
            "outputs": {n: {"shape": list(v.shape), "dtype": str(v.dtype),
                            "finite": bool(np.isfinite(v).all()) if v.dtype.kind in "fc" else True}
                        for n, v in outputs.items()},
            "arrays": outputs}


def _compare(remote: dict, local: dict) -> dict:
    import numpy as np

    worst_name, worst = None, 0.0
    ok = True
    for name, expected in local.items():
        got = remote[name]
        if got.shape != expected.shape:
            return {"status": "differ", "max_abs_diff": float("inf"), "worst_output": name}
        diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64)))) if got.size else 0.0
        if diff >= worst:
            worst_name, worst = name, diff
        if not np.allclose(got, expected, rtol=COMPARE_RTOL, atol=COMPARE_ATOL, equal_nan=True):
            ok = False
    return {"status": "match" if ok else "differ", "max_abs_diff": worst, "worst_output": worst_name}
