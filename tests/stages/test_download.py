"""The download stage: its params, its command line and what it may touch (fetching itself:
test_fetch.py)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.config import ParamsError
from stages.data_params import Archive, Dataset
from stages.download import DownloadParams, download_dataset, main
from stages.outputs import MARKER, OutputError

PARAMS = DownloadParams(timeout_s=1.0, retries=3, backoff_s=0.01, backoff_max_s=0.05,
                        chunk_bytes=16 * 1024, deadline_s=60.0, max_bytes=10_000_000)
DATA = b"archive bytes" * 1000


def archive(url: str, data: bytes = DATA) -> Archive:
    return Archive(url=url, md5=hashlib.md5(data).hexdigest(), sha1=hashlib.sha1(data).hexdigest())


def fetch(tmp_path: Path, *archives: Archive) -> Path:
    out = tmp_path / "downloads"
    named = {f"archive{i}": a for i, a in enumerate(archives)}
    download_dataset(Dataset(archives=named, expect=["x"]), out, tmp_path / "partial", PARAMS)
    return out


def test_present_archive_kept_stale_removed_corrupt_refetched(archive_server, tmp_path):
    """The out dir may hold hardlinks into DVC's read-only cache: never write into them."""
    url_a = archive_server.add("/a.zip", DATA)
    url_b = archive_server.add("/b.zip", DATA[:1000])
    out, partial = tmp_path / "downloads", tmp_path / "partial"
    out.mkdir()
    partial.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, data in (("a", DATA), ("b", b"corrupt")):
        (cache / name).write_bytes(data)
        (cache / name).chmod(0o444)
        os.link(cache / name, out / f"{name}.zip")
    (out / "old.zip").write_bytes(b"from an earlier archive list")
    (partial / "old.zip.part").write_bytes(b"half")
    fetch(tmp_path, archive(url_a), archive(url_b, DATA[:1000]))
    assert sorted(os.listdir(out)) == [MARKER, "a.zip", "b.zip"]
    assert (out / "b.zip").read_bytes() == DATA[:1000]
    assert (cache / "b").read_bytes() == b"corrupt"  # replaced by rename, not written through
    assert [r.path for r in archive_server.requests] == ["/b.zip"]
    assert sorted(os.listdir(partial)) == [MARKER]


