"""``report.html``: the report as a page a person opens, self-contained (no network: the
plots are PNG images embedded as base64, the style is inline).

Drawn from the same dict as ``report.json`` (:func:`kernelize.pipeline.report`), with
matplotlib's Agg canvas (no display, no global pyplot state):

- per approximate site, each candidate's end-to-end error against the time it saves, the
  chosen one marked, the error budget as a line;
- latency before and after (median, p10-p90);
- bytes before and after (the ONNX model; for TVM also the compiled library);
- the per-site tables (fused sites; approximate candidates).
"""

from __future__ import annotations

import base64
import html
import io
import math

from kernelize import report as report_mod

PLOT_DPI = 96
COLUMNS = 4  # approximate-site plots per row


def render(report: dict) -> str:
    """The page for ``report`` (a report dict as written to report.json)."""
    title = f"kernelize report: {report.get('model', '')}"
    parts = [f"<h1>{_e(title)}</h1>",
             f"<p class=\"meta\">recipe <b>{_e(report.get('recipe'))}</b>, backend <b>{_e(report.get('backend'))}</b>"
             + (f", target <b>{_e(report['tvm']['target'])}</b>" if report.get("tvm") else "") + "</p>",
             "<pre class=\"summary\">" + _e(report_mod.summary(report)) + "</pre>"]
    parts += _approximate_part(report.get("approximate"))
    parts.append("<h2>Latency</h2>")
    lat = report.get("latency")
    if lat:
        parts.append(_img("plot-latency", "latency before and after", _latency_png(lat)))
        parts += [f"<p class=\"note\">{_e(lat[k])}</p>" for k in ("note", "warning") if lat.get(k)]
    else:
        parts.append("<p id=\"no-latency\">Latency was not measured in this run (--no-latency, or code built for "
                     "another machine).</p>")
    parts.append("<h2>Size</h2>")
    size = report.get("size")
    if size:
        parts.append(_img("plot-bytes", "model bytes before and after", _bytes_png(size)))
    else:
        parts.append("<p>No size recorded.</p>")
    parts += ["<h2>Sites</h2>", _sites_table(report)]
    e2e = report.get("end_to_end")
    if e2e and e2e.get("outputs"):
        rows = "".join(f"<tr><td>{_e(k)}</td><td>{v:.3g}</td></tr>" for k, v in e2e["outputs"].items())
        parts += ["<h2>End to end</h2>",
                  f"<p>Max abs error against the original, over the shapes {_e(e2e.get('shapes'))}.</p>",
                  f"<table id=\"end-to-end\"><tr><th>output</th><th>max abs error</th></tr>{rows}</table>"]
    return _PAGE.format(title=_e(title), style=_STYLE, body="\n".join(parts), script=_SCRIPT)


# ----------------------------------------------------------------------------- sections

