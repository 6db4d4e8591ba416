"""Targets, floors and how metrics are judged against them: shared by compare and the gate.

A metric is named ``<file>.<key>``: ``coco_fp32.map`` is key ``map`` of the metrics file whose
name (without ``.json``) is ``coco_fp32``; nested keys are joined with dots, as DVC shows them.
Targets are absolute (value ± tolerance, in the metric's own unit) and may apply only when some
params hold (``when: {convert.coco.head: gluoncv}``), so one metric can have a target per
configuration. Floors are relative: ``metric >= ratio * reference - margin`` of the same run.

Fails closed: a ``when`` naming a key params.yaml lacks, a value the param can never take
(checked against stages/choices.py where the param is a choice, else against its type), two
targets active for one metric: all are ParamsErrors. A metric that cannot be read (missing file
or key, invalid JSON, not a finite number) is ``missing``, never a pass.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence, Union

from pydantic import Field

from stages.choices import allowed_values
from stages.common import StageError, round_floats
from stages.config import PARAMS_FILE, ParamsError, Section, parse_section, read_params_file

# `<file>.<key>`: the file part has no dot (it is a metrics file's stem), the key may have dots.
METRIC_PATTERN = r"^[A-Za-z0-9_-]+\.[^\s]+$"
# Relative slack for float comparisons, so a value exactly on the tolerance boundary passes.
EPS = 1e-9

PASS, FAIL, MISSING = "pass", "fail", "missing"
Scalar = Union[bool, int, float, str]
_ABSENT = object()  # "no such key", distinct from a param whose value is null


class Target(Section):
    """One absolute target: ``metric`` against ``value``, ``tolerance`` allowed in ``direction``."""

    metric: str = Field(pattern=METRIC_PATTERN)
    value: float = Field(allow_inf_nan=False)
    tolerance: float = Field(ge=0, allow_inf_nan=False)
    # higher: at least value - tolerance (accuracy); lower: at most value + tolerance (latency);
    # both: within ± tolerance (a reproduction that must not drift either way).
    direction: Literal["higher", "lower", "both"] = "higher"
    # Largest allowed worsening against the base revision (gate --against); default: tolerance.
    regression_tolerance: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    # Dotted params.yaml keys and the values they must have for this target to apply.
    when: dict[str, Scalar] = {}


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


class CompareParams(Section):
    targets: list[Target] = Field(min_length=1)
    floors: list[Floor] = []
    gate: GateKnobs = GateKnobs()


@dataclass(frozen=True)
class Row:
    """One check. ``target`` is the target value, the reference value (floor) or the base value
    (regression); ``delta = value - target``; status is pass, fail or missing (cannot judge)."""

    name: str
    kind: Literal["target", "floor", "regression"]
    metric: str
    value: float | None
    target: float | None
    delta: float | None
    tolerance: float | None
    status: str
    note: str = ""


def load_compare_params(path: str | Path = PARAMS_FILE) -> tuple[CompareParams, list[Target]]:
    """Read and validate the ``compare`` section; also return the targets these params select."""
    data = read_params_file(path)
    params = parse_section(data, "compare", CompareParams, str(path))
    return params, active_targets(params.targets, data, str(path))


def active_targets(targets: Sequence[Target], params: Mapping[str, Any],
                   source: str = PARAMS_FILE) -> list[Target]:
    """The targets whose ``when`` conditions hold in ``params`` (the whole params mapping).

    Every condition is checked first (``check_condition``), whether it holds now or not: a
    condition that can never hold would make its target silently apply to nothing. Two targets
    active for the same metric are a ParamsError too: the targets in force are never a guess.
    """
    active, seen = [], {}
    for i, target in enumerate(targets):
        holds = True
        for key, wanted in target.when.items():
            actual = check_condition(params, f"compare.targets.{i}.when", key, wanted, source)
            # YAML's true is not 1: compare bools only with bools
            same_kind = isinstance(actual, bool) == isinstance(wanted, bool)
            holds = holds and same_kind and actual == wanted
        if not holds:
            continue
        if target.metric in seen:
            raise ParamsError(f"{source}: compare.targets.{seen[target.metric]} and "
                              f"compare.targets.{i} both apply to {target.metric!r}; "
                              "make their `when` conditions exclusive")
        seen[target.metric] = i
        active.append(target)
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
    if actual is _ABSENT:
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
    """``params['a']['b']`` for ``'a.b'``; ``_ABSENT`` when any part is missing."""
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys, the way ``dvc metrics show`` names them."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def lookup_metric(metrics: Mapping[str, Any], name: str) -> tuple[float | None, str]:
    """Value of metric ``file.key``, or None and why it cannot be judged.

    ``metrics`` maps a metrics file's name to its flattened content, or to a string saying why
    the file could not be read.
    """
    stem, key = name.split(".", 1)
    content = metrics.get(stem)
    if content is None:
        return None, f"no metrics file {stem!r}"
    if isinstance(content, str):
        return None, content
    if key not in content:
        return None, f"key {key!r} missing in {stem!r}"
    value = content[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"{name} is not a number ({value!r})"
    if not math.isfinite(value):
        return None, f"{name} is not finite ({value})"
    return float(value), ""


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
          tolerance: float, direction: str, note: str = "") -> Row:
    """A Row for one comparison; ``missing`` when either side is unknown."""
    if value is None or target is None:
        return Row(name, kind, metric, value, target, None, tolerance, MISSING, note)
    return Row(name, kind, metric, value, target, value - target, tolerance,
               judge(value, target, tolerance, direction), note)


def compare(metrics: Mapping[str, Any], targets: Iterable[Target],
            floors: Iterable[Floor] = ()) -> list[Row]:
    """Check every target and floor against ``metrics`` (see ``lookup_metric`` for its shape).

    A floor is reported as target = reference value, tolerance = (1 - ratio) * |reference| +
    margin, so every row reads the same way: pass when value >= target - tolerance.
    """
    rows = []
    for t in targets:
        value, why = lookup_metric(metrics, t.metric)
        rows.append(check(t.metric, "target", t.metric, value, t.value, t.tolerance,
                          t.direction, why))
    for f in floors:
        value, why = lookup_metric(metrics, f.metric)
        ref, ref_why = lookup_metric(metrics, f.reference)
        tolerance = (1.0 - f.ratio) * abs(ref) + f.margin if ref is not None else None
        rule = f">= {f.ratio:g} x {f.reference}" + (f" - {f.margin:g}" if f.margin else "")
        note = "; ".join([rule, *(w for w in (why, ref_why) if w)])
        rows.append(check(f"{f.metric}/{f.reference}", "floor", f.metric, value, ref,
                          tolerance, "higher", note))
    return rows


def fmt(value: float | None, signed: bool = False) -> str:
    """A number for people: 6 significant digits, '—' when unknown."""
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    return f"{value:+.6g}" if signed else f"{value:.6g}"


def rows_to_metrics(rows: Iterable[Row]) -> dict[str, Any]:
    """Flat ``<row>.<field>`` keys: value, target, delta, tolerance, status (null when unknown)."""
    out: dict[str, Any] = {}
    for row in rows:
        for field in ("value", "target", "delta", "tolerance", "status"):
            out[f"{row.name}.{field}"] = getattr(row, field)
    # + 0.0 turns a rounded -0.0 into 0.0, so an exact hit always reads the same
    return {k: v + 0.0 if isinstance(v, float) else v for k, v in round_floats(out).items()}


def parse_metrics(text: str, source: str) -> dict[str, Any] | str:
    """A metrics file's flattened JSON object, or a string saying why it cannot be used."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        return f"{source} is not valid JSON ({exc})"
    if not isinstance(data, dict):
        return f"{source} does not hold a JSON object"
    return flatten(data)


def read_metrics_files(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Map each file's name (stem) to its flattened JSON, or to why it cannot be read."""
    metrics: dict[str, Any] = {}
    for path in map(Path, paths):
        if path.stem in metrics:
            raise StageError(f"two metrics files are both named {path.stem!r}; "
                             "metric names need unique file names")
        try:
            metrics[path.stem] = parse_metrics(path.read_text(), str(path))
        except OSError as exc:
            metrics[path.stem] = f"cannot read {path} ({exc.strerror})"
        except UnicodeDecodeError as exc:
            metrics[path.stem] = f"{path} is not valid JSON ({exc})"
    return metrics
