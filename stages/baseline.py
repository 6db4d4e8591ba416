"""The base revision of ``gate --against REV``: its metrics and params, and each metric against
its base value, like with like.

A metric is compared with its value at REV only when the configuration that produced it is the
same at both revisions: the params its target's ``when`` and ``configuration`` name (those of the
target at REV for the same metric too, e.g. ``convert.coco.head``). When one of them differs (a
PR that switches the detection head), the row shows both values, its status is ``changed`` and
the gate cannot judge (exit 2): neither a regression nor a pass. ``compare.gate.allow_config_change``
accepts it as a new configuration.

Everything at REV is read through DVC's public file system (git-tracked and DVC-cached files
alike) and parsed as the current files are: a file that exists at REV but cannot be used is
never taken for "no value" (which ``allow_missing_base`` would excuse).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from stages.config import PARAMS_FILE, load_yaml
from stages.metrics_files import lookup_metric, parse_metrics
from stages.targets import ABSENT, CHANGED, PASS, GateKnobs, Row, Target, check, lookup_param


class CannotJudge(RuntimeError):
    """The gate lacks what it needs to decide (exit 2)."""


def verify_revision(rev: str) -> None:
    """CannotJudge unless ``rev`` names a commit of the repository here."""
    try:
        proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "--end-of-options",
                               f"{rev}^{{commit}}"], capture_output=True, text=True, check=False)
    except OSError as exc:
        raise CannotJudge(f"cannot run git: {exc}") from exc
    if proc.returncode != 0:
        raise CannotJudge(f"unknown Git revision {rev!r}")


def read_base(rev: str, paths: Mapping[str, str],
              params_file: str = PARAMS_FILE) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metrics files (name -> flattened JSON, or why it cannot be used; a file that did not
    exist at ``rev`` is left out) and the params (``{}`` if there was no params file) at ``rev``.

    A params file at ``rev`` that is not a YAML mapping is CannotJudge: the configuration the
    base metrics were made with would be unknown.
    """
    from dvc.api import DVCFileSystem
    from dvc.repo import Repo

    verify_revision(rev)  # so that "no such file" below really means "not in that commit"
    root = Repo.find_root(os.getcwd())
    metrics: dict[str, Any] = {}
    try:
        with Repo(root) as repo:  # paths at a revision are relative to the Git root, which is
            top = repo.scm.root_dir  # not the DVC root for a sub-project (demo/.dvc)

        def rel(path: str) -> str:
            return Path(os.path.relpath(os.path.realpath(path), os.path.realpath(top))) \
                .as_posix()

        fs = DVCFileSystem(root, rev=rev)
        for name, path in paths.items():
            try:
                text = fs.read_text(rel(path))
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError) as exc:
                metrics[name] = f"cannot read {path} at {rev} ({exc})"
                continue
            metrics[name] = parse_metrics(text, f"{path} at {rev}")
        try:
            params_text = fs.read_text(rel(params_file))
        except FileNotFoundError:
            params_text = "{}"
    except Exception as exc:  # noqa: BLE001 - DVC's errors (unknown revision, ...): cannot judge
        raise CannotJudge(f"cannot read the metrics at {rev!r}: {exc}") from exc
    try:
        params = load_yaml(params_text) or {}
    except yaml.YAMLError as exc:
        raise CannotJudge(f"{params_file} at {rev} is not valid YAML: {exc}") from None
    if not isinstance(params, dict):
        raise CannotJudge(f"{params_file} at {rev} does not hold a mapping")
    return metrics, params


