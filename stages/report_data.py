"""The compare stage's checks as records for the report's verdict chart (``dvc plots``).

``metrics/compare.json`` keeps one flat key per check field, which is what ``dvc metrics diff``
compares; a chart needs one record per check. ``verdict_rows`` makes those records and
``write_verdict_rows`` writes them as a JSON list, declared in dvc.yaml as a plot drawn by the
``verdict`` template (``.dvc/plots/verdict.json``). Fields of each record (stable):

- ``check``: the check's name (``voc_fp32.map``; a floor is ``<metric>/<reference>``),
  ``kind`` (``target`` or ``floor``), ``metric``, ``label`` (the check for people);
- ``value``, ``target`` (target value, or the reference's value for a floor), ``delta``
  (value - target), ``tolerance``, ``status`` (``pass``, ``fail``, ``missing``, ``info``: an
  informational target, shown, never judged), ``note``;
- ``threshold``: the value below (above) which the check fails (null for a two-sided check),
  ``rule``: what must hold, for people (``≥ 85``, ``≤ 12``, ``25.1 ± 0.2``);
- ``headroom``: how far the value is from failing, in the metric's unit (positive passes,
  negative fails), and ``headroom_pct``, the same in percent of the target, so checks in
  different units (mAP in percent, accuracy as a fraction) share one axis.

Unknown numbers are null. The module only shapes rows; it judges nothing (compare does).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from stages.common import round_floats, write_json

DIRECTIONS = ("higher", "lower", "both")


def headroom(delta: float | None, tolerance: float | None, direction: str) -> float | None:
    """Distance from failing in the metric's unit: > 0 passes by that much, < 0 fails."""
    if delta is None or tolerance is None:
        return None
    if direction == "higher":
        return delta + tolerance
    if direction == "lower":
        return tolerance - delta
    return tolerance - abs(delta)


def threshold_rule(target: float | None, tolerance: float | None,
                   direction: str) -> tuple[float | None, str]:
    """The failing boundary and the rule as text (``≥ 84.5``, ``≤ 12``, ``25.1 ± 0.2``)."""
    if target is None or tolerance is None:
        return None, ""
    if direction == "higher":
        return target - tolerance, f"≥ {target - tolerance:.6g}"
    if direction == "lower":
        return target + tolerance, f"≤ {target + tolerance:.6g}"
    return None, f"{target:.6g} ± {tolerance:.6g}"  # two boundaries: no single threshold


def verdict_rows(rows: Iterable[Any], directions: Mapping[str, str]) -> list[dict[str, Any]]:
    """One record per check (a ``stages.compare.Row``). ``directions`` maps a target's metric to
    its direction; floors (and anything not listed) are ``higher``, as compare judges them."""
    records = []
    for row in rows:
        direction = directions.get(row.metric, "higher") if row.kind == "target" else "higher"
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r} for {row.metric}")
        room = headroom(row.delta, row.tolerance, direction)
        threshold, rule = threshold_rule(row.target, row.tolerance, direction)
        if row.status == "info":  # shown with its delta, never judged: no boundary to near
            room, threshold, rule = None, None, "informational"
        if row.kind == "floor":
            label = row.name.replace("/", " vs ") + " (floor)"
        else:
            label = row.name
        pct = None
        if room is not None and row.target:
            pct = 100.0 * room / abs(row.target)
        records.append({
            "check": row.name, "kind": row.kind, "metric": row.metric, "label": label,
            "value": row.value, "target": row.target, "delta": row.delta,
            "tolerance": row.tolerance, "status": row.status, "threshold": threshold,
            "rule": rule, "headroom": room, "headroom_pct": pct, "note": row.note,
        })
    # + 0.0 turns a rounded -0.0 into 0.0, so an exact hit always reads the same
    return [{k: v + 0.0 if isinstance(v, float) else v for k, v in rec.items()}
            for rec in round_floats(records)]


def write_verdict_rows(path: str | Path, rows: Sequence[Any], targets: Iterable[Any]) -> None:
    """Write ``verdict_rows`` of compare's ``rows`` (directions from its ``targets``)."""
    write_json(path, verdict_rows(rows, {t.metric: t.direction for t in targets}))
