"""Regression gate: do the metrics meet their targets, and did they regress against a revision?

    python -m stages.gate [--against REV] [--report FILE]

Run from the directory of a pipeline (its dvc.yaml and params.yaml), after ``dvc repro``. The
metrics files are the ones that dvc.yaml declares (DVC's index is asked, so no path is repeated
here), read as the compare stage reads them; targets and knobs are params.yaml ``compare`` (see
stages/targets.py). With ``--against REV`` it also reads the same files as they were at REV
(through DVC's file system, so git-tracked and DVC-cached metrics alike) and fails when a
target's metric got worse than its regression tolerance (direction as in the target: higher is
better for mAP and accuracy).

Exit codes: 0 every check passes; 1 a target, floor or regression check fails; 2 the gate cannot
judge (a metrics file or key missing, NaN/inf, unreadable JSON, DVC failing, bad params, a
``when`` that can never hold, no target applies, a base file at REV that exists but is not a
JSON object of finite numbers, an empty REV, a ``--report`` it cannot or must not write). It
fails closed: nothing it cannot read ever counts as a pass. The Markdown table it prints to
stdout is also written to ``--report`` for a CI job to post; the file is written first, so the
printed verdict is always the one the exit code gives. ``--report`` may only replace an earlier
gate report (a file starting with REPORT_HEADING).
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from stages.common import main_guard, write_text_atomic
from stages.config import UsageError
from stages.outputs import OutputError, check_outputs
from stages.targets import (FAIL, MISSING, PASS, Row, Target, check, compare, fmt,
                            load_compare_params, lookup_metric, parse_metrics,
                            read_metrics_files)

log = logging.getLogger(__name__)

VERDICTS = {PASS: "✅ pass", FAIL: "❌ **FAIL**", MISSING: "⚠️ **CANNOT JUDGE**"}
OUTCOMES = {0: "PASS", 1: "FAIL", 2: "CANNOT JUDGE"}
REPORT_HEADING = "### SSD reproduction gate: "


class CannotJudge(RuntimeError):
    """The gate lacks what it needs to decide (exit 2)."""


def declared_metrics(directory: str | Path = ".") -> dict[str, str]:
    """Metrics files declared in ``directory``'s dvc.yaml, by name (file stem) -> path from there.

    Asks DVC's own index, so templated paths (``${vars}``) resolve exactly as ``dvc repro`` does
    and metrics of other pipelines in the repo (e.g. demo/) are not mixed in. Only stage outputs
    count (a top-level ``metrics:`` list is not read: the gate then fails closed, exit 2). A name
    declared twice maps to None (ambiguous).
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    directory = Path(directory).resolve()
    dvcfile = directory / "dvc.yaml"  # DVC's fixed file name, not a project path
    if not dvcfile.is_file():
        raise CannotJudge(f"no dvc.yaml in {directory}: run the gate from a pipeline's directory")
    files: list[str] = []
    try:
        with Repo(os.fspath(directory)) as repo:
            index = repo.index
            for stage in index.stages:
                if Path(stage.dvcfile.path).resolve() == dvcfile:
                    files += [out.fs_path for out in stage.outs if out.metric]
    except DvcException as exc:
        raise CannotJudge(f"DVC cannot load the pipeline in {directory}: {exc}") from exc
    by_name: dict[str, Any] = {}
    for path in files:
        rel = os.path.relpath(path, directory)
        name = Path(rel).stem
        by_name[name] = None if name in by_name and by_name[name] != rel else rel
    return by_name


def resolve_paths(names: Iterable[str], declared: Mapping[str, str | None]) -> dict[str, str]:
    """Path of each metrics file the checks need; undeclared or ambiguous names: CannotJudge."""
    paths = {}
    for name in sorted(set(names)):
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise CannotJudge(f"no metrics file named {name!r} is declared in dvc.yaml "
                              f"(declared: {known})")
        if declared[name] is None:
            raise CannotJudge(f"more than one metrics file in dvc.yaml is named {name!r}")
        paths[name] = declared[name]
    return paths


def verify_revision(rev: str) -> None:
    """CannotJudge unless ``rev`` names a commit of the repository here."""
    try:
        proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "--end-of-options",
                               f"{rev}^{{commit}}"], capture_output=True, text=True, check=False)
    except OSError as exc:
        raise CannotJudge(f"cannot run git: {exc}") from exc
    if proc.returncode != 0:
        raise CannotJudge(f"unknown Git revision {rev!r}")


def base_metrics(rev: str, paths: Mapping[str, str]) -> dict[str, Any]:
    """Each metrics file as it was at ``rev``: name -> flattened JSON, or a string saying why it
    cannot be used; a file that did not exist at ``rev`` is left out.

    Read through DVC's public file system at that revision (git-tracked or DVC-cached files
    alike), and parsed exactly as the current files are: `dvc metrics diff` reports an invalid
    or non-object base file as no value at all, which would pass for a new metric.
    """
    from dvc.api import DVCFileSystem
    from dvc.repo import Repo

    verify_revision(rev)  # so that "no such file" below really means "not in that commit"
    root = Repo.find_root(os.getcwd())
    base: dict[str, Any] = {}
    try:
        fs = DVCFileSystem(root, rev=rev)
        for name, path in paths.items():
            rel = Path(os.path.relpath(os.path.abspath(path), root)).as_posix()
            try:
                text = fs.read_text(rel)
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError) as exc:
                base[name] = f"cannot read {path} at {rev} ({exc})"
                continue
            base[name] = parse_metrics(text, f"{path} at {rev}")
    except Exception as exc:  # noqa: BLE001 - DVC's errors (unknown revision, ...): cannot judge
        raise CannotJudge(f"cannot read the metrics at {rev!r}: {exc}") from exc
    return base


