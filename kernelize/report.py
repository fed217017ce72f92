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
    e2e = report.get("end_to_end")
    if e2e:
        worst = max(e2e["outputs"].values()) if e2e["outputs"] else 0.0
        lines += ["", f"end to end: max abs error {worst:.2e} over shapes {e2e['shapes']}"]
    lat = report.get("latency")
    if lat:
        lines.append(f"latency (batch {lat['batch']}, seq {lat['seq']}, {lat['threads']} thread(s), median of "
                     f"{lat['before']['runs']}): before {lat['before']['median_ms']:.2f} ms, after "
                     f"{lat['after']['median_ms']:.2f} ms, speedup {lat['speedup']:.2f}x")
    return "\n".join(lines) + "\n"


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False, default=str)
