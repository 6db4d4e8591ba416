"""Download stage against a real HTTP server on 127.0.0.1 (tests/httpserver.py)."""
from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.common import StageError
from stages.config import ParamsError
from stages.download import Archive, Dataset, DownloadParams, download_dataset, main

PARAMS = DownloadParams(timeout_s=1.0, retries=3, backoff_s=0.01, backoff_max_s=0.05,
                        chunk_bytes=16 * 1024)
SIZE = 300_000


@pytest.fixture(scope="module")
def payload() -> bytes:
    return random.Random(7).randbytes(SIZE)


def archive(url: str, data: bytes, **wrong) -> Archive:
    return Archive(url=url, md5=wrong.get("md5", hashlib.md5(data).hexdigest()),
                   sha1=wrong.get("sha1", hashlib.sha1(data).hexdigest()))


def fetch(tmp_path: Path, *archives: Archive, params: DownloadParams = PARAMS) -> Path:
    """Run the stage's logic; returns the output dir."""
    out = tmp_path / "downloads"
    download_dataset(Dataset(archives=list(archives), expect=["x"]), out, tmp_path / "partial",
                     params)
    return out


def leftovers(tmp_path: Path) -> list[str]:
    """Everything in the partial dir and hidden temp files in the out dir."""
    partial = sorted(p.name for p in (tmp_path / "partial").iterdir())
    hidden = sorted(p.name for p in (tmp_path / "downloads").glob(".*"))
    return partial + hidden


def resumed_from(request) -> int:
    assert request.range and request.range.startswith("bytes="), request
    return int(request.range[len("bytes="):-1])


def test_full_download(archive_server, tmp_path, payload):
    url = archive_server.add("/zips/val2017.zip", payload)
    out = fetch(tmp_path, archive(url, payload))
    assert (out / "val2017.zip").read_bytes() == payload
    assert leftovers(tmp_path) == []
    assert [r.range for r in archive_server.requests] == [None]


def test_dropped_connection_resumes_with_range(archive_server, tmp_path, payload):
    url = archive_server.add("/a.zip", payload, plan=[("cut", 100_000)])
    out = fetch(tmp_path, archive(url, payload))
    assert (out / "a.zip").read_bytes() == payload
    assert [r.range for r in archive_server.requests][0] is None
    assert 0 < resumed_from(archive_server.requests[1]) <= 100_000  # whole chunks that arrived


def test_rerun_resumes_partial_file_and_hashes_it_first(archive_server, tmp_path, payload):
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "a.zip").write_bytes(payload[:123_456])  # an interrupted earlier run
    url = archive_server.add("/a.zip", payload)
    out = fetch(tmp_path, archive(url, payload))
    assert (out / "a.zip").read_bytes() == payload
    assert [r.range for r in archive_server.requests] == ["bytes=123456-"]


def test_server_ignoring_range_restarts_from_zero(archive_server, tmp_path, payload):
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "a.zip").write_bytes(b"garbage" * 1000)  # appending would corrupt
    url = archive_server.add("/a.zip", payload, plan=["norange"])
    out = fetch(tmp_path, archive(url, payload))
    assert (out / "a.zip").read_bytes() == payload
    assert [r.range for r in archive_server.requests] == ["bytes=7000-"]


def test_range_not_satisfiable(archive_server, tmp_path, payload):
    """416: a complete partial file is verified as is; a too-long one is fetched again."""
    url = archive_server.add("/a.zip", payload)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "a.zip").write_bytes(payload)
    out = fetch(tmp_path, archive(url, payload))
    assert (out / "a.zip").read_bytes() == payload
    (out / "a.zip").unlink()
    (tmp_path / "partial" / "a.zip").write_bytes(payload + b"extra")
    fetch(tmp_path, archive(url, payload))
    assert (out / "a.zip").read_bytes() == payload
    assert [r.range for r in archive_server.requests] == [
        f"bytes={SIZE}-", f"bytes={SIZE + 5}-", None]


def test_checksum_mismatch_names_expected_and_actual(archive_server, tmp_path, payload):
    url = archive_server.add("/a.zip", payload)
    bad = "0" * 40
    with pytest.raises(StageError) as err:
        fetch(tmp_path, archive(url, payload, sha1=bad))
    message = str(err.value)
    assert "a.zip" in message and "checksum mismatch" in message
    assert f"sha1 expected {bad}, got {hashlib.sha1(payload).hexdigest()}" in message
    assert "md5" not in message.split("mismatch")[1]  # md5 matched: only sha1 is reported
    assert not (tmp_path / "downloads" / "a.zip").exists()
    assert leftovers(tmp_path) == []


def test_404_fails_at_once(archive_server, tmp_path, payload):
    url = archive_server.add("/missing.zip", payload, plan=[("status", 404)])
    with pytest.raises(StageError, match=r"missing\.zip: HTTP 404 .*not retried"):
        fetch(tmp_path, archive(url, payload))
    assert len(archive_server.requests) == 1
    assert os.listdir(tmp_path / "downloads") == []


def test_500_then_success(archive_server, tmp_path, payload):
    url = archive_server.add("/a.zip", payload, plan=[("status", 500), ("status", 503)])
    out = fetch(tmp_path, archive(url, payload))
    assert (out / "a.zip").read_bytes() == payload
    assert len(archive_server.requests) == 3


def test_persistent_500_gives_up_with_clear_error(archive_server, tmp_path, payload):
    url = archive_server.add("/a.zip", payload, plan=[("status", 500)] * 10)
    with pytest.raises(StageError, match=r"a\.zip: giving up after 4 failed attempt\(s\) in a "
                                         r"row \(download\.retries = 3\).*HTTP 500"):
        fetch(tmp_path, archive(url, payload))
    assert len(archive_server.requests) == 4
    assert not (tmp_path / "downloads" / "a.zip").exists()


