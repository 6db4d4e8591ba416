"""PNG charts from `dvc plots show --json` (stages/report_images.py), drawn offline with
vl-convert; the specs come from real DVC on small files and the project's own templates."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

DVC = str(Path(sys.executable).with_name("dvc"))

DVC_YAML = """\
plots:
  - verdict:
      template: verdict
      title: Verdict
      y:
        rows.json: headroom_pct
  - ap:
      template: ap_by_precision
      title: AP per class
      x: ap
      y:
        eval/voc_fp32/per_class.csv: class
        eval/voc_int8/per_class.csv: class
  - curve.csv
"""

ROWS = [{"check": "voc_fp32.map", "kind": "target", "metric": "voc_fp32.map",
         "label": "voc_fp32.map", "value": 86.6, "target": 85.0, "delta": 1.6, "tolerance": 0.0,
         "status": "pass", "threshold": 85.0, "rule": "≥ 85", "headroom": 1.6,
         "headroom_pct": 1.88, "note": ""},
        {"check": "voc_int8.map", "kind": "target", "metric": "voc_int8.map",
         "label": "voc_int8.map", "value": 84.0, "target": 85.0, "delta": -1.0, "tolerance": 0.0,
         "status": "fail", "threshold": 85.0, "rule": "≥ 85", "headroom": -1.0,
         "headroom_pct": -1.18, "note": ""}]


def sh(cwd, *cmd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return proc.stdout


def render(tmp_path, plots_json: Path):
    return subprocess.run([sys.executable, "-m", "stages.report_images", "--plots",
                           str(plots_json), "--out", str(tmp_path / "charts")],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def plots_json(tmp_path, repo_root):
    """`dvc plots show --json` of a small project using the project's custom templates."""
    root = tmp_path / "repo"
    root.mkdir()
    sh(root, "git", "init", "-q")
    sh(root, DVC, "init", "-q")
    shutil.copytree(repo_root / ".dvc" / "plots", root / ".dvc" / "plots")
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "rows.json").write_text(json.dumps(ROWS))
    for precision, shift in (("fp32", 0.0), ("int8", -0.5)):
        path = root / "eval" / f"voc_{precision}" / "per_class.csv"
        path.parent.mkdir(parents=True)
        path.write_text(f"class,ap\ncat,{80 + shift}\ndog,{70 + shift}\n")
    (root / "curve.csv").write_text("step,loss\n0,2.0\n1,1.5\n2,1.2\n")
    out = tmp_path / "plots.json"
    out.write_text(sh(root, DVC, "plots", "show", "--json", "-o", str(tmp_path / "dvc_json")))
    return out


def test_every_vega_chart_becomes_a_png_verdict_first(tmp_path, plots_json):
    proc = render(tmp_path, plots_json)
    assert proc.returncode == 0, proc.stderr
    charts = tmp_path / "charts"
    assert sorted(p.name for p in charts.glob("*.png")) == ["ap.png", "curve_csv.png",
                                                           "verdict.png"]
    for png in charts.glob("*.png"):
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 80
            # white background, so the chart reads on a dark page too
            assert image.convert("RGBA").getpixel((1, 1)) == (255, 255, 255, 255)
    listing = (charts / "charts.md").read_text().splitlines()
    assert listing == ["- **Verdict**: `verdict.png`", "- **AP per class**: `ap.png`",
                       "- **curve.csv**: `curve_csv.png`"]


def test_input_that_is_not_dvc_plots_json_is_refused(tmp_path):
    for text in ("not json", json.dumps({"no": "data"}), json.dumps({"data": {}})):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        proc = render(tmp_path, bad)
        assert proc.returncode == 2, text
    assert not (tmp_path / "charts").exists()


def test_a_chart_that_cannot_render_fails_naming_it(tmp_path, plots_json):
    shown = json.loads(plots_json.read_text())
    shown["data"]["ap"][0]["content"]["layer"][1]["mark"] = "no-such-mark"
    plots_json.write_text(json.dumps(shown))
    proc = render(tmp_path, plots_json)
    assert proc.returncode == 1 and "chart 'ap' did not render" in proc.stderr


def test_a_chart_that_would_fetch_data_is_refused(tmp_path, plots_json):
    """Offline by construction: a spec whose data lives at a URL is not fetched."""
    shown = json.loads(plots_json.read_text())
    shown["data"]["verdict"][0]["content"]["data"] = {"url": "https://example.com/rows.json"}
    plots_json.write_text(json.dumps(shown))
    proc = render(tmp_path, plots_json)
    assert proc.returncode == 1 and "External data url not allowed" in proc.stderr


def test_the_pr_workflow_renders_the_charts_and_links_them(repo_root):
    """The workflow runs the commands tested here and posts a link to the uploaded report."""
    import yaml

    flow = yaml.safe_load((repo_root / ".github" / "workflows" / "ssd-repro.yml").read_text())
    steps = [s for job in flow["jobs"].values() for s in job["steps"]]
    names = [s.get("name", s.get("uses", "")) for s in steps]
    render = next(s for s in steps if "stages.report_images" in s.get("run", ""))
    assert 'dvc plots diff "origin/$BASE_REF" --json' in render["run"]
    assert "--plots dvc_plots/plots.json --out dvc_plots/charts" in render["run"]
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    # in the pipeline's directory, where the steps run (SSD_REPRO_DIR, test_ci_story.py)
    assert upload["with"]["path"] == "${{ env.PIPELINE_DIR }}/dvc_plots/"
    assert upload["id"] == "upload"
    comment = next(s for s in steps if "github-script" in s.get("uses", ""))
    assert comment["env"]["REPORT_URL"] == "${{ steps.upload.outputs.artifact-url }}"
    assert "dvc_plots/charts/charts.md" in comment["with"]["script"]
    # rendered and uploaded before the comment that links them
    assert names.index(render["name"]) < names.index(upload["name"]) < names.index(
        comment["name"])


def test_readme_shows_a_small_picture_of_the_demo_verdict(repo_root):
    readme = (repo_root / "README.md").read_text()
    assert "(report/demo-verdict.png)" in readme
    picture = repo_root / "report" / "demo-verdict.png"
    assert picture.stat().st_size < 100_000
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.width >= 800