def _approximate_part(section: dict | None) -> list[str]:
    parts = ["<h2>Approximate rewrites</h2>"]
    if not section:
        return parts + ["<p id=\"no-approximate\">There were no approximate sites: this run used exact rewrites "
                        "only (recipe exact), so every output matches the original up to float rounding.</p>"]
    sites = [s for s in section.get("sites", []) if any(c.get("status") != "not applicable"
                                                         for c in s.get("candidates", []))]
    budget = section.get("max_error")
    parts.append(f"<p>Metric {_e(section.get('metric'))}"
                 + (f", budget {budget:g}" if budget is not None else ", no budget (rewrites as named)")
                 + f"; calibration {_e(section.get('calibration'))}. {_e(section.get('summary', ''))}</p>")
    if not sites:
        return parts + ["<p id=\"no-approximate\">There were no approximate sites with a fitted candidate.</p>"]
    parts.append("<p>Each panel is one site: every candidate's end-to-end error (y) against the milliseconds it "
                 "saves at batch 1 (x); the chosen candidate is the star, the dashed line is the budget. "
                 "Crosses were not run end to end (no gain, or a hopeless site error): they sit at their site "
                 "error.</p>")
    parts.append(_img("plot-sites", "error against time saved, per approximate site",
                      _sites_png(sites, budget)))
    rows = []
    for s in section.get("sites", []):
        for c in s.get("candidates", []):
            chosen = s.get("chosen") == c["method"]
            rows.append("<tr" + (" class=\"chosen\"" if chosen else "") + ">" + "".join(
                f"<td>{v}</td>" for v in (_e(s["id"]), _e(s.get("layer")), _e(c["method"]),
                                          _num(c.get("site_error")), _num(c.get("end_to_end_error")),
                                          _num(c.get("saved_ms"), ".3f"), _num(c.get("measured_speedup"), ".2f"),
                                          "yes" if chosen else "",
                                          _e(c.get("reason") or c.get("status", ""))))
                        + "</tr>")
    header = "".join(f"<th>{h}</th>" for h in ("site", "layer", "method", "site error", "end-to-end error",
                                              "ms saved", "speedup", "chosen", "status"))
    parts.append(f"<table id=\"candidates\"><tr>{header}</tr>{''.join(rows)}</table>")
    return parts


def _sites_table(report: dict) -> str:
    header = "".join(f"<th>{h}</th>" for h in ("site", "pattern", "rewrite", "max abs error"))
    rows = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in (
        _e(s.get("id")), _e(s.get("pattern")), _e(s.get("rewrite")), _num(s.get("max_abs_error"), ".2e"))) + "</tr>"
        for s in report.get("sites", []))
    if not rows:
        rows = "<tr><td colspan=\"4\">no site found</td></tr>"
    return f"<table id=\"sites\"><tr>{header}</tr>{rows}</table>"


# ----------------------------------------------------------------------------- plots

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=PLOT_DPI)
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    return buffer.getvalue()


