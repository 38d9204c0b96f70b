"""report.html of `pacs-ai evaluate`: one self-contained page, the figures as tables and the ROC
curve as inline SVG drawn here (no plotting library: the service does not depend on one)."""

from __future__ import annotations

from html import escape
from typing import Any, Callable

SIZE = 320  # the plot's square, in SVG units
MARGIN = 44
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 56em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .4em 0; }
th, td { border: 1px solid #bbb; padding: .2em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.warning { background: #fff3cd; border: 1px solid #e0b000; padding: .5em .8em; margin: .5em 0; }
pre { background: #f4f4f4; padding: .6em .8em; display: inline-block; }
.note { color: #555; }
"""


def render_report(summary: dict[str, Any]) -> str:
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>pacs-ai evaluation</title><style>{STYLE}</style></head><body>",
             "<h1>pacs-ai evaluation on the site's films</h1>"]
    model = summary.get("model", {})
    parts.append(_table(["", ""], [
        ["films", summary.get("labels_source", "")],
        ["model", f"{model.get('name', '?')} {model.get('version', '?')} "
                  f"({model.get('file', '?')})"],
        ["threshold in force", f"{summary['threshold']:.4f} "
                               f"({model.get('threshold_source', '?')})"],
        ["intended age", model.get("intended_age", "not stated")],
        ["created", summary.get("created", "")],
    ], show_header=False))
    for warning in summary["warnings"]:
        parts.append(f"<div class=\"warning\"><b>Warning:</b> {escape(warning)}</div>")
    for note in summary.get("notes", []):
        parts.append(f"<p class=\"note\">{escape(note)}</p>")

    counts, rates = summary["counts"], summary["rates"]
    parts.append("<h2>Films</h2>")
    per_class = counts["per_class"]
    parts.append(_table(["", "films", "classified", "skipped", "of which out-of-distribution",
                         "errors"], [
        [name, per_class[name]["films"], per_class[name]["classified"],
         per_class[name]["skipped"], per_class[name]["abstained"], per_class[name]["errors"]]
        for name in ("normal", "pneumonia")] + [
        ["all", counts["films"], counts["classified"], counts["skipped"],
         counts["skipped_by_reason"].get("out-of-distribution", 0), counts["errors"]]]))
    reasons = ([["skipped: " + code, n, _percent(rates["skipped_by_reason"][code])]
                for code, n in counts["skipped_by_reason"].items()]
               + [["error: " + code, n, _percent(n / counts["films"] if counts["films"] else 0)]
                  for code, n in counts["errors_by_reason"].items()])
    if reasons:
        parts.append(_table(["reason", "films", "share of all films"], reasons))
    parts.append(f"<p>Abstention rate (out-of-distribution): <b>{_percent(rates['abstention'])}"
                 "</b> of the films. The model abstains on a film unlike those it was trained "
                 "on: no finding is sent for it.</p>")

    classified, everything = summary["classified"], summary["all_films"]
    if classified is None:
        parts.append("<p><b>No figures:</b> the films of one class or of both were not "
                     "classified (see the counts above and results.csv).</p>")
    else:
        parts.append(f"<h2>Figures at the threshold in force, {summary['threshold']:.4f}</h2>")
        parts.append(_table(
            ["", f"classified films ({classified['films']})",
             f"all films ({everything['films']}; not reported = wrong)"], [
                ["AUC", _number(classified["roc_auc"]), _number(everything["roc_auc"])],
                ["sensitivity", _with_interval(classified, "sensitivity"),
                 _number(everything["sensitivity"])],
                ["specificity", _with_interval(classified, "specificity"),
                 _number(everything["specificity"])],
                ["accuracy", _number(classified["accuracy"]), _number(everything["accuracy"])]]))
        matrix = everything["confusion_matrix"]["counts"]
        (tn, fp, silent_normal), (fn, tp, silent_pneumonia) = matrix
        parts.append("<p>Confusion matrix (rows: true class; columns: the model's finding)</p>")
        parts.append(_table(["", "normal", "pneumonia", "not reported"], [
            ["true normal", tn, fp, silent_normal], ["true pneumonia", fn, tp, silent_pneumonia]]))
        parts.append("<h2>ROC curve</h2>")
        parts.append(roc_svg(summary))
        proposal = summary["proposed_threshold"]
        parts.append(f"<h2>Proposed site threshold (sensitivity floor "
                     f"{proposal['floor']:g})</h2>")
        parts.append(_table(["", f"threshold in force {summary['threshold']:.4f}",
                             f"proposed {proposal['threshold']:.6f}"], [
            ["sensitivity (classified films)", _with_interval(classified, "sensitivity"),
             _with_interval(proposal, "sensitivity")],
            ["specificity (classified films)", _with_interval(classified, "specificity"),
             _with_interval(proposal, "specificity")],
            ["sensitivity (all films)", _number(everything["sensitivity"]),
             _number(proposal["all_films"]["sensitivity"])],
            ["specificity (all films)", _number(everything["specificity"]),
             _number(proposal["all_films"]["specificity"])]]))
        if summary["too_small"]:
            parts.append("<div class=\"warning\">Not to be relied on: too few films (see the "
                         "warning at the top).</div>")
        rule = proposal["rule"][:1].upper() + proposal["rule"][1:]
        parts.append(f"<p>{escape(rule)}. To use it, add to the service's config "
                     "and restart the service:</p>")
        parts.append(f"<pre>{escape(proposal['config'])}</pre>")
        parts.append("<p class=\"note\">The threshold was chosen on these same films, so on new "
                     "films its sensitivity will usually be a little lower; the more films, the "
                     "closer. The intervals are 95 % Wilson intervals.</p>")
    parts.append("<p class=\"note\">Per film: results.csv. All figures: summary.json.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def unit_square_axes(x: Callable[[float], float], y: Callable[[float], float]) -> list[str]:
    """The SVG of a plot's square from 0 to 1 both ways: its frame, a light grid every 0.2 and
    the tick labels, placed by the plot's own x and y (the ROC here, compare's scatter)."""
    out = [f'<rect x="{x(0)}" y="{y(1)}" width="{x(1) - x(0):g}" height="{y(0) - y(1):g}" '
           'fill="white" stroke="#888"/>']
    for tick in (0.2, 0.4, 0.6, 0.8):
        out.append(f'<line x1="{x(tick)}" y1="{y(0)}" x2="{x(tick)}" y2="{y(1)}" stroke="#eee"/>')
        out.append(f'<line x1="{x(0)}" y1="{y(tick)}" x2="{x(1)}" y2="{y(tick)}" stroke="#eee"/>')
    for tick in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        out.append(f'<text x="{x(tick)}" y="{y(0) + 14}" font-size="10" '
                   f'text-anchor="middle">{tick:.1f}</text>')
        out.append(f'<text x="{x(0) - 5}" y="{y(tick) + 3}" font-size="10" '
                   f'text-anchor="end">{tick:.1f}</text>')
    return out


def roc_svg(summary: dict[str, Any]) -> str:
    """The ROC curves (classified films; all films with those not reported ranked wrong), the
    chance line, and the threshold in force and the proposed one as points."""
    roc = summary["roc"]

    def x(fpr: float) -> float:
        return round(MARGIN + fpr * SIZE, 2)

    def y(tpr: float) -> float:
        return round(MARGIN / 2 + (1 - tpr) * SIZE, 2)

    def polyline(curve: dict[str, list[float]], style: str) -> str:
        points = " ".join(f"{x(f)},{y(t)}" for f, t in zip(curve["fpr"], curve["tpr"]))
        return f'<polyline fill="none" {style} points="{points}"/>'

    width, height = SIZE + MARGIN + 16, SIZE + MARGIN + MARGIN // 2
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="ROC curve">',
           *unit_square_axes(x, y)]
    out.append(f'<text x="{x(0.5)}" y="{y(0) + 30}" font-size="11" text-anchor="middle">'
               '1 - specificity</text>')
    out.append(f'<text x="12" y="{y(0.5)}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 12 {y(0.5)})">sensitivity</text>')
    out.append(f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(1)}" y2="{y(1)}" stroke="#aaa" '
               'stroke-dasharray="3 3"/>')
    out.append(polyline(roc["all_films"], 'stroke="#999" stroke-width="1.5" '
                                          'stroke-dasharray="6 3"'))
    out.append(polyline(roc["classified"], 'stroke="#1f5fa8" stroke-width="2"'))
    classified, proposal = summary["classified"], summary["proposed_threshold"]
    for figures, shape, colour in ((classified, "circle", "#c0392b"),
                                   (proposal, "square", "#1e8449")):
        cx, cy = x(1 - figures["specificity"]), y(figures["sensitivity"])
        if shape == "circle":
            out.append(f'<circle cx="{cx}" cy="{cy}" r="4.5" fill="{colour}"/>')
        else:
            out.append(f'<rect x="{cx - 4}" y="{cy - 4}" width="8" height="8" fill="{colour}"/>')
    legend = [("#1f5fa8", "", f"classified films, AUC {classified['roc_auc']:.3f}"),
              ("#999", ' stroke-dasharray="6 3"',
               f"all films, not reported = wrong, AUC {summary['all_films']['roc_auc']:.3f}")]
    for row, (colour, dash, text) in enumerate(legend):
        ly = y(0) - 48 + row * 15
        out.append(f'<line x1="{x(0.38)}" y1="{ly - 4}" x2="{x(0.46)}" y2="{ly - 4}" '
                   f'stroke="{colour}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{x(0.48)}" y="{ly}" font-size="10">{escape(text)}</text>')
    ly = y(0) - 18
    out.append(f'<circle cx="{x(0.42)}" cy="{ly - 4}" r="4" fill="#c0392b"/>')
    out.append(f'<text x="{x(0.48)}" y="{ly}" font-size="10">threshold in force '
               f'{summary["threshold"]:.4f}</text>')
    out.append(f'<rect x="{x(0.42) - 4}" y="{ly + 7}" width="8" height="8" fill="#1e8449"/>')
    out.append(f'<text x="{x(0.48)}" y="{ly + 15}" font-size="10">proposed '
               f'{proposal["threshold"]:.6f}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _table(header: list[str], rows: list[list[Any]], show_header: bool = True) -> str:
    """A table of plain values; every cell is escaped here."""
    lines = ["<table>"]
    if show_header:
        lines.append("<tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        lines.append("<tr>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in row) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _percent(value: float) -> str:
    return f"{value:.1%}"


def _with_interval(figures: dict[str, Any], key: str) -> str:
    interval = figures.get(f"{key}_ci95")
    text = _number(figures[key])
    return text if interval is None else f"{text} ({interval[0]:.2f}-{interval[1]:.2f})"