def test_timeout_mid_body_retries_and_resumes(archive_server, tmp_path, payload):
    url = archive_server.add("/a.zip", payload, plan=[("stall", 50_000, 5.0)])
    params = PARAMS.model_copy(update={"timeout_s": 0.5})
    out = fetch(tmp_path, archive(url, payload), params=params)
    assert (out / "a.zip").read_bytes() == payload
    assert [r.range for r in archive_server.requests][0] is None
    assert 0 < resumed_from(archive_server.requests[1]) <= 50_000


def test_file_url_and_local_path(tmp_path, payload, monkeypatch):
    mirror = tmp_path / "mirror dir"
    mirror.mkdir()
    (mirror / "a.zip").write_bytes(payload)
    (mirror / "b.tar").write_bytes(payload[::-1])
    monkeypatch.chdir(tmp_path)  # plain paths are relative to where the stage runs
    out = fetch(tmp_path, archive((mirror / "a.zip").as_uri(), payload),
                archive("mirror dir/b.tar", payload[::-1]))
    assert (out / "a.zip").read_bytes() == payload
    assert (out / "b.tar").read_bytes() == payload[::-1]
    with pytest.raises(StageError, match="cannot copy mirror dir/nope.tar: No such file"):
        fetch(tmp_path, archive("mirror dir/nope.tar", payload))


def test_present_archive_kept_stale_removed_corrupt_refetched(archive_server, tmp_path, payload):
    """The out dir may hold hardlinks into DVC's read-only cache: never write into them."""
    url_a = archive_server.add("/a.zip", payload)
    url_b = archive_server.add("/b.zip", payload[:1000])
    out, partial = tmp_path / "downloads", tmp_path / "partial"
    out.mkdir()
    partial.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, data in (("a", payload), ("b", b"corrupt")):
        (cache / name).write_bytes(data)
        (cache / name).chmod(0o444)
        os.link(cache / name, out / f"{name}.zip")
    (out / "old.zip").write_bytes(b"from an earlier archive list")
    (partial / "old.zip").write_bytes(b"half")
    fetch(tmp_path, archive(url_a, payload), archive(url_b, payload[:1000]))
    assert sorted(os.listdir(out)) == ["a.zip", "b.zip"]
    assert (out / "b.zip").read_bytes() == payload[:1000]
    assert (cache / "b").read_bytes() == b"corrupt"  # replaced by rename, not written through
    assert [r.path for r in archive_server.requests] == ["/b.zip"]
    assert leftovers(tmp_path) == []


def test_proxy_from_environment_is_used(archive_server, tmp_path, payload, monkeypatch):
    """requests honours HTTP_PROXY: the loopback server acts as the proxy of a made-up host."""
    archive_server.add("/zips/a.zip", payload)
    monkeypatch.setenv("HTTP_PROXY", archive_server.base_url)
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")
    out = fetch(tmp_path, archive("http://mirror.invalid/zips/a.zip", payload))
    assert (out / "a.zip").read_bytes() == payload
    assert [r.proxied for r in archive_server.requests] == [True]


# --- the stage's command line: params validated before any work --------------------------------

def write_params(directory: Path, archives: list[dict], **download) -> None:
    params = {"data": {"coco": {"archives": archives, "expect": ["val2017"]}},
              "download": {**PARAMS.model_dump(), **download}}
    (directory / "params.yaml").write_text(yaml.safe_dump(params))


GOOD = {"url": "http://127.0.0.1:1/a.zip", "md5": "0" * 32, "sha1": "0" * 40}


@pytest.mark.parametrize("archives, download, needle", [
    ([{**GOOD, "md5": "abc"}], {}, "data.coco.archives.0.md5: String should match pattern"),
    ([{**GOOD, "mirror": "x"}], {}, "data.coco.archives.0.mirror: unknown key; allowed keys: "
                                    "url, md5, sha1"),
    ([{**GOOD, "url": "ftp://h/a.zip"}], {}, "data.coco.archives.0.url: Value error, URL scheme "
                                             "'ftp' is not supported"),
    ([GOOD, GOOD], {}, "archives must have distinct file names (repeated: ['a.zip'])"),
    ([GOOD], {"retries": -1}, "download.retries: Input should be greater than or equal to 0"),
    ([GOOD], {"timeuot_s": 1}, "download.timeuot_s: unknown key"),
])
def test_bad_params_fail_before_any_work(tmp_path, monkeypatch, archives, download, needle):
    write_params(tmp_path, archives, **download)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError) as err:
        main(["coco", "--out", "out", "--partial-dir", "partial"])
    assert needle in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["params.yaml"]


def test_cli_exit_codes(archive_server, tmp_path, payload):
    """Exit 2 with the key named for bad params; exit 1 with URL and status for a 404."""
    cmd = [sys.executable, "-m", "stages.download", "coco", "--out", "d", "--partial-dir", "p"]
    write_params(tmp_path, [{**GOOD, "sha1": "XYZ"}])
    bad = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2, bad.stderr
    assert "data.coco.archives.0.sha1" in bad.stderr and "Traceback" not in bad.stderr
    url = archive_server.add("/gone.zip", payload, plan=[("status", 404)])
    write_params(tmp_path, [{**GOOD, "url": url}])
    gone = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert gone.returncode == 1, gone.stderr
    assert f"{url}: HTTP 404" in gone.stderr and "Traceback" not in gone.stderr