def regressions(current: Mapping[str, Any], base: Mapping[str, Any],
                targets: Iterable[Target], rev: str, allow_missing_base: bool) -> list[Row]:
    """One row per target metric: how far it moved from ``base`` and whether that is allowed.

    ``allow_missing_base`` excuses only a base revision without that file or key; a base file
    that exists but cannot be judged (invalid JSON, not an object, NaN, a string) is missing.
    """
    rows = []
    for t in targets:
        tolerance = t.tolerance if t.regression_tolerance is None else t.regression_tolerance
        new, why = lookup_metric(current, t.metric)
        stem, key = t.metric.split(".", 1)
        content = base.get(stem)
        if content is None or (isinstance(content, dict) and key not in content):
            note = f"no value at {rev}"
            if new is not None and allow_missing_base:
                rows.append(Row(t.metric, "regression", t.metric, new, None, None, tolerance,
                                PASS, note + " (new metric; allow_missing_base)"))
                continue
            rows.append(Row(t.metric, "regression", t.metric, new, None, None, tolerance,
                            MISSING, why or note + " (compare.gate.allow_missing_base accepts "
                            "new metrics)"))
            continue
        old, old_why = lookup_metric(base, t.metric)
        rows.append(check(t.metric, "regression", t.metric, new, old, tolerance, t.direction,
                          why or (old_why and f"at {rev}: {old_why}")))
    return rows


def exit_code(rows: Sequence[Row]) -> int:
    """2 if any check cannot be judged (or there are none), else 1 if any fails, else 0."""
    if not rows or any(r.status == MISSING for r in rows):
        return 2
    return 1 if any(r.status == FAIL for r in rows) else 0


def render_markdown(rows: Sequence[Row], against: str | None) -> str:
    """The report: outcome line, then one table row per check."""
    code = exit_code(rows)
    lines = [f"{REPORT_HEADING}{OUTCOMES[code]} (exit {code})", "",
             "| check | metric | value | target / base | delta | tolerance | verdict |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        check_name = f"vs `{against}`" if r.kind == "regression" else r.kind
        verdict = VERDICTS[r.status] + (f" — {r.note}" if r.note else "")
        cells = [check_name, f"`{r.metric}`", fmt(r.value), fmt(r.target),
                 fmt(r.delta, signed=True), fmt(r.tolerance), verdict]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def render_error(reason: str) -> str:
    return f"{REPORT_HEADING}{OUTCOMES[2]} (exit 2)\n\nThe gate could not judge: {reason}\n"


def run_checks(against: str | None) -> list[Row]:
    """Every check the gate makes, from params.yaml, DVC's declarations and DVC's values."""
    if against is not None and not against.strip():
        raise CannotJudge("--against is empty: name a git revision (e.g. origin/main)")
    params, targets = load_compare_params()
    if not targets:
        raise CannotJudge("no target in params.yaml `compare.targets` applies to these params")
    names = [t.metric for t in targets]
    names += [m for f in params.floors for m in (f.metric, f.reference)]
    paths = resolve_paths((n.split(".", 1)[0] for n in names), declared_metrics())
    current = read_metrics_files(list(paths.values()))
    rows = compare(current, targets, params.floors)
    if against is not None:
        base = base_metrics(against, paths)
        rows += regressions(current, base, targets, against, params.gate.allow_missing_base)
    return rows


def check_report_path(path: str | None) -> None:
    """``--report`` may be a new file or an earlier gate report, nothing else (OutputError)."""
    if not path:
        return
    check_outputs(files={"--report": path}, inputs={"dvc.yaml": "dvc.yaml"})
    if os.path.isfile(path) and not os.path.islink(path):
        with open(path, "rb") as fh:
            head = fh.read(len(REPORT_HEADING.encode()))
        if head != REPORT_HEADING.encode():
            raise OutputError(f"--report {path}: refusing to replace it: it is not a gate "
                              f"report (does not start with {REPORT_HEADING.strip()!r}); "
                              "nothing was changed")


def publish(report: str, code: int, path: str | None) -> int:
    """Write the --report file first, then print: the printed verdict is the exit code's."""
    if path:
        try:
            write_text_atomic(path, report)
        except (OSError, UsageError) as exc:
            log.error("cannot write --report %s: %s", path, exc)
            report, code = render_error(f"cannot write --report {path}: {exc}"), 2
    sys.stdout.write(report)
    sys.stdout.flush()
    return code


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.gate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", metavar="REV",
                        help="git revision to check for regressions (e.g. origin/main)")
    parser.add_argument("--report", metavar="FILE", help="also write the Markdown report here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_report_path(args.report)
    except OutputError as exc:  # nothing may be written: print the verdict only
        log.error("%s", exc)
        return publish(render_error(str(exc)), 2, None)
    try:
        rows = run_checks(args.against)
        report, code = render_markdown(rows, args.against), exit_code(rows)
    except (CannotJudge, UsageError) as exc:
        log.error("%s", exc)
        report, code = render_error(str(exc)), 2
    except Exception as exc:  # noqa: BLE001 - a crash must not read as a verdict: fail closed
        log.exception("gate crashed")
        report, code = render_error(f"the gate crashed: {type(exc).__name__}: {exc}"), 2
    code = publish(report, code, args.report)
    log.log(logging.INFO if code == 0 else logging.ERROR, "gate: %s (exit %d)",
            OUTCOMES[code], code)
    return code


if __name__ == "__main__":
    main_guard(main)
