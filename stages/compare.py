"""compare stage: check every metric against its target from params.yaml ``compare``.

    python -m stages.compare --metrics M1.json M2.json ... --out metrics/compare.json

How targets, floors and ``when`` conditions work: stages/targets.py (shared with the gate).
The stage reports, it never fails ``dvc repro`` on a missed target (exit 0); ``stages.gate`` is
what fails. An informational target (``informational: true``) is reported with status ``info``. Bad params (including a ``when`` that can never hold) stop it with exit 2, and so
does an ``--out`` that is a directory, an input or the params file.
"""
from __future__ import annotations

import argparse
import logging

from stages.common import main_guard, write_json
from stages.outputs import check_outputs
from stages.metrics_files import read_metrics_files
from stages.report_data import write_verdict_rows
from stages.targets import INFO, PASS, compare, fmt, load_compare_params, rows_to_metrics

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", nargs="+", required=True,
                        help="metrics JSON files; each is named by its file name without .json")
    parser.add_argument("--out", required=True, help="where to write the comparison JSON")
    parser.add_argument("--rows", required=True, help="the checks as records (verdict chart)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params, targets, _ = load_compare_params()
    check_outputs(files={"--out": args.out, "--rows": args.rows},
                  inputs={"--metrics": args.metrics})
    rows = compare(read_metrics_files(args.metrics), targets, params.floors)
    for row in rows:
        level = logging.INFO if row.status in (PASS, INFO) else logging.WARNING
        log.log(level, "%-7s %s: value %s, target %s, delta %s, tolerance %s%s", row.status,
                row.name, fmt(row.value), fmt(row.target), fmt(row.delta, signed=True),
                fmt(row.tolerance), f" ({row.note})" if row.note else "")
    write_json(args.out, rows_to_metrics(rows))
    write_verdict_rows(args.rows, rows, targets.values())
    judged = [row for row in rows if row.status != INFO]
    passed = sum(row.status == PASS for row in judged)
    log.info("%d of %d checks pass (%d informational); wrote %s (a miss is reported, not fatal:"
             " `python -m stages.gate` decides)", passed, len(judged), len(rows) - len(judged),
             args.out)
    return 0


if __name__ == "__main__":
    main_guard(main)
