"""The offline demo, end to end, as a user runs it: a fresh copy of this checkout, git + DVC,
``dvc repro`` in demo/ (the session's shared run, tests/conftest.py ``demo_run``), the gate, then
an experiment, ``dvc metrics diff`` and ``dvc plots diff`` against a revision.

This is the project's end-to-end test: every stage runs for real (generate, download from local
paths with checksums, unpack, train, convert with both heads, quantize, convert to BF16, evaluate
COCO and VOC in FP32, INT8 and BF16, compare). The run takes a few minutes on 2 cores.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.demo_run import clone_run, dvc, git, run
from tests.reportcheck import check_report

CLASSES = ["rectangle", "ellipse", "triangle", "cross"]
PRECISIONS = ("fp32", "int8", "bf16")


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def check_scorers_agree(demo: Path) -> None:
    """The demo scores COCO with faster-coco-eval (params evaluate.coco.scorer); pycocotools,
    the reference, must give the same summary stats on the demo's own detections, to the last
    bit, and so byte-identical metrics."""
    from stages.coco_eval import load_coco, metrics_from
    from stages.coco_scoring import score_bbox

    assert yaml.safe_load((demo / "params.yaml").read_text())["evaluate"]["coco"]["scorer"] == \
        "faster-coco-eval"
    coco = load_coco(demo / "data" / "coco" / "annotations" / "instances_val2017.json")
    for p in PRECISIONS:
        eval_dir = demo / "eval" / f"coco_{p}"
        assert load(eval_dir / "provenance.json")["scorer"]["name"] == "faster-coco-eval"
        results = json.loads((eval_dir / "detections.json").read_text())
        ids = sorted(coco.getImgIds())
        ref = score_bbox(coco, results, ids, "pycocotools")
        fast = score_bbox(coco, results, ids, "faster-coco-eval")
        assert ref.stats.tolist() == fast.stats.tolist()
        assert metrics_from(ref, len(ids)) == load(demo / "metrics" / f"coco_{p}.json")


def test_demo_run_metrics_outputs_and_gate(demo_run):
    demo = demo_run / "demo"
    metrics = demo / "metrics"
    voc = {p: load(metrics / f"voc_{p}.json") for p in PRECISIONS}
    coco = {p: load(metrics / f"coco_{p}.json") for p in PRECISIONS}
    train = load(metrics / "train_voc.json")
    assert voc["fp32"]["images"] == 200 and coco["fp32"]["images"] == 200
    for p in PRECISIONS:
        assert 80.0 <= voc[p]["map"] <= 100.0, voc
        assert 40.0 <= coco[p]["map"] < coco[p]["map50"] <= 100.0, coco
        speed = load(metrics / f"speed_voc_{p}.json")
        assert speed["images"] == 200 and speed["images_per_s"] > 0
    assert abs(voc["int8"]["map"] - voc["fp32"]["map"]) <= 1.0
    for branch in (voc, coco):  # BF16: the goal, at most 0.1 point below FP32
        assert branch["bf16"]["map"] >= branch["fp32"]["map"] - 0.1
    for branch in ("coco", "voc"):
        meta = load(demo / "model" / branch / "bf16-meta.json")
        assert meta["precision"] == "bf16" and len(meta["bf16"]["bf16_layers"]) == 15
        assert meta["cpu"]["bf16_flags"]
        # tuning is off: the INT8 meta has no tuning entry, its sensitivity table only a header
        assert "tuning" not in load(demo / "model" / branch / "int8-meta.json")
        assert (demo / "eval" / f"{branch}_int8" / "sensitivity.csv").read_text() == \
            "layer,agreement_alone,sensitivity,kept_fp32\n"
    assert 0.5 < train["acc"] <= 1.0 and train["epochs"] > 0
    with open(demo / "eval" / "voc_fp32" / "per_class.csv") as fh:
        assert [row["class"] for row in csv.DictReader(fh)] == CLASSES
    assert len(list((demo / "eval" / "coco_int8" / "samples").glob("*.png"))) > 0
    assert (demo / "dvclive" / "train_voc" / "plots" / "metrics" / "train" / "loss.tsv").is_file()
    heads = {b: load(demo / "model" / b / "fp32-meta.json")["head"] for b in ("coco", "voc")}
    assert heads == {"coco": "seed", "voc": "gluoncv"}
    # the verdict chart's data: one record per check, the same checks as compare.json
    rows = load(metrics / "compare_rows.json")
    compared = load(metrics / "compare.json")
    assert {r["check"] for r in rows} == {k.rsplit(".", 1)[0] for k in compared}
    assert all(r["status"] == compared[f"{r['check']}.status"] for r in rows)

    check_scorers_agree(demo)

    gate = run([sys.executable, "-m", "stages.gate"], demo)
    assert gate.returncode == 0 and "PASS" in gate.stdout


def test_demo_is_a_dvc_project_of_its_own(demo_run, tmp_path):
    """From demo/, DVC and its public API see only the demo; from the root, only the real
    pipeline (whose outputs do not exist here)."""
    demo = demo_run / "demo"
    stages = dvc("stage", "list", "--name-only", cwd=demo)
    assert stages.returncode == 0
    names = set(stages.stdout.split())
    assert {"generate", "train", "compare"} <= names and "download@coco" in names
    root_stages = dvc("stage", "list", "--name-only", cwd=demo_run)
    assert "generate" not in root_stages.stdout.split()  # the demo's stage, not the root's
    assert "train" in root_stages.stdout.split()

    for command in (["metrics", "show"], ["params", "diff", "HEAD"],
                    ["plots", "show", "--json", "-o", str(tmp_path / "plots")]):
        proc = dvc(*command, cwd=demo)
        assert proc.returncode == 0, command
        assert "failed to load" not in proc.stdout + proc.stderr, command
        assert "../" not in proc.stdout, command  # nothing of the parent project
    api = run([sys.executable, "-c",
               "import dvc.api, json; print(json.dumps(dvc.api.metrics_show()))"], demo)
    assert api.returncode == 0, api.stderr
    assert json.loads(api.stdout)["metrics/voc_fp32.json:map"] == load(
        demo / "metrics" / "voc_fp32.json")["map"]


def test_demo_report_renders_offline_in_a_browser(demo_run, tmp_path):
    """`dvc plots show` of the demo: every chart renders in Chromium with no network, the
    verdict comes first and says PASS, the samples put FP32, INT8 and BF16 of each image side by
    side."""
    state = check_report(demo_run / "demo", ["show"], tmp_path)
    print("screenshot:", tmp_path / "screenshot.png")
    assert "cdn.jsdelivr" not in state["html"].read_text()  # DVC's CDN <script> tags left out
    verdict = next(c for c in state["charts"] if c["id"] == "verdict")
    assert verdict["section"] == "section-verdict"
    assert "PASS  —  9 of 9 checks pass" in verdict["text"]
    assert state["sections"] == ["section-verdict", "section-precisions", "section-tuning",
                                 "section-training", "section-samples"]
    shots = {p: [i for i in state["images"] if f"_{p}_" in i["src"]] for p in PRECISIONS}
    assert [len(v) for v in shots.values()] == [16, 16, 16]  # 8 samples per branch, both
    # side by side: each FP32 image is followed by the INT8 and BF16 images of the same file
    order = [i["src"] for i in state["images"]]
    for shot in shots["fp32"]:
        at = order.index(shot["src"])
        assert order[at + 1:at + 3] == [shot["src"].replace("_fp32_", "_int8_"),
                                        shot["src"].replace("_fp32_", "_bf16_")], shot["src"]


def test_demo_report_fails_when_charts_cannot_load_their_libraries(demo_run, tmp_path):
    """The browser check is not vacuous: with DVC's default page (libraries from a CDN) or a
    page without the libraries, no chart renders offline, and the check fails on that."""
    from dvc_render.html import PAGE_HTML

    for name, page in (("cdn", PAGE_HTML), ("no_libraries", PAGE_HTML.replace("{scripts}", ""))):
        template = tmp_path / f"{name}.html"
        template.write_text(page)
        with pytest.raises(AssertionError, match="0 vega views, expected 1"):
            check_report(demo_run / "demo", ["show", "--html-template", str(template)],
                         tmp_path / name)


def test_demo_experiments_and_diffs_against_a_revision(demo_run, tmp_path):
    """In the demo's own DVC project: `dvc exp run -S`, `dvc metrics diff REV`, and `dvc plots
    diff REV` rendered offline in Chromium. (Queued experiments in a sub-project:
    tests/test_subproject.py; queued demo experiments with their checkpoints copied:
    tests/test_sweep.py.)"""
    root = clone_run(demo_run, tmp_path / "repo")
    demo = root / "demo"
    coco_int8 = load(demo / "metrics" / "coco_int8.json")

    # A changed quantization param: only the COCO INT8 branch reruns, and the diff shows it.
    exp = dvc("exp", "run", "-S", "quantize.coco.calib_images=32", cwd=demo)
    assert exp.returncode == 0
    assert "Running stage 'quantize_coco'" in exp.stdout
    assert "Running stage 'train'" not in exp.stdout
    diff = dvc("metrics", "diff", "--json", "--targets", "metrics/coco_int8.json",
               "metrics/voc_fp32.json", "--", "HEAD", cwd=demo)
    assert diff.returncode == 0
    changes = json.loads(diff.stdout)
    change = changes["metrics/coco_int8.json"]["map"]
    assert change["old"] == coco_int8["map"] and change["new"] != change["old"]
    assert "metrics/voc_fp32.json" not in changes  # untouched branch: no change reported

    # The report against HEAD: both revisions in every chart, offline.
    state = check_report(demo, ["diff", "HEAD"], tmp_path / "diff")
    print("screenshot:", tmp_path / "diff" / "screenshot.png")
    verdict = next(c for c in state["charts"] if c["id"] == "verdict")
    assert "HEAD:" in verdict["text"] and "workspace:" in verdict["text"]
    assert len(state["images"]) == 2 * 48  # every sample image (3 precisions) at both revisions

    # The gate is not vacuous: a target the demo cannot meet fails it (exit 1).
    params_file = demo / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["compare"]["targets"]["voc_fp32"]["value"] = 99.0
    params_file.write_text(yaml.safe_dump(params))
    failed = run([sys.executable, "-m", "stages.gate"], demo)
    assert failed.returncode == 1 and "FAIL" in failed.stdout