def _raw_targets(params: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    """The targets of a params mapping as written, mapping or (older revisions) list form."""
    compare = params.get("compare")
    targets = compare.get("targets") if isinstance(compare, Mapping) else None
    entries = targets.values() if isinstance(targets, Mapping) else targets
    return [t for t in entries or () if isinstance(t, Mapping)]


def configuration_keys(target: Target, base_params: Mapping[str, Any]) -> list[str]:
    """The params that define what ``target.metric`` measures: its ``when`` and
    ``configuration`` keys, and those of every target for the same metric at the base."""
    keys = set(target.when) | set(target.configuration)
    for raw in _raw_targets(base_params):
        if raw.get("metric") == target.metric:
            when, config = raw.get("when"), raw.get("configuration")
            keys |= {str(k) for k in when} if isinstance(when, Mapping) else set()
            keys |= {str(k) for k in config} if isinstance(config, list) else set()
    return sorted(keys)


def _show(value: Any) -> str:
    return "(absent)" if value is ABSENT else repr(value)


def _same(a: Any, b: Any) -> bool:
    # YAML's true is not 1, and 1 is not 1.0 for a param's value type
    return type(a) is type(b) and a == b


def configuration_changes(keys: Iterable[str], current: Mapping[str, Any],
                          base: Mapping[str, Any], rev: str) -> list[str]:
    """One line per key whose value differs between ``base`` (at ``rev``) and ``current``."""
    changes = []
    for key in keys:
        now, then = lookup_param(current, key), lookup_param(base, key)
        if not _same(now, then):
            changes.append(f"{key}: {_show(then)} at {rev}, {_show(now)} now")
    return changes


def regressions(current: Mapping[str, Any], base: Mapping[str, Any],
                targets: Mapping[str, Target], rev: str, knobs: GateKnobs,
                current_params: Mapping[str, Any], base_params: Mapping[str, Any]) -> list[Row]:
    """One row per target: how far its metric moved from ``base`` and whether that is allowed.

    ``knobs``: compare.gate (``allow_missing_base`` excuses only a base revision without that
    file or key; ``allow_config_change`` a changed configuration). A base file that exists but
    cannot be judged (invalid JSON, not an object, NaN, a string) is missing.
    """
    rows = []
    for name, t in targets.items():
        tolerance = t.tolerance if t.regression_tolerance is None else t.regression_tolerance
        new, why = lookup_metric(current, t.metric)
        stem, key = t.metric.split(".", 1)
        content = base.get(stem)
        absent = content is None or (isinstance(content, dict) and key not in content)
        old, old_why = (None, f"no value at {rev}") if absent else lookup_metric(base, t.metric)
        changes = configuration_changes(configuration_keys(t, base_params), current_params,
                                        base_params, rev)
        if t.informational:  # shown with its delta, whatever happened: never judged
            note = "; ".join(filter(None, [why or old_why, *changes]))
            rows.append(check(t.metric, "regression", t.metric, new, old, tolerance,
                              t.direction, note, name, informational=True))
        elif new is not None and changes:
            rows.append(_changed(name, t, new, old, tolerance, changes, knobs.allow_config_change))
        elif new is not None and absent and knobs.allow_missing_base:
            rows.append(Row(t.metric, "regression", t.metric, new, None, None, tolerance, PASS,
                            f"no value at {rev} (new metric; allow_missing_base)", name))
        else:
            hint = " (compare.gate.allow_missing_base accepts new metrics)" if absent else ""
            note = why or (old_why and (old_why + hint if absent else f"at {rev}: {old_why}"))
            rows.append(check(t.metric, "regression", t.metric, new, old, tolerance,
                              t.direction, note, name))
    return rows


def _changed(name: str, t: Target, new: float, old: float | None, tolerance: float,
             changes: list[str], accepted: bool) -> Row:
    """A metric whose configuration differs at the base: both values shown, not compared."""
    delta = None if old is None else new - old
    what = "configuration changed: " + "; ".join(changes)
    if accepted:
        return Row(t.metric, "regression", t.metric, new, old, delta, tolerance, PASS,
                   what + " (new configuration; allow_config_change)", name)
    return Row(t.metric, "regression", t.metric, new, old, delta, tolerance, CHANGED,
               what + "; not compared (compare.gate.allow_config_change accepts it)", name)

