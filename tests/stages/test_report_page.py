"""The report page build (stages/report_page.py) on generated npm-style tarballs, and the
committed page against its lock file, offline."""
import configparser
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from stages.report_page import (SCRIPT_RE, Package, build_page, read_lock, sri_sha512,
                                verify_page)

PAGE = """<!DOCTYPE html>
<html><head>{refresh_tag}
<!-- VENDOR -->
</head><body>{plot_divs}</body></html>
"""


def tarball(path: Path, files: dict[str, str]) -> str:
    """An npm-style .tgz (everything under package/); returns its integrity string."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return sri_sha512(buf.getvalue())


def make_inputs(tmp_path, libs=None, page=PAGE):
    libs = libs or {"alpha": "var alpha = 1;", "beta": "var beta = alpha + 1;"}
    tarballs = tmp_path / "tgz"
    tarballs.mkdir()
    packages = []
    for name, code in libs.items():
        integrity = tarball(tarballs / f"{name}-1.2.3.tgz", {f"build/{name}.min.js": code})
        packages.append({"name": name, "version": "1.2.3", "integrity": integrity,
                         "file": f"build/{name}.min.js", "license": "MIT"})
    lock = tmp_path / "vendor.json"
    lock.write_text(json.dumps({"packages": packages}))
    source = tmp_path / "page.html"
    source.write_text(page)
    return lock, source, tarballs


def build(tmp_path, lock, source, tarballs):
    out = tmp_path / "out" / "plots.html"
    proc = subprocess.run([sys.executable, "-m", "stages.report_page", "--lock", str(lock),
                           "--page", str(source), "--out", str(out), "--tarballs", str(tarballs)],
                          capture_output=True, text=True, timeout=120)
    return proc, out


def test_build_inlines_the_pinned_libraries_in_order(tmp_path):
    lock, source, tarballs = make_inputs(tmp_path)
    proc, out = build(tmp_path, lock, source, tarballs)
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    assert [m[0] for m in SCRIPT_RE.findall(page)] == ["alpha", "beta"]
    assert "var alpha = 1;" in page and "<!-- VENDOR -->" not in page
    assert page.count("{plot_divs}") == 1 and "{refresh_tag}" in page  # left for DVC
    assert verify_page(page, read_lock(lock)) == []
    verify = subprocess.run([sys.executable, "-m", "stages.report_page", "--lock", str(lock),
                             "--verify", str(out)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr


def test_a_tampered_tarball_is_refused_and_nothing_written(tmp_path):
    lock, source, tarballs = make_inputs(tmp_path)
    tarball(tarballs / "beta-1.2.3.tgz", {"build/beta.min.js": "evil();"})  # same name, new bytes
    proc, out = build(tmp_path, lock, source, tarballs)
    assert proc.returncode == 1
    assert "beta 1.2.3: checksum mismatch" in proc.stderr and "expected sha512-" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("code, needle", [
    ("x = '</script><script>alert(1)';", "'</script'"),
    ("/* <!-- */", "'<!--'"),
    ("s = '{plot_divs}';", "'{plot_divs}'"),
])
def test_a_library_that_cannot_be_inlined_is_refused(tmp_path, code, needle):
    lock, source, tarballs = make_inputs(tmp_path, {"alpha": code})
    proc, out = build(tmp_path, lock, source, tarballs)
    assert proc.returncode == 1 and needle in proc.stderr and not out.exists()


@pytest.mark.parametrize("page, needle", [
    (PAGE.replace("<!-- VENDOR -->", ""), "needs the line <!-- VENDOR --> exactly once"),
    (PAGE.replace("{plot_divs}", ""), "{plot_divs} appears 0 time(s)"),
    (PAGE.replace("</head>", "{scripts}</head>"), "{scripts} appears 1 time(s)"),
])
def test_a_bad_page_source_is_refused_before_any_work(tmp_path, page, needle):
    lock, source, tarballs = make_inputs(tmp_path, page=page)
    proc, out = build(tmp_path, lock, source, tarballs)
    assert proc.returncode == 2 and needle in proc.stderr and not out.exists()


def test_a_bad_lock_is_refused(tmp_path):
    lock, source, tarballs = make_inputs(tmp_path)
    data = json.loads(lock.read_text())
    data["packages"][0]["version"] = "^1.2.3"  # a range is not a pin
    data["packages"][1]["integrity"] = "sha1-abc"
    lock.write_text(json.dumps(data))
    proc, _ = build(tmp_path, lock, source, tarballs)
    assert proc.returncode == 2
    assert "packages.0.version" in proc.stderr and "packages.1.integrity" in proc.stderr


def test_verify_catches_an_edited_library(tmp_path):
    lock, source, tarballs = make_inputs(tmp_path)
    _, out = build(tmp_path, lock, source, tarballs)
    page = out.read_text().replace("var alpha = 1;", "var alpha = 2;")
    assert any("alpha: inlined text has sha256" in p for p in verify_page(page, read_lock(lock)))
    assert verify_page(page.replace("</head>", '<script src="https://x/y.js"></script></head>'),
                       read_lock(lock))


# The committed page, its lock and the DVC configuration of both projects.

def test_committed_page_is_the_locked_libraries_in_the_current_page_source(repo_root):
    report = repo_root / "report"
    lock = read_lock(report / "vendor.json")
    assert [p.name for p in lock.packages] == ["vega", "vega-lite", "vega-embed"]
    built = (report / "plots.html").read_text(encoding="utf-8")
    assert verify_page(built, lock) == []
    # rebuilt from report/page.html with the libraries it inlines: byte-identical, so the
    # committed page is up to date with its source
    libraries = [(Package(**p.model_dump()), text)
                 for p, (*_, text) in zip(lock.packages, SCRIPT_RE.findall(built))]
    page = (report / "page.html").read_text(encoding="utf-8")
    assert build_page(page, libraries) == built, \
        "report/plots.html is stale: rebuild it (python -m stages.report_page ...)"
    assert "http://" not in page.replace("http://www.w3.org", "")  # nothing remote in our code
    assert "https://" not in page


def test_both_projects_use_the_page_and_the_same_custom_templates(repo_root):
    for project in (repo_root, repo_root / "demo"):
        config = configparser.ConfigParser()
        config.read(project / ".dvc" / "config")
        template = (project / ".dvc" / config["plots"]["html_template"]).resolve()
        assert template == (repo_root / "report" / "plots.html").resolve(), project
    root_templates = sorted((repo_root / ".dvc" / "plots").glob("*.json"))
    assert [p.name for p in root_templates] == ["ap_by_precision.json", "pr_by_precision.json",
                                                "verdict.json"]
    for path in root_templates:
        json.loads(path.read_text())
        twin = repo_root / "demo" / ".dvc" / "plots" / path.name
        assert twin.read_bytes() == path.read_bytes(), f"{twin} differs from {path}"


def test_the_page_shows_why_a_chart_failed(tmp_path, repo_root):
    """In Chromium, offline: a chart whose spec vega-lite rejects shows the error in its place
    (the report's charts render through the page's wrapper of vegaEmbed)."""
    from tests.browser import open_page

    dvc = str(Path(sys.executable).with_name("dvc"))
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=root, check=True)
    (root / ".dvc" / "plots").mkdir()
    (root / ".dvc" / "plots" / "broken.json").write_text(json.dumps({
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "data": {"values": "<DVC_METRIC_DATA>"}, "mark": "no-such-mark",
        "encoding": {"x": {"field": "<DVC_METRIC_X>", "type": "quantitative"}}}))
    (root / "dvc.yaml").write_text("plots:\n  - good.csv\n  - bad:\n      template: broken\n"
                                   "      x: step\n      y:\n        good.csv: loss\n")
    (root / "good.csv").write_text("step,loss\n0,2.0\n1,1.5\n2,1.2\n")
    out = tmp_path / "html"
    subprocess.run([dvc, "plots", "show", "--html-template", str(repo_root / "report" /
                    "plots.html"), "-o", str(out)], cwd=root, check=True, capture_output=True)
    state = open_page(out / "index.html", ["good_csv", "bad"], tmp_path / "shot.png")
    good, bad = state["charts"]
    assert good["views"] == 1 and good["error"] == ""
    assert bad["views"] == 0 and "This chart failed to render" in bad["error"]
    assert state["sections"] == ["section-other"]  # neither is a known report chart
