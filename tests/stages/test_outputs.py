"""What any stage may replace or delete (stages/outputs.py, through common.atomic_path)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.common import atomic_path, write_json, write_text_atomic
from stages.outputs import MARKER, OutputError, check_outputs, claim_dir


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_file_output_replaces_a_file_and_a_symlink_never_its_target(cwd):
    (cwd / "m.json").write_text("old")
    write_json("m.json", {"a": 1})
    assert (cwd / "m.json").read_text() == '{\n  "a": 1\n}\n'
    (cwd / "target.txt").write_text("not mine")
    (cwd / "link.json").symlink_to("target.txt")
    write_json("link.json", {"b": 2})
    assert not (cwd / "link.json").is_symlink() and (cwd / "target.txt").read_text() == "not mine"


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.mkdir(), "it is a directory; a file is expected here"),
    (lambda p: os.mkfifo(p), "it is a special file"),
])
def test_file_output_never_replaces_a_directory_or_special_file(cwd, make, needle):
    make(cwd / "out")
    with pytest.raises(OutputError, match=f"out: refusing to replace it: {needle}"):
        write_text_atomic("out", "text")
    assert os.path.lexists(cwd / "out") and os.listdir(cwd) == ["out"]


def test_directory_output_replaces_only_a_marked_or_empty_directory(cwd):
    (cwd / "empty").mkdir()
    with atomic_path("empty", kind="dir") as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
    assert sorted(os.listdir(cwd / "empty")) == [MARKER, "a"]  # now marked as a stage's
    with atomic_path("empty") as tmp:  # kind from what was written
        tmp.mkdir()
    assert os.listdir(cwd / "empty") == [MARKER]
    (cwd / "theirs").mkdir()
    (cwd / "theirs" / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="theirs: refusing to replace it: it is a directory a "
                                          f"stage did not write \\(no {MARKER} marker\\)"):
        with atomic_path("theirs", kind="dir") as tmp:
            raise AssertionError("never reached: refused before any work")
    with pytest.raises(OutputError, match="it is a directory a stage did not write"):
        with atomic_path("theirs") as tmp:  # kind unknown: still refused, after the work
            tmp.mkdir()
    assert os.listdir(cwd / "theirs") == ["thesis.tex"]
    assert sorted(os.listdir(cwd)) == ["empty", "theirs"]  # no temp left behind


@pytest.mark.parametrize("path, needle", [
    (".", "it is the directory the stage runs in"),
    ("..", "it contains the directory the stage runs in"),
    ("/", "it contains the directory the stage runs in"),
    ("repo", r"it is a repository root \(it holds .git or .dvc\)"),
    ("dvcrepo", "it is a repository root"),
])
def test_protected_directories_are_never_replaced_even_if_marked(cwd, path, needle):
    for repo, meta in (("repo", ".git"), ("dvcrepo", ".dvc")):
        (cwd / repo / meta).mkdir(parents=True)
        (cwd / repo / MARKER).write_text("a marker does not make a repository replaceable")
    (cwd / MARKER).write_text("nor the working directory")
    before = sorted(str(p) for p in cwd.rglob("*"))
    with pytest.raises(OutputError, match=needle):
        with atomic_path(path, kind="dir") as tmp:
            tmp.mkdir()
    with pytest.raises(OutputError, match=needle):
        check_outputs(dirs={"--out": path})
    assert sorted(str(p) for p in cwd.rglob("*")) == before


def test_only_the_exact_temp_names_of_a_killed_run_are_cleaned_up(cwd):
    (cwd / ".out.abcd1234.tmp").mkdir()           # atomic_path's own name for "out"
    (cwd / ".out.abcd1234.old.tmp").write_text("")  # and the aside copy of a replaced dir
    for name in (".out.backup.tmp", ".out.abcd1234.tmp.keep", ".outer.abcd1234.tmp", "out.tmp"):
        (cwd / name).write_text("not the stage's")
    write_text_atomic("out", "x")
    assert sorted(os.listdir(cwd)) == [".out.abcd1234.tmp.keep", ".out.backup.tmp",
                                       ".outer.abcd1234.tmp", "out", "out.tmp"]


@pytest.mark.parametrize("outputs, inputs, needle", [
    ({"files": {"--out": "m/a.json"}}, {"--metrics": ["m/a.json"]}, "--out m/a.json: is --metrics"),
    ({"dirs": {"--out": "data"}}, {"--archives": "data/dl"}, "--out data: contains --archives"),
    ({"dirs": {"--out": "data/dl/x"}}, {"--archives": "data/dl"}, "lies inside --archives"),
    ({"files": {"--out": "params.yaml"}}, {}, "--out params.yaml: refusing .* pipeline's params"),
    ({"files": {"--out": "sub"}}, {"--in": "sub/x"}, "--out sub: contains --in sub/x"),
    ({"own_dirs": {"--out": "d", "--partial-dir": "d/p"}}, {}, "--out d: contains --partial-dir"),
])
def test_outputs_must_not_overlap_inputs_or_each_other(cwd, outputs, inputs, needle):
    with pytest.raises(OutputError, match=needle):
        check_outputs(inputs=inputs, **outputs)


def test_claim_dir_recognises_the_stages_entries_only(cwd):
    claim_dir("fresh", "--out")
    assert os.listdir(cwd / "fresh") == [MARKER]
    (cwd / "mixed").mkdir()
    (cwd / "mixed" / "a.zip").write_text("1")
    (cwd / "mixed" / "b.txt").write_text("2")
    with pytest.raises(OutputError, match=r"entries this stage did not write \('b.txt'\)"):
        claim_dir("mixed", "--out", lambda e: e.name.endswith(".zip"))
    assert sorted(os.listdir(cwd / "mixed")) == ["a.zip", "b.txt"]
    (cwd / "link").symlink_to("fresh")
    with pytest.raises(OutputError, match="is a symlink"):
        claim_dir("link", "--out")


@pytest.mark.parametrize("stage, args", [
    ("generate", ["--out", "."]),
    ("generate", ["--out", "mine"]),
    ("compare", ["--metrics", "a.json", "--out", "a.json", "--rows", "rows.json"]),
    ("compare", ["--metrics", "a.json", "--out", "mine", "--rows", "rows.json"]),
    ("compare", ["--metrics", "a.json", "--out", "out.json", "--rows", "mine"]),
])
def test_stage_entry_points_refuse_outputs_they_do_not_own(tmp_path, repo_root, stage, args):
    """Exit 2 before any work, nothing touched."""
    (tmp_path / "params.yaml").write_text((repo_root / "demo" / "params.yaml").read_text())
    (tmp_path / "a.json").write_text('{"map": 1.0}')
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("keep")
    before = sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    run = subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "refusing" in run.stderr or "is --metrics" in run.stderr, run.stderr
    assert sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("name", ["params.yaml", "dvc.yaml", "dvc.lock"])
def test_pipeline_files_are_never_replaced_by_any_stage(cwd, name):
    """Even a stage without an entry check (atomic_path alone) never overwrites them."""
    (cwd / name).write_text("the pipeline's own")
    with pytest.raises(OutputError, match=f"{name}: refusing to replace it: it is the "
                                          f"pipeline's {name}"):
        write_json(name, {"a": 1})
    assert (cwd / name).read_text() == "the pipeline's own"
