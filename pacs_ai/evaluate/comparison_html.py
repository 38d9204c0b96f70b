"""report.html and scatter.svg of `pacs-ai compare`: the figures as tables and each film's
probability under the live model (across) and the shadow model (up), drawn here as SVG (the
service depends on no plotting library)."""

from __future__ import annotations

from html import escape
from typing import Any

from pacs_ai.evaluate.evaluation_html import (STYLE, _number, _percent, _table, _with_interval,
                                              unit_square_axes)

SIZE = 360  # the plot's square, in SVG units
MARGIN = 48
# a film's point: its colour says what the shadow changed, a ring that either model abstained
COLOURS = {"same": "#7f8c8d", "normal_to_pneumonia": "#d35400",
           "pneumonia_to_normal": "#1f5fa8", "abstention": "#8e44ad"}
LEGEND = {"same": "same finding", "normal_to_pneumonia": "normal -> pneumonia",
          "pneumonia_to_normal": "pneumonia -> normal",
          "abstention": "abstained by one or both (ring)"}


def _change(row: dict[str, Any]) -> str:
    live, shadow = row["live_outcome"], row["shadow_outcome"]
    if "abstained" in (live, shadow):
        return "abstention"
    if live == shadow:
        return "same"
    return f"{live}_to_{shadow}"