@pytest.mark.parametrize("where, foreign", [
    ("downloads", "notes.txt"), ("downloads", "subdir/"), ("partial", "a.zip"),
    ("partial", "keep-me.txt"), ("partial", "x.zip.part/"),
])
def test_foreign_entries_are_refused_and_kept(tmp_path, where, foreign):
    """A directory holding something the stage did not write is not the stage's: it refuses
    to start, and deletes nothing (it used to delete every name it did not recognise)."""
    directory = tmp_path / where
    target = directory / foreign.rstrip("/")
    if foreign.endswith("/"):
        target.mkdir(parents=True)
    else:
        directory.mkdir()
        target.write_bytes(b"not the stage's")
    with pytest.raises(OutputError, match=f"entries this stage did not write \\('{target.name}'"):
        fetch(tmp_path, archive("http://127.0.0.1:1/a.zip"))
    assert target.exists() and not (directory / MARKER).exists()


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.download", "coco", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flag, value", [
    ("--partial-dir", "."), ("--out", "."), ("--partial-dir", ".."), ("--out", "repo"),
    ("--out", "a-file"), ("--partial-dir", "link"), ("--out", "p"),
])
def test_cli_refuses_output_dirs_it_does_not_own(tmp_path, flag, value):
    """`--partial-dir .` used to delete every file of the working directory it did not know."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    write_params(cwd, [{**GOOD, "url": "a.zip"}])
    (cwd / "notes.txt").write_text("mine")
    (cwd / "a-file").write_text("mine")
    (cwd / "repo" / ".git").mkdir(parents=True)
    (cwd / "link").symlink_to(tmp_path)
    args = {"--out": "d", "--partial-dir": "p", flag: value}
    before = sorted(os.listdir(cwd)), sorted(os.listdir(tmp_path))
    run = _cli(cwd, "--out", args["--out"], "--partial-dir", args["--partial-dir"])
    assert run.returncode == 2, run.stderr
    assert f"{flag} {value}" in run.stderr and "Traceback" not in run.stderr
    assert (sorted(os.listdir(cwd)), sorted(os.listdir(tmp_path))) == before
    assert (cwd / "notes.txt").read_text() == "mine"


def test_cli_refuses_a_local_source_inside_out(tmp_path):
    write_params(tmp_path, [{**GOOD, "url": "d/a.zip"}])
    run = _cli(tmp_path, "--out", "d", "--partial-dir", "p")
    assert run.returncode == 2 and "--out d: contains a local archive" in run.stderr, run.stderr


# --- params validated before any work --------------------------------------------------------

def write_params(directory: Path, archives: list[dict] | dict | tuple, **download) -> None:
    """``archives``: a list is named a, b, c... (the params form is a mapping); a dict as is;
    ``("as written", value)`` writes ``value`` unchanged."""
    if isinstance(archives, tuple):
        archives = archives[1]
    elif isinstance(archives, list):
        archives = {"abcdefgh"[i]: a for i, a in enumerate(archives)}
    params = {"data": {"coco": {"archives": archives, "expect": ["val2017"]}},
              "download": {**PARAMS.model_dump(), **download}}
    (directory / "params.yaml").write_text(yaml.safe_dump(params))


GOOD = {"url": "http://127.0.0.1:1/a.zip", "md5": "0" * 32, "sha1": "0" * 40}


@pytest.mark.parametrize("archives, download, needle", [
    ([{**GOOD, "md5": "abc"}], {}, "data.coco.archives.a.md5: String should match pattern"),
    ([{**GOOD, "mirror": "x"}], {}, "data.coco.archives.a.mirror: unknown key; allowed keys: "
                                    "url, md5, sha1"),
    ([{**GOOD, "url": "ftp://h/a.zip"}], {}, "data.coco.archives.a.url: Value error, URL scheme "
                                             "'ftp' is not supported"),
    ([{**GOOD, "url": "http://h/zips/.."}], {}, "data.coco.archives.a.url: Value error, URL must "
                                                "end with the archive's file name (got '..')"),
    ([{**GOOD, "url": "http://h/zips/."}], {}, "(got '.')"),
    ([{**GOOD, "url": "http://h/a%2F..%2F.."}], {}, "(got '..')"),
    ([{**GOOD, "url": "http://h/.hidden.zip"}], {}, "not starting with a dot"),
    ([GOOD, GOOD], {}, "archives must have distinct file names (repeated: ['a.zip'])"),
    (("as written", [GOOD]), {}, "data.coco.archives: Value error, must be a mapping of name "
                                 "-> entry (e.g. `val2017: {url: "),  # the earlier list form
    ({"val.2017": GOOD}, {}, "data.coco.archives: name 'val.2017': String should match pattern"),
    ([GOOD], {"retries": -1}, "download.retries: Input should be greater than or equal to 0"),
    ([GOOD], {"timeuot_s": 1}, "download.timeuot_s: unknown key"),
    ([GOOD], {"deadline_s": float("inf")}, "download.deadline_s: Input should be a finite number"),
    ([GOOD], {"max_bytes": 0}, "download.max_bytes: Input should be greater than 0"),
])
def test_bad_params_fail_before_any_work(tmp_path, monkeypatch, archives, download, needle):
    write_params(tmp_path, archives, **download)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError) as err:
        main(["coco", "--out", "out", "--partial-dir", "partial"])
    assert needle in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["params.yaml"]


def test_cli_exit_codes(archive_server, tmp_path):
    """Exit 2 with the key named for bad params; exit 1 with URL and status for a 404."""
    write_params(tmp_path, [{**GOOD, "sha1": "XYZ"}])
    bad = _cli(tmp_path, "--out", "d", "--partial-dir", "p")
    assert bad.returncode == 2, bad.stderr
    assert "data.coco.archives.a.sha1" in bad.stderr and "Traceback" not in bad.stderr
    url = archive_server.add("/gone.zip", DATA, plan=[("status", 404)])
    write_params(tmp_path, [{**GOOD, "url": url}])
    gone = _cli(tmp_path, "--out", "d", "--partial-dir", "p")
    assert gone.returncode == 1, gone.stderr
    assert f"{url}: HTTP 404" in gone.stderr and "Traceback" not in gone.stderr
