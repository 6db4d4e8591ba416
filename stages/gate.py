"""Regression gate: do the metrics meet their targets, and did they regress against a revision?

    python -m stages.gate [--against REV] [--report FILE]

Run from the directory of a pipeline (its dvc.yaml and params.yaml), after ``dvc repro``. The
metrics files are the ones that dvc.yaml declares (``dvc metrics show --json`` is asked, so no
path is repeated here), read as the compare stage reads them; targets and knobs are params.yaml
``compare`` (see stages/targets.py). With ``--against REV`` it also reads the same files and
params.yaml as they were at REV (stages/baseline.py: DVC's file system, so git-tracked and
DVC-cached metrics alike) and fails when a target's metric got worse than its regression
tolerance (direction as in the target: higher is better for mAP and accuracy), comparing like
with like: a metric whose configuration differs at REV (e.g. ``convert.coco.head``) is shown
with both values as a changed configuration, not compared. Informational targets
(``informational: true``, e.g. the training accuracy) are shown with their delta and never
decide anything.

Exit codes: 0 every check passes; 1 a target, floor or regression check fails; 2 the gate cannot
judge (a metrics file or key missing, NaN/inf, unreadable JSON, DVC failing, bad params, a
``when`` that can never hold, no deciding target applies, a base file at REV that exists but is
not a JSON object of finite numbers, a configuration changed since REV, an empty REV, a
``--report`` it cannot or must not write). It
fails closed: nothing it cannot read ever counts as a pass. The Markdown table it prints to
stdout is also written to ``--report`` for a CI job to post; the file is written first, so the
printed verdict is always the one the exit code gives. ``--report`` may only replace an earlier
gate report (a file starting with REPORT_HEADING).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from stages.baseline import CannotJudge, read_base, regressions
from stages.common import main_guard, write_text_atomic
from stages.config import UsageError
from stages.metrics_files import read_metrics_files
from stages.outputs import OutputError, check_outputs
from stages.targets import CHANGED, FAIL, INFO, MISSING, PASS, Row, compare, fmt, \
    load_compare_params

log = logging.getLogger(__name__)

DVC = (sys.executable, "-m", "dvc")  # the DVC of this environment, whatever PATH says
VERDICTS = {PASS: "✅ pass", FAIL: "❌ **FAIL**", MISSING: "⚠️ **CANNOT JUDGE**",
            INFO: "ℹ️ info", CHANGED: "⚠️ **CONFIGURATION CHANGED**"}
OUTCOMES = {0: "PASS", 1: "FAIL", 2: "CANNOT JUDGE"}
REPORT_HEADING = "### SSD reproduction gate: "


def run_dvc(*args: str) -> str:
    """Run a DVC command here and return its stdout; any failure is CannotJudge."""
    cmd = [*DVC, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise CannotJudge(f"cannot run dvc: {exc}") from exc
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()[-1:] or ["(no message)"]
        raise CannotJudge(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}): {detail[0]}")
    return proc.stdout


def parse_dvc_json(text: str, what: str) -> Any:
    """DVC's ``--json`` output (it may contain NaN/Infinity, which the checks then reject)."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CannotJudge(f"{what} printed no valid JSON ({exc})") from exc


def declared_metrics() -> dict[str, str | None]:
    """Metrics files declared in the DVC project here, by name (file stem) -> path from here.

    Asks DVC's public interface, ``dvc metrics show --json``: it lists every declared metrics
    file of the project (stage outputs and top-level ``metrics:``, ``${vars}`` resolved as
    ``dvc repro`` resolves them) by path, readable or not. The values are re-read by the gate
    the way the compare stage reads them. (``dvc.api.metrics_show()`` cannot serve: it merges
    all files into one dict, so a key found in one file only loses its file's name, and it
    raises at the first unreadable file instead of letting each check name the missing one.)
    Run the gate from the root of a DVC project; the demo is a project of its own (demo/.dvc),
    so the real pipeline's metrics never mix in. A name declared twice maps to None (ambiguous:
    the gate cannot judge, exit 2).
    """
    if not Path("dvc.yaml").is_file():  # DVC's fixed file name, not a project path
        raise CannotJudge(f"no dvc.yaml in {Path.cwd()}: run the gate from a pipeline's "
                          "directory")
    shown = parse_dvc_json(run_dvc("metrics", "show", "--json"), "dvc metrics show")
    if not isinstance(shown, dict):
        raise CannotJudge(f"dvc metrics show printed {type(shown).__name__}, not an object")
    # {"<rev>": {"data": {"<path>": {"data": {...}} or {"error": {...}}}}}: the workspace only
    files = [path for rev in shown.values() if isinstance(rev, dict)
             for path in (rev.get("data") or {})]
    by_name: dict[str, str | None] = {}
    for path in sorted(set(map(os.path.normpath, files))):
        name = Path(path).stem
        by_name[name] = None if name in by_name else path
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
            raise CannotJudge(f"more than one metrics file of this DVC project is named {name!r} "
                              "(a nested pipeline needs a DVC project of its own: "
                              "`dvc init --subdir` there)")
        paths[name] = declared[name]
    return paths


def exit_code(rows: Sequence[Row]) -> int:
    """2 if any check cannot be judged (missing, or a configuration changed since the base) or
    none is judged at all, else 1 if any fails, else 0. Informational rows never count."""
    judged = [r for r in rows if r.status != INFO]
    if not judged or any(r.status in (MISSING, CHANGED) for r in judged):
        return 2
    return 1 if any(r.status == FAIL for r in judged) else 0


def render_markdown(rows: Sequence[Row], against: str | None) -> str:
    """The report: outcome line, then one table row per check."""
    code = exit_code(rows)
    lines = [f"{REPORT_HEADING}{OUTCOMES[code]} (exit {code})", "",
             "| check | metric | value | target / base | delta | tolerance | verdict |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        check_name = f"vs `{against}`" if r.kind == "regression" else f"{r.kind} `{r.key}`"
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
    params, targets, current_params = load_compare_params()
    if not any(not t.informational for t in targets.values()):
        raise CannotJudge("no target in params.yaml `compare.targets` that decides the gate "
                          "(not informational) applies to these params")
    names = [t.metric for t in targets.values()]
    names += [m for f in params.floors.values() for m in (f.metric, f.reference)]
    paths = resolve_paths((n.split(".", 1)[0] for n in names), declared_metrics())
    current = read_metrics_files(list(paths.values()))
    rows = compare(current, targets, params.floors)
    if against is not None:
        base, base_params = read_base(against, paths)
        rows += regressions(current, base, targets, against, params.gate, current_params,
                            base_params)
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
