"""The report: per site what was rewritten and its measured error; end to end the output
drift and latency before and after. JSON for machines, a table for people."""

from __future__ import annotations

import json


def table(report: dict) -> str:
    """A plain-text summary of ``report``."""
    lines = [f"kernelize report: {report['model']}  (recipe {report['recipe']}, backend {report['backend']})", ""]
    header = f"{'site':<18} {'pattern':<22} {'rewrite':<26} {'max abs err':>12}  details"
    lines += [header, "-" * len(header)]
    for site in report["sites"]:
        err = site.get("max_abs_error")
        err_text = "-" if err is None else f"{err:.2e}"
        details = ", ".join(f"{k}={_short(v)}" for k, v in site.items()
                            if k in ("heads", "head_size", "mask", "activation", "residual", "projections", "note"))
        lines.append(f"{site['id']:<18} {site['pattern']:<22} {site['rewrite']:<26} {err_text:>12}  {details}")
    counts = report["summary"]["sites"]
    lines += ["", "sites: " + ", ".join(f"{k} {v}" for k, v in counts.items())]
    if report.get("near_misses"):
        lines += ["", "near misses (not rewritten):"]
        for miss in report["near_misses"]:
            lines.append(f"  {miss['pattern']} at {miss['node']}: {miss['reason']}")
    for rewrite in report.get("custom_rewrites", []):
        lines.append(f"custom rewrite {rewrite['name']}: {rewrite['status']} ({rewrite['detail']})")
    if report.get("approximate"):
        lines += ["", approximate_table(report["approximate"])]
    e2e = report.get("end_to_end")
    if e2e:
        worst = max(e2e["outputs"].values()) if e2e["outputs"] else 0.0
        lines += ["", f"end to end: max abs error {worst:.2e} over shapes {e2e['shapes']}"]
    lat = report.get("latency")
    if lat:
        lines.append(f"latency (batch {lat['batch']}, seq {lat['seq']}, {lat['threads']} thread(s), median of "
                     f"{lat['before']['runs']}): before {lat['before']['median_ms']:.2f} ms, after "
                     f"{lat['after']['median_ms']:.2f} ms, speedup {lat['speedup']:.2f}x")
        lines += [f"  {lat[key]}" for key in ("note", "warning") if lat.get(key)]
    return "\n".join(lines) + "\n"


def summary(report: dict, path=None) -> str:
    """The end of ``optimize``: what changed, the error, the speed, the size, where the artifact is."""
    counts = report.get("summary", {}).get("sites", {})
    fused = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no site"
    lines = ["summary:", f"  changed: {fused} fused"]
    approx = report.get("approximate")
    if approx:
        chosen = approx.get("chosen") or {}
        methods: dict[str, int] = {}
        for method in chosen.values():
            methods[method] = methods.get(method, 0) + 1
        taken = ", ".join(f"{m} x{n}" for m, n in methods.items())
        lines.append(f"  approximate: {len(chosen)} of {len(approx.get('sites', []))} site(s) rewritten"
                     + (f" ({taken}); held-out {approx['metric']} {approx.get('held_out_error', 0.0):.3g}"
                        + (f" of {approx['max_error']:g} allowed" if approx.get("max_error") is not None else "")
                        if chosen else ""))
    e2e = report.get("end_to_end")
    if e2e and e2e.get("outputs"):
        lines.append(f"  error: max abs {max(e2e['outputs'].values()):.2e} against the original")
    lat = report.get("latency")
    if lat:
        lines.append(f"  speed: {lat['before']['median_ms']:.2f} ms -> {lat['after']['median_ms']:.2f} ms "
                     f"({lat['speedup']:.2f}x; batch {lat['batch']}, seq {lat['seq']})")
    size = report.get("size")
    if size:
        after = size.get("artifact_model_bytes", size.get("optimized_onnx_bytes"))
        before = size.get("original_onnx_bytes")
        lines.append(f"  size: {bytes_text(before) if before is not None else '-'} -> {bytes_text(after)}"
                     + (" (compiled library)" if "artifact_model_bytes" in size and report.get("backend") == "tvm"
                        else ""))
    if path is not None:
        lines.append(f"  artifact: {path}  (report.html, report.json, manifest.json)")
    return "\n".join(lines)


def bytes_text(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def approximate_table(section: dict) -> str:
    """Per site and candidate: site error, end-to-end error, estimated and measured speed."""
    budget = section.get("max_error")
    lines = [f"approximate rewrites ({section['mode']}; metric {section['metric']}"
             + (f" <= {budget:g}" if budget is not None else "") + f"; calibration {section['calibration']})"]
    header = (f"  {'site':<16} {'layer':>5}  {'method':<18} {'site err':>9} {'e2e err':>9} {'est x':>7} "
              f"{'meas x':>7}  status")
    lines += [header, "  " + "-" * (len(header) - 2)]
    for site in section.get("sites", []):
        for c in site["candidates"]:
            mark = "*" if site.get("chosen") == c["method"] else " "
            if c["status"] == "not applicable":
                lines.append(f" {mark}{site['id']:<16} {_num(site['layer'], 'd'):>5}  {c['method']:<18} "
                             f"{'-':>9} {'-':>9} {'-':>7} {'-':>7}  {c['reason']}")
                continue
            lines.append(f" {mark}{site['id']:<16} {_num(site['layer'], 'd'):>5}  {c['method']:<18} "
                         f"{_num(c['site_error']):>9} {_num(c['end_to_end_error']):>9} "
                         f"{_num(c['estimated_speedup'], '.2f'):>7} {_num(c['measured_speedup'], '.2f'):>7}  "
                         f"{c['status']}")
        if site.get("chosen") is None and site.get("why_exact") not in (None, "inspection only"):
            lines.append(f"  {site['id']:<16} stays exact: {site['why_exact']}")
    for b in section.get("backed_off", []):
        lines.append(f"  backed off: {b['method']} at {b['site']} (combined error {b['combined_error']:.3g})")
    lines.append(f"  {section.get('summary', '')}")
    return "\n".join(lines)


def _num(value, fmt: str = ".3g") -> str:
    return "-" if value is None else format(value, fmt)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False, default=str)
