"""The plots declared at the top of dvc.yaml render with `dvc plots show`, on small fake files.

The files are made from the declarations themselves (DVC resolves the `${vars}`), so the test
follows dvc.yaml as it grows: a plot of a CSV gets the columns its x/y name, a directory plot
with x/y gets dvclive-like TSV files, a directory plot without them gets a few PNG images.
"""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

DVC = str(Path(sys.executable).with_name("dvc"))
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg"}


def sh(cwd, *cmd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return proc.stdout


def fake_column(field: str, n: int) -> list:
    if field in ("class", "name", "label"):
        return [f"class_{i}" for i in range(n)]
    return [round(float(v), 4) for v in np.linspace(0.1, 0.9, n)]


def write_table(path: Path, fields: list[str], n: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {f: fake_column(f, n) for f in dict.fromkeys(fields)}
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
        return
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns),
                                delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)


def write_images(directory: Path, count: int = 2) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (16, 16), (40 * i, 120, 200)).save(directory / f"sample_{i}.png")


def fields_for(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def make_fake_files(root: Path, definitions: list) -> list[str]:
    """Create files for each resolved top-level plot definition; return the plot ids."""
    ids = []
    for definition in definitions:
        plot_id, cfg = (definition, {}) if isinstance(definition, str) else \
            next(iter(definition.items()))
        ids.append(plot_id)
        x, y = cfg.get("x"), cfg.get("y")
        if isinstance(y, dict):  # {file: field(s)}, x: a field or {file: field}
            for path, y_fields in y.items():
                x_fields = fields_for(x[path]) if isinstance(x, dict) else fields_for(x or "step")
                write_table(root / path, x_fields + fields_for(y_fields))
        elif Path(plot_id).suffix in IMAGE_SUFFIXES:
            write_images((root / plot_id).parent, 1)
        elif Path(plot_id).suffix:  # one data file, default or named fields
            write_table(root / plot_id, fields_for(x or "step") + fields_for(y or "value"))
        elif x or y or "template" in cfg:  # a directory of data files, as dvclive writes
            for name in ("train/loss", "train/acc"):
                write_table(root / plot_id / f"{name}.tsv", fields_for(x or "step")
                            + [name.split("/")[-1]])
        else:  # a directory of images
            write_images(root / plot_id)
    return ids


def declared_plots(root: Path) -> list:
    """Top-level plot definitions of root/dvc.yaml, and stage plots as {path: props}."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        index = repo.index
        definitions = list(index._plots.get(str(root / "dvc.yaml"), []))
        for stage in index.stages:
            definitions += [{out.def_path: out.plot if isinstance(out.plot, dict) else {}}
                            for out in stage.outs if out.plot]
    return definitions


def test_declared_plots_render(repo_root, tmp_path):
    """The project's dvc.yaml (stages too: the train stage declares the training curves)."""
    assert yaml.safe_load((repo_root / "dvc.yaml").read_text()).get("plots"), \
        "dvc.yaml declares no top-level plots"
    root = tmp_path / "repo"
    root.mkdir()
    sh(root, "git", "init", "-q")
    sh(root, DVC, "init", "-q")
    for name in ("dvc.yaml", "params.yaml"):
        (root / name).write_text((repo_root / name).read_text())
    shutil.copytree(repo_root / ".dvc" / "plots", root / ".dvc" / "plots")  # custom templates
    definitions = declared_plots(root)
    ids = make_fake_files(root, definitions)
    sources = {next(iter(d)): len(next(iter(d.values())).get("y", {}) or {}) for d in definitions
               if isinstance(d, dict) and isinstance(next(iter(d.values())).get("y"), dict)}
    assert any("dvclive" in plot_id for plot_id in ids), "no training curves declared"

    shown = json.loads(sh(root, DVC, "plots", "show", "--json"))
    assert not shown.get("errors"), shown.get("errors")
    rendered = shown["data"]
    kinds = set()
    for plot_id in ids:
        # a directory is shown as one plot per file under it
        matches = {k: v for k, v in rendered.items() if k == plot_id or k.startswith(plot_id + "/")}
        assert matches, f"{plot_id} not rendered; got {sorted(rendered)}"
        for key, renders in matches.items():
            for render in renders:
                kinds.add(render["type"])
                if render["type"] == "vega":
                    values = render["content"]["data"]["values"]
                    assert len(values) >= 2, key
                    # FP32 and INT8 files both in the one plot
                    assert len({v.get("filename") for v in values}) == sources.get(key, 1), key
                else:
                    assert render["type"] == "image" and Path(render["url"]).is_file(), key
    assert kinds == {"vega", "image"}

    out = tmp_path / "html"
    sh(root, DVC, "plots", "show", "--out", str(out))
    assert "coco_per_class_ap" in (out / "index.html").read_text()

    # and the real pipeline's report page renders every one of them offline in Chromium
    from tests.reportcheck import check_report

    page = repo_root / "report" / "plots.html"
    check_report(root, ["show", "--html-template", str(page)], tmp_path / "page")


@pytest.mark.parametrize("definitions, expect", [
    ([{"pa": {"x": "ap", "y": {"e/a.csv": "class"}}}], {"e/a.csv": "ap,class"}),
    (["e/samples"], {"e/samples/sample_0.png": None}),
    ([{"live/plots/metrics": {"x": "step"}}], {"live/plots/metrics/train/loss.tsv": "step\tloss"}),
])
def test_fake_files_follow_declarations(tmp_path, definitions, expect):
    make_fake_files(tmp_path, definitions)
    for path, header in expect.items():
        assert (tmp_path / path).is_file()
        if header:
            assert (tmp_path / path).read_text().splitlines()[0] == header