def scatter_svg(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Live probability across, shadow probability up, one point per film; the two thresholds
    in force as dashed lines (the latest, where they changed)."""
    def x(p: float) -> float:
        return round(MARGIN + p * SIZE, 2)

    def y(p: float) -> float:
        return round(MARGIN / 2 + (1 - p) * SIZE, 2)

    width, height = SIZE + MARGIN + 190, SIZE + MARGIN + MARGIN // 2
    live, shadow = summary.get("live") or {}, summary.get("shadow") or {}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" '
           'aria-label="probability of pneumonia, live model against shadow model">',
           *unit_square_axes(x, y)]
    live_name = escape(f"{live.get('name', 'live')} {live.get('version', '')}".strip())
    shadow_name = escape(f"{shadow.get('name', 'shadow')} {shadow.get('version', '')}".strip())
    out.append(f'<text x="{x(0.5)}" y="{y(0) + 32}" font-size="11" text-anchor="middle">'
               f'live: {live_name}</text>')
    out.append(f'<text x="14" y="{y(0.5)}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 14 {y(0.5)})">shadow: {shadow_name}</text>')
    out.append(f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(1)}" y2="{y(1)}" stroke="#ccc"/>')
    if live.get("thresholds"):
        t = live["thresholds"][-1]
        out.append(f'<line x1="{x(t)}" y1="{y(0)}" x2="{x(t)}" y2="{y(1)}" stroke="#555" '
                   'stroke-dasharray="4 3"/>')
    if shadow.get("thresholds"):
        t = shadow["thresholds"][-1]
        out.append(f'<line x1="{x(0)}" y1="{y(t)}" x2="{x(1)}" y2="{y(t)}" stroke="#555" '
                   'stroke-dasharray="4 3"/>')
    for row in rows:
        change = _change(row)
        cx, cy = x(row["live_probability"]), y(row["shadow_probability"])
        colour = COLOURS[change]
        if change == "abstention":
            out.append(f'<circle cx="{cx}" cy="{cy}" r="3.5" fill="none" stroke="{colour}" '
                       'stroke-width="1.5"/>')
        else:
            out.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="{colour}" '
                       'fill-opacity="0.75"/>')
    for index, (change, text) in enumerate(LEGEND.items()):
        ly = y(1) + 12 + index * 16
        lx = x(1) + 14
        if change == "abstention":
            out.append(f'<circle cx="{lx}" cy="{ly - 4}" r="3.5" fill="none" '
                       f'stroke="{COLOURS[change]}" stroke-width="1.5"/>')
        else:
            out.append(f'<circle cx="{lx}" cy="{ly - 4}" r="3" fill="{COLOURS[change]}"/>')
        out.append(f'<text x="{lx + 9}" y="{ly}" font-size="10">{escape(text)}</text>')
    ly = y(1) + 12 + len(LEGEND) * 16
    out.append(f'<line x1="{x(1) + 9}" y1="{ly - 4}" x2="{x(1) + 19}" y2="{ly - 4}" '
               'stroke="#555" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{x(1) + 23}" y="{ly}" font-size="10">thresholds in force</text>')
    out.append("</svg>")
    return "\n".join(out)


def render_report(summary: dict[str, Any], scatter: str) -> str:
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>pacs-ai compare</title><style>{STYLE}</style></head><body>",
             "<h1>pacs-ai: the live model and the shadow model on the same films</h1>"]
    live, shadow = summary.get("live"), summary.get("shadow")
    if live is None:
        parts.append("<p><b>No films to compare:</b> the job queue holds no shadow results "
                     "for the films chosen.</p></body></html>\n")
        return "\n".join(parts)
    period = summary.get("period", {})
    parts.append(_table(["", ""], [
        ["live model", f"{live['name']} {live['version']} (sha256 {live['sha256'][:12]}...)"],
        ["shadow model", f"{shadow['name']} {shadow['version']} "
                         f"(sha256 {shadow['sha256'][:12]}...)"],
        ["thresholds", f"live {_thresholds(live)}, shadow {_thresholds(shadow)}"],
        ["films both assessed", summary["films"]],
        ["received", f"{period.get('first_received', '-')} to "
                     f"{period.get('last_received', '-')}"],
        ["created", summary.get("created", "")]], show_header=False))
    if summary["not_assessed"]:
        missed = ", ".join(f"{status} {count}" for status, count
                           in summary["not_assessed"].items())
        parts.append(f"<p class=\"note\">Films the live model assessed and the shadow did not "
                     f"(left out): {escape(missed)}.</p>")
    for note in summary.get("notes", []):
        parts.append(f"<p class=\"note\">{escape(note)}</p>")
    if summary["films"]:
        rates, flips = summary["rates"], summary["flips"]
        parts.append("<h2>Agreement</h2>")
        parts.append(_table(["", ""], [
            ["same outcome (pneumonia, normal or abstained)", _percent(summary["agreement"])],
            ["normal -> pneumonia (live -> shadow)", flips["normal_to_pneumonia"]],
            ["pneumonia -> normal", flips["pneumonia_to_normal"]],
            ["reported by live, abstained by shadow",
             summary["abstention_changes"]["reported_to_abstained"]],
            ["abstained by live, reported by shadow",
             summary["abstention_changes"]["abstained_to_reported"]]], show_header=False))
        counts = summary["outcomes"]["counts"]
        parts.append("<p>Outcomes (rows: live model; columns: shadow model)</p>")
        parts.append(_table(["live \\ shadow", "pneumonia", "normal", "abstained"],
                            [[name] + [counts[name][other] for other in counts[name]]
                             for name in counts]))
        parts.append("<h2>Rates</h2>")
        parts.append(_table(["", "live", "shadow"], [
            ["positive rate (pneumonia of the films reported on)",
             _share(rates["live"]["positive_rate"]), _share(rates["shadow"]["positive_rate"])],
            ["abstention rate (of all films)", _share(rates["live"]["abstention_rate"]),
             _share(rates["shadow"]["abstention_rate"])],
            ["films reported as pneumonia", rates["live"]["pneumonia"],
             rates["shadow"]["pneumonia"]],
            ["films reported as normal", rates["live"]["normal"], rates["shadow"]["normal"]],
            ["films abstained on", rates["live"]["abstained"], rates["shadow"]["abstained"]]]))
        parts.append("<h2>Probability of pneumonia, film by film</h2>")
        parts.append(scatter)
    labels = summary.get("labels")
    if labels is not None:
        parts.append("<h2>On the site's labelled films</h2>")
        parts.append(f"<p>{labels['films']} of the films both assessed are labelled "
                     f"({labels['normal']} normal, {labels['pneumonia']} pneumonia; "
                     f"{escape(labels['source'])}).</p>")
        for note in labels["notes"]:
            parts.append(f"<p class=\"note\">{escape(note)}</p>")
        if labels["live"] and labels["live"]["computed"] and labels["shadow"]["computed"]:
            live_fig, shadow_fig = labels["live"], labels["shadow"]
            parts.append(_table(["", f"live (threshold {live_fig['threshold']:.4f})",
                                 f"shadow (threshold {shadow_fig['threshold']:.4f})"], [
                ["sensitivity (films reported on)",
                 _with_interval(live_fig["reported"], "sensitivity"),
                 _with_interval(shadow_fig["reported"], "sensitivity")],
                ["specificity (films reported on)",
                 _with_interval(live_fig["reported"], "specificity"),
                 _with_interval(shadow_fig["reported"], "specificity")],
                ["AUC (films reported on)", _number(live_fig["reported"]["roc_auc"]),
                 _number(shadow_fig["reported"]["roc_auc"])],
                ["sensitivity (all; abstained = wrong)",
                 _number(live_fig["all_films"]["sensitivity"]),
                 _number(shadow_fig["all_films"]["sensitivity"])],
                ["specificity (all; abstained = wrong)",
                 _number(live_fig["all_films"]["specificity"]),
                 _number(shadow_fig["all_films"]["specificity"])],
                ["abstained on", live_fig["abstained"], shadow_fig["abstained"]]]))
            if live_fig["too_small"] or shadow_fig["too_small"]:
                parts.append("<div class=\"warning\">Too few labelled films to trust these "
                             "figures: at least 50 of each class are needed.</div>")
        else:
            parts.append("<p>No figures: the labelled films do not include films of both "
                         "classes that each model reported on.</p>")
    if summary.get("other_pairs"):
        parts.append("<h2>Other model pairs in the queue (not compared here)</h2>")
        parts.append(_table(["live", "shadow", "films"], [
            [pair["live"], pair["shadow"], pair["films"]] for pair in summary["other_pairs"]]))
    parts.append("<p class=\"note\">Per film: films.csv. All figures: summary.json. The "
                 "shadow's findings were never reported; intervals are 95 % Wilson "
                 "intervals.</p></body></html>\n")
    return "\n".join(parts)


def _thresholds(model: dict[str, Any]) -> str:
    return ", ".join(f"{t:.4f}" for t in model["thresholds"])


def _share(value: float | None) -> str:
    return "n/a" if value is None else _percent(value)
