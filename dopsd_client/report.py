"""A job's evaluation report (`job["report"]`, the service's `report.json`) and its `evaluated` events as a few
readable lines: the two verdicts with their summaries, then one line per figure. Works on the API's JSON only (the
client imports no project code), in the same words as the service's own text."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


# The two axes of a report, in the order they are printed, with their names for people.
AXES = (("concept", "concept"), ("few_step_quality", "few-step quality"))


def _mapping(value: Any) -> Mapping[str, Any]:
    """`value` if it is a JSON object, else an empty one (a field the service left out or set to null)."""
    return value if isinstance(value, Mapping) else {}


def _number(x: Any) -> str:
    """A figure's number with three significant digits (`-` when there is none)."""
    return f"{x:.3g}" if isinstance(x, int | float) and not isinstance(x, bool) else "-"


def verdict_lines(verdicts: Mapping[str, Any]) -> list[str]:
    """`concept: learned - <summary>` and `few-step quality: kept - <summary>` (axes the mapping lacks are left
    out)."""
    lines = []
    for key, label in AXES:
        axis = verdicts.get(key)
        if not isinstance(axis, Mapping):
            continue
        summary = f" - {axis['summary']}" if axis.get("summary") else ""
        lines.append(f"{label}: {axis.get('verdict', 'unknown')}{summary}")
    return lines


def figure_line(name: str, figure: Mapping[str, Any]) -> str:
    """One figure: `  Title: mean [low, high] unit, noise floor x -> verdict`, or why it was not measured."""
    title = figure.get("title") or name
    if figure.get("not_measured"):
        return f"  {title}: not measured ({figure['not_measured']})"
    ci = figure.get("ci95")
    interval = f" [{_number(ci[0])}, {_number(ci[1])}]" if isinstance(ci, list | tuple) and len(ci) == 2 else ""
    unit = f" {figure['unit']}" if figure.get("unit") else ""
    floor = f", noise floor {_number(figure['noise_floor'])}" if figure.get("noise_floor") is not None else ""
    return f"  {title}: {_number(figure.get('mean'))}{interval}{unit}{floor} -> {figure.get('verdict') or '?'}"


def report_lines(report: Mapping[str, Any]) -> list[str]:
    """The report as lines for a terminal: what was evaluated, the two verdicts, then each figure."""
    setting = _mapping(report.get("setting"))
    kind = "quick check" if report.get("quick") else "evaluation"
    seeds = setting.get("seeds") or []
    bits = [f"{len(seeds)} seed(s)"] if seeds else []
    if setting.get("num_steps"):
        bits.append(f"{setting['num_steps']} steps")
    if setting.get("width") and setting.get("height"):
        bits.append(f"{setting['width']}x{setting['height']}")
    head = f"{kind} at step {report.get('step', '?')}" + (f": {', '.join(bits)}" if bits else "")
    verdicts = _mapping(report.get("verdicts"))
    figures = _mapping(report.get("figures"))
    lines = [head, *verdict_lines(verdicts)]
    lines += [figure_line(name, fig) for name, fig in figures.items() if isinstance(fig, Mapping)]
    return lines


def evaluated_summary(data: Mapping[str, Any]) -> str:
    """An `evaluated` event in one line: `quick check at step 4: concept learned, few-step quality kept`."""
    verdicts = _mapping(data.get("verdicts"))
    words = [(label, _mapping(verdicts.get(key)).get("verdict")) for key, label in AXES]
    parts = [f"{label} {word}" for label, word in words if word]
    kind = "quick check" if data.get("quick") else "evaluation"
    return f"{kind} at step {data.get('step', '?')}" + (f": {', '.join(parts)}" if parts else "")


__all__ = ["evaluated_summary", "figure_line", "report_lines", "verdict_lines"]