def _sites_png(sites: list[dict], budget: float | None) -> bytes:
    from matplotlib.ticker import MaxNLocator

    cols = min(COLUMNS, len(sites))
    rows = math.ceil(len(sites) / cols)
    figure = _figure(3.4 * cols, 2.7 * rows)
    for index, site in enumerate(sites):
        ax = figure.add_subplot(rows, cols, index + 1)
        run, skipped, chosen = [], [], None
        for c in site["candidates"]:
            if c.get("status") == "not applicable" or c.get("saved_ms") is None:
                continue
            if c.get("end_to_end_error") is not None:
                run.append(c)
                if site.get("chosen") == c["method"]:
                    chosen = c
            elif c.get("site_error") is not None:
                skipped.append(c)
        if run:
            ax.scatter([c["saved_ms"] for c in run], [c["end_to_end_error"] for c in run], s=28, color="#3b6ea8",
                       zorder=3, label="candidate")
        if skipped:
            ax.scatter([c["saved_ms"] for c in skipped], [c["site_error"] for c in skipped], s=28, marker="x",
                       color="#999999", zorder=2, label="not run end to end")
        if chosen is not None:
            ax.scatter([chosen["saved_ms"]], [chosen["end_to_end_error"]], s=180, marker="*", color="#e0861a",
                       edgecolor="black", linewidths=0.6, zorder=4, label="chosen")
        for c in run + skipped:
            y = c["end_to_end_error"] if c.get("end_to_end_error") is not None else c["site_error"]
            ax.annotate(c["method"].split(":", 1)[-1], (c["saved_ms"], y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        if budget is not None and math.isfinite(budget):
            ax.axhline(budget, color="#c0392b", linestyle="--", linewidth=1, label="budget")
        ax.axvline(0, color="#bbbbbb", linewidth=0.8)
        ys = [c["end_to_end_error"] for c in run] + [c["site_error"] for c in skipped]
        if ys and min(ys) > 0 and max(ys) / min(ys) > 50:
            ax.set_yscale("log")
        ax.set_title(f"{site['id']} ({site.get('name', site.get('kind', ''))})"[:48], fontsize=8)
        ax.set_xlabel("ms saved (batch 1)", fontsize=7)
        ax.set_ylabel("end-to-end error", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        if index == 0:
            ax.legend(fontsize=6, loc="best")
    figure.tight_layout()
    return _png(figure)


def _latency_png(lat: dict) -> bytes:
    figure = _figure(4.8, 2.8)
    ax = figure.add_subplot(1, 1, 1)
    labels = ["before", f"after ({lat.get('after_engine', '')})"]
    stats = [lat["before"], lat["after"]]
    medians = [s["median_ms"] for s in stats]
    low = [s["median_ms"] - s.get("p10_ms", s["median_ms"]) for s in stats]
    high = [s.get("p90_ms", s["median_ms"]) - s["median_ms"] for s in stats]
    bars = ax.bar(labels, medians, yerr=[low, high], capsize=6, color=["#9aa7b4", "#3b6ea8"])
    for rect, value in zip(bars, medians):
        ax.annotate(f"{value:.2f} ms", (rect.get_x() + rect.get_width() / 2, value), ha="center",
                    xytext=(0, 4), textcoords="offset points", fontsize=8)
    ax.set_ylabel("median ms (p10-p90)", fontsize=8)
    ax.set_title(f"latency, batch {lat['batch']}, seq {lat['seq']}, {lat['threads']} thread(s): "
                 f"{lat['speedup']:.2f}x", fontsize=9)
    ax.tick_params(labelsize=8)
    figure.tight_layout()
    return _png(figure)


def _bytes_png(size: dict) -> bytes:
    figure = _figure(4.8, 2.8)
    ax = figure.add_subplot(1, 1, 1)
    bars_of = [("original ONNX", size.get("original_onnx_bytes")), ("optimized ONNX", size.get("optimized_onnx_bytes"))]
    if size.get("artifact_model") not in (None, "model.onnx"):
        bars_of.append((size["artifact_model"], size.get("artifact_model_bytes")))
    labels = [label for label, value in bars_of if value is not None]
    values = [value for label, value in bars_of if value is not None]
    mb = [v / 1e6 for v in values]
    bars = ax.bar(labels, mb, color=["#9aa7b4", "#3b6ea8", "#5b9b5b"][:len(mb)])
    for rect, value in zip(bars, values):
        ax.annotate(report_mod.bytes_text(value), (rect.get_x() + rect.get_width() / 2, value / 1e6), ha="center",
                    xytext=(0, 4), textcoords="offset points", fontsize=8)
    ax.set_ylabel("MB", fontsize=8)
    ax.set_title("model bytes", fontsize=9)
    ax.tick_params(labelsize=8)
    figure.tight_layout()
    return _png(figure)


# ----------------------------------------------------------------------------- page

def _img(element_id: str, alt: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img class=\"plot\" id=\"{element_id}\" alt=\"{_e(alt)}\" src=\"data:image/png;base64,{data}\">"


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _num(value, fmt: str = ".3g") -> str:
    return "-" if value is None else format(value, fmt)


_STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; border-bottom: 1px solid #ddd; }
pre.summary { background: #f5f7fa; padding: 10px; border: 1px solid #dde3ea; }
table { border-collapse: collapse; font-size: 12px; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
tr.chosen td { background: #fff1dc; font-weight: bold; }
img.plot { display: block; margin: 8px 0; max-width: 100%; }
p.note { color: #a05a00; }
"""

# Records, once the page has loaded, how many plots decoded (the browser test reads it).
_SCRIPT = """
window.addEventListener("load", function () {
  var plots = document.querySelectorAll("img.plot");
  var shown = 0;
  plots.forEach(function (img) { if (img.complete && img.naturalWidth > 0) { shown += 1; } });
  document.body.setAttribute("data-plots", plots.length);
  document.body.setAttribute("data-plots-rendered", shown);
});
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
{body}
<script>{script}</script>
</body>
</html>
"""
