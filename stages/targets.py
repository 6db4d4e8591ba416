"""Targets, floors and how metrics are judged against them: shared by compare and the gate.

A metric is named ``<file>.<key>`` (stages/metrics_files.py). Targets and floors are mappings
keyed by a name (``compare.targets.coco_fp32_seed``), so ``dvc params diff`` says which one
changed and ``dvc exp run -S compare.targets.<name>.value=...`` sets one. Targets are absolute
(value ± tolerance, in the metric's own unit) and may apply only when some params hold
(``when: {convert.coco.head: gluoncv}``), so one metric can have a target per configuration.
Floors are relative: ``metric >= ratio * reference - margin`` of the same run. An
``informational`` target is shown with its delta (status ``info``) but never passes or fails
anything: the seed's training accuracy is such a value (README "Targets").

Fails closed: a ``when`` naming a key params.yaml lacks, a value the param can never take
(checked against stages/choices.py where the param is a choice, else against its type), two
targets active for one metric: all are ParamsErrors. A metric that cannot be read (missing file
or key, invalid JSON, not a finite number) is ``missing``, never a pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Mapping, Union

from pydantic import Field, field_validator

from stages.choices import allowed_values
from stages.common import round_floats
from stages.config import (PARAMS_FILE, ParamsError, Section, named_entries, parse_section,
                           read_params_file)
from stages.metrics_files import lookup_metric

# `<file>.<key>`: the file part has no dot (it is a metrics file's stem), the key may have dots.
METRIC_PATTERN = r"^[A-Za-z0-9_-]+\.[^\s]+$"
# A target's or floor's name: one params key, so no dots (`-S compare.targets.<name>.value=`).
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]
# A dotted params key (`convert.coco.head`).
ParamKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")]
# Relative slack for float comparisons, so a value exactly on the tolerance boundary passes.
EPS = 1e-9

PASS, FAIL, MISSING, INFO, CHANGED = "pass", "fail", "missing", "info", "changed"
Scalar = Union[bool, int, float, str]
ABSENT = object()  # "no such key", distinct from a param whose value is null


class Target(Section):
    """One absolute target: ``metric`` against ``value``, ``tolerance`` allowed in ``direction``."""

    metric: str = Field(pattern=METRIC_PATTERN)
    value: float = Field(allow_inf_nan=False)
    tolerance: float = Field(ge=0, allow_inf_nan=False)
    # higher: at least value - tolerance (accuracy); lower: at most value + tolerance (latency);
    # both: within ± tolerance (a reproduction that must not drift either way).
    direction: Literal["higher", "lower", "both"] = "higher"
    # Largest allowed worsening against the base revision (gate --against); null: tolerance.
    regression_tolerance: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    # Shown with its delta (status info), never passes or fails the gate.
    informational: bool = False
    # Dotted params.yaml keys and the values they must have for this target to apply.
    when: dict[str, Scalar] = {}
    # Params that shape what the metric measures (besides the `when` keys): `gate --against`
    # compares the metric with its base value only if all of them are equal at both revisions.
    configuration: list[ParamKey] = []

    @field_validator("when", mode="after")
    @classmethod
    def _dotted_keys(cls, when: dict[str, Scalar]) -> dict[str, Scalar]:
        for key in when:
            if not key or any(not part for part in key.split(".")):
                raise ValueError(f"{key!r} is not a dotted params key (e.g. convert.coco.head)")
        return when


class Floor(Section):
    """A floor relative to another metric of the same run:
    ``metric >= ratio * reference - margin`` (e.g. INT8 mAP >= 0.99 x FP32 mAP)."""

    metric: str = Field(pattern=METRIC_PATTERN)
    reference: str = Field(pattern=METRIC_PATTERN)
    ratio: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    margin: float = Field(default=0.0, ge=0, allow_inf_nan=False)  # absolute, metric's unit


class GateKnobs(Section):
    """Knobs of ``stages.gate``."""

    # With --against: a gated metric without a value at the base revision (e.g. the first PR
    # that adds it) is an error (exit 2) unless this is true, then it is reported as new.
    allow_missing_base: bool = False
    # With --against: a metric whose configuration (its target's `when` and `configuration`
    # params) differs at the base revision is not compared (exit 2) unless this is true, then
    # it is reported as a new configuration.
    allow_config_change: bool = False


class CompareParams(Section):
    targets: dict[Name, Target] = Field(min_length=1)
    floors: dict[Name, Floor] = {}
    gate: GateKnobs = GateKnobs()

    @field_validator("targets", "floors", mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        return named_entries(value, "coco_fp32: {metric: coco_fp32.map, value: ..., ...}")


@dataclass(frozen=True)
class Row:
    """One check. ``target`` is the target value, the reference value (floor) or the base value
    (regression); ``delta = value - target``; status is pass, fail, missing (cannot judge), info
    (shown, not judged) or changed (configuration changed since the base: not compared)."""

    name: str
    kind: Literal["target", "floor", "regression"]
    metric: str
    value: float | None
    target: float | None
    delta: float | None
    tolerance: float | None
    status: str
    note: str = ""
    key: str = ""  # the target's or floor's name in params


def load_compare_params(path: str | Path = PARAMS_FILE) -> tuple[CompareParams, dict[str, Target],
                                                                 dict[str, Any]]:
    """Read and validate the ``compare`` section; also return the targets these params select
    (by name) and the whole params mapping (the values ``when`` and ``configuration`` read)."""
    data = read_params_file(path)
    params = parse_section(data, "compare", CompareParams, str(path))
    return params, active_targets(params.targets, data, str(path)), data


def active_targets(targets: Mapping[str, Target], params: Mapping[str, Any],
                   source: str = PARAMS_FILE) -> dict[str, Target]:
    """The targets (by name) whose ``when`` conditions hold in ``params`` (the whole mapping).

    Every condition is checked first (``check_condition``), whether it holds now or not: a
    condition that can never hold would make its target silently apply to nothing. So is every
    ``configuration`` key (it must name a param). Two targets active for the same metric are a
    ParamsError too: the targets in force are never a guess.
    """
    active: dict[str, Target] = {}
    seen: dict[str, str] = {}
    for name, target in targets.items():
        holds = True
        for key, wanted in target.when.items():
            actual = check_condition(params, f"compare.targets.{name}.when", key, wanted, source)
            # YAML's true is not 1: compare bools only with bools
            same_kind = isinstance(actual, bool) == isinstance(wanted, bool)
            holds = holds and same_kind and actual == wanted
        for key in target.configuration:
            if lookup_param(params, key) is ABSENT:
                raise ParamsError(f"{source}: compare.targets.{name}.configuration: key {key!r} "
                                  f"is not in {source}; name an existing param")
        if not holds:
            continue
        if target.metric in seen:
            raise ParamsError(f"{source}: compare.targets.{seen[target.metric]} and "
                              f"compare.targets.{name} both apply to {target.metric!r}; "
                              "make their `when` conditions exclusive")
        seen[target.metric] = name
        active[name] = target
    return active


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "a string" if isinstance(value, str) else type(value).__name__


def check_condition(params: Mapping[str, Any], where: str, key: str, wanted: Any,
                    source: str = PARAMS_FILE) -> Any:
    """The param's current value, after checking that ``key: wanted`` can ever hold.

    ParamsError when the key is not in params, names a section or list, or ``wanted`` is not a
    value the param can take: one of its choices (stages/choices.py), else of its current type.
    """
    actual = lookup_param(params, key)
    prefix = f"{source}: {where}.{key}"
    if actual is ABSENT:
        raise ParamsError(f"{prefix}: key {key!r} is not in {source}; a condition must name an "
                          "existing param")
    if isinstance(actual, (Mapping, list)):
        raise ParamsError(f"{prefix}: {key!r} is a {type(actual).__name__}, not a single value")
    allowed = allowed_values(key)
    if allowed is not None:
        if not any(_kind(wanted) == _kind(a) and wanted == a for a in allowed):
            raise ParamsError(f"{prefix}: {wanted!r} is not a value {key} can take, so the "
                              f"target would apply to nothing; allowed: "
                              f"{', '.join(map(str, allowed))}")
    elif actual is not None and _kind(actual) != _kind(wanted):
        raise ParamsError(f"{prefix}: {wanted!r} is {_kind(wanted)} but {key} is "
                          f"{_kind(actual)} ({actual!r}), so the target would apply to nothing")
    return actual


def lookup_param(params: Mapping[str, Any], dotted: str) -> Any:
    """``params['a']['b']`` for ``'a.b'``; ``ABSENT`` when any part is missing."""
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return ABSENT
        node = node[part]
    return node


def judge(value: float, target: float, tolerance: float, direction: str = "higher") -> str:
    """pass/fail of ``value`` against ``target`` within ``tolerance`` (boundary included)."""
    delta = value - target
    slack = tolerance + EPS * max(1.0, abs(target))
    if direction == "higher":
        ok = delta >= -slack
    elif direction == "lower":
        ok = delta <= slack
    else:
        ok = abs(delta) <= slack
    return PASS if ok else FAIL


def check(name: str, kind: str, metric: str, value: float | None, target: float | None,
          tolerance: float | None, direction: str, note: str = "", key: str = "",
          informational: bool = False) -> Row:
    """A Row for one comparison: ``missing`` when either side is unknown; ``info`` (with the
    delta when both sides are known) when the check is informational."""
    delta = None if value is None or target is None else value - target
    if informational:
        note = "; ".join(filter(None, ["informational, not judged", note]))
        return Row(name, kind, metric, value, target, delta, tolerance, INFO, note, key)
    if delta is None:
        return Row(name, kind, metric, value, target, None, tolerance, MISSING, note, key)
    return Row(name, kind, metric, value, target, delta, tolerance,
               judge(value, target, tolerance or 0.0, direction), note, key)


def compare(metrics: Mapping[str, Any], targets: Mapping[str, Target],
            floors: Mapping[str, Floor] | None = None) -> list[Row]:
    """Check every target and floor (by name) against ``metrics`` (stages/metrics_files.py).

    A floor is reported as target = reference value, tolerance = (1 - ratio) * |reference| +
    margin, so every row reads the same way: pass when value >= target - tolerance.
    """
    rows = []
    for key, t in targets.items():
        value, why = lookup_metric(metrics, t.metric)
        rows.append(check(t.metric, "target", t.metric, value, t.value, t.tolerance,
                          t.direction, why, key, t.informational))
    for key, f in (floors or {}).items():
        value, why = lookup_metric(metrics, f.metric)
        ref, ref_why = lookup_metric(metrics, f.reference)
        tolerance = (1.0 - f.ratio) * abs(ref) + f.margin if ref is not None else None
        rule = f">= {f.ratio:g} x {f.reference}" + (f" - {f.margin:g}" if f.margin else "")
        note = "; ".join([rule, *(w for w in (why, ref_why) if w)])
        rows.append(check(f"{f.metric}/{f.reference}", "floor", f.metric, value, ref,
                          tolerance, "higher", note, key))
    return rows


def fmt(value: float | None, signed: bool = False) -> str:
    """A number for people: 6 significant digits, '—' when unknown."""
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    return f"{value:+.6g}" if signed else f"{value:.6g}"


def rows_to_metrics(rows: Iterable[Row]) -> dict[str, Any]:
    """Flat ``<row>.<field>`` keys: value, target, delta, tolerance, status (null when unknown;
    status pass, fail, missing or info)."""
    out: dict[str, Any] = {}
    for row in rows:
        for field in ("value", "target", "delta", "tolerance", "status"):
            out[f"{row.name}.{field}"] = getattr(row, field)
    # + 0.0 turns a rounded -0.0 into 0.0, so an exact hit always reads the same
    return {k: v + 0.0 if isinstance(v, float) else v for k, v in round_floats(out).items()}
