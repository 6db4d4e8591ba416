"""Fetching one archive (stages/fetch.py) from a real HTTP server on 127.0.0.1."""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from stages.common import StageError
from stages.config import load_section
from stages.data_params import Archive
from stages.fetch import fetch_archive, new_session
from stages.partial import Limits

LIMITS = Limits(timeout_s=1.0, retries=3, backoff_s=0.01, backoff_max_s=0.05,
                chunk_bytes=16 * 1024, deadline_s=60.0, max_bytes=10_000_000)
SIZE = 300_000


@pytest.fixture(scope="module")
def payload() -> bytes:
    return random.Random(7).randbytes(SIZE)


def archive(url: str, data: bytes, **wrong) -> Archive:
    return Archive(url=url, md5=wrong.get("md5", hashlib.md5(data).hexdigest()),
                   sha1=wrong.get("sha1", hashlib.sha1(data).hexdigest()))


def fetch(tmp_path: Path, item: Archive, limits: Limits = LIMITS) -> Path:
    """Fetch into tmp/downloads (partial files in tmp/partial); returns the archive's path."""
    for sub in ("downloads", "partial"):
        (tmp_path / sub).mkdir(exist_ok=True)
    with new_session() as session:
        return fetch_archive(item, tmp_path / "downloads", tmp_path / "partial", limits, session)


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
    assert fetch(tmp_path, archive(url, payload)).read_bytes() == payload
    assert leftovers(tmp_path) == []
    assert [r.range for r in archive_server.requests] == [None]


def test_dropped_connection_resumes_at_the_exact_byte(archive_server, tmp_path, payload):
    url = archive_server.add("/a.zip", payload, plan=[("cut", 100_000)])
    assert fetch(tmp_path, archive(url, payload)).read_bytes() == payload
    assert [r.range for r in archive_server.requests] == [None, "bytes=100000-"]


def test_link_dropping_every_90kB_completes_with_the_project_params(archive_server, tmp_path,
                                                                    repo_root):
    """params.yaml's own `download` knobs (chunk_bytes 1 MiB): every byte that arrived before a
    drop is kept, so each attempt resumes exactly where the last one stopped. (Keeping whole
    chunks only, as before, never got past the first MiB.)"""
    params = load_section("download", _download_params_model(), repo_root / "params.yaml")
    assert params.chunk_bytes == 1 << 20
    data = random.Random(3).randbytes(3_000_000)
    drops = len(data) // 90_000
    url = archive_server.add("/VOCtrainval.tar", data, plan=[("cut", 90_000)] * drops)
    assert fetch(tmp_path, archive(url, data), params.limits()).read_bytes() == data
    starts = [resumed_from(r) for r in archive_server.requests[1:]]
    assert starts == [90_000 * i for i in range(1, drops + 1)]


def _download_params_model():
    from stages.download import DownloadParams  # the stage's params model (tests may import it)

    return DownloadParams


def test_rerun_resumes_partial_file_and_hashes_it_first(archive_server, tmp_path, payload):
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "a.zip.part").write_bytes(payload[:123_456])  # an interrupted run
    url = archive_server.add("/a.zip", payload)
    assert fetch(tmp_path, archive(url, payload)).read_bytes() == payload
    assert [r.range for r in archive_server.requests] == ["bytes=123456-"]


def test_server_ignoring_range_restarts_from_zero(archive_server, tmp_path, payload):
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "a.zip.part").write_bytes(b"garbage" * 1000)  # appending: corrupt
    url = archive_server.add("/a.zip", payload, plan=["norange"])
    assert fetch(tmp_path, archive(url, payload)).read_bytes() == payload
    assert [r.range for r in archive_server.requests] == ["bytes=7000-"]


def test_range_not_satisfiable(archive_server, tmp_path, payload):
    """416: a complete partial file is verified as is; a too-long one is fetched again."""
    url = archive_server.add("/a.zip", payload)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "a.zip.part").write_bytes(payload)
    out = fetch(tmp_path, archive(url, payload))
    assert out.read_bytes() == payload
    out.unlink()
    (tmp_path / "partial" / "a.zip.part").write_bytes(payload + b"extra")
    assert fetch(tmp_path, archive(url, payload)).read_bytes() == payload
    assert [r.range for r in archive_server.requests] == [
        f"bytes={SIZE}-", f"bytes={SIZE + 5}-", None]


def test_checksum_mismatch_names_expected_actual_and_real_size(archive_server, tmp_path, payload):
    url = archive_server.add("/a.zip", payload)
    bad = "0" * 40
    with pytest.raises(StageError) as err:
        fetch(tmp_path, archive(url, payload, sha1=bad))
    message = str(err.value)
    assert "a.zip" in message and "checksum mismatch" in message
    assert f"sha1 expected {bad}, got {hashlib.sha1(payload).hexdigest()}" in message
    assert "md5" not in message.split("mismatch")[1]  # md5 matched: only sha1 is reported
    assert f"({SIZE} bytes received; partial file removed)" in message  # not "0 bytes"
    assert not (tmp_path / "downloads" / "a.zip").exists()
    assert leftovers(tmp_path) == []


def test_failed_refetch_leaves_no_wrong_archive_in_out(archive_server, tmp_path, payload):
    """An archive in --out whose checksums differ is removed before fetching again: when the
    fetch then fails, --out holds nothing that does not match the params."""
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "a.zip").write_bytes(b"an older release of the archive")
    url = archive_server.add("/a.zip", payload, plan=[("status", 404)])
    with pytest.raises(StageError, match="HTTP 404"):
        fetch(tmp_path, archive(url, payload))
    assert os.listdir(tmp_path / "downloads") == []


def test_404_fails_at_once(archive_server, tmp_path, payload):
    url = archive_server.add("/missing.zip", payload, plan=[("status", 404)])
    with pytest.raises(StageError, match=r"missing\.zip: HTTP 404 .*not retried"):
        fetch(tmp_path, archive(url, payload))
    assert len(archive_server.requests) == 1
    assert os.listdir(tmp_path / "downloads") == []


def test_500_then_success(archive_server, tmp_path, payload):
    url = archive_server.add("/a.zip", payload, plan=[("status", 500), ("status", 503)])
    assert fetch(tmp_path, archive(url, payload)).read_bytes() == payload
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
    limits = Limits(**{**LIMITS.__dict__, "timeout_s": 0.5})
    assert fetch(tmp_path, archive(url, payload), limits).read_bytes() == payload
    assert [r.range for r in archive_server.requests] == [None, "bytes=50000-"]


def test_endless_body_is_cut_at_max_bytes(archive_server, tmp_path, payload):
    """A body that never ends (no Content-Length) cannot fill the disk."""
    url = archive_server.add("/a.zip", payload, plan=["endless"])
    limits = Limits(**{**LIMITS.__dict__, "max_bytes": 1_000_000})
    with pytest.raises(StageError, match=r"a\.zip: the body grew past more than "
                                         r"download\.max_bytes = 1000000 bytes; refused"):
        fetch(tmp_path, archive(url, payload), limits)
    assert leftovers(tmp_path) == [] and os.listdir(tmp_path / "downloads") == []


def test_announced_size_above_max_bytes_is_refused_before_any_byte(archive_server, tmp_path,
                                                                   payload):
    url = archive_server.add("/a.zip", payload)
    limits = Limits(**{**LIMITS.__dict__, "max_bytes": SIZE - 1})
    with pytest.raises(StageError, match=f"announces {SIZE} bytes, more than download.max_bytes"):
        fetch(tmp_path, archive(url, payload), limits)
    assert leftovers(tmp_path) == []


def test_trickling_body_stops_at_the_deadline(archive_server, tmp_path, payload):
    """A server that keeps sending a little, never timing out, still ends at deadline_s; the
    bytes that arrived stay for a later resume."""
    url = archive_server.add("/a.zip", payload, plan=[("trickle", 1000, 0.02)])
    limits = Limits(**{**LIMITS.__dict__, "deadline_s": 0.5})
    with pytest.raises(StageError, match=r"a\.zip: not complete after download\.deadline_s = "
                                         r"0\.5 s \(\d+ bytes so far"):
        fetch(tmp_path, archive(url, payload), limits)
    assert os.listdir(tmp_path / "downloads") == []
    assert 0 < (tmp_path / "partial" / "a.zip.part").stat().st_size < SIZE


@pytest.mark.parametrize("location, needle", [
    ("/loop.zip", r"redirect loop \(more than 10 redirects\); not retried"),
    ("file:///etc/passwd", r"redirected to an address that is not http\(s\)://"),
    ("ftp://127.0.0.1/a.zip", r"redirected to an address that is not http\(s\)://"),
])
def test_bad_redirects_are_one_clear_error(archive_server, tmp_path, payload, location, needle):
    url = archive_server.add("/loop.zip", payload, plan=[("redirect", location)] * 20)
    with pytest.raises(StageError, match=needle):
        fetch(tmp_path, archive(url, payload))
    assert os.listdir(tmp_path / "downloads") == [] and leftovers(tmp_path) == []


def test_file_url_and_local_path(tmp_path, payload, monkeypatch):
    mirror = tmp_path / "mirror dir"
    mirror.mkdir()
    (mirror / "a.zip").write_bytes(payload)
    (mirror / "b.tar").write_bytes(payload[::-1])
    monkeypatch.chdir(tmp_path)  # plain paths are relative to where the stage runs
    assert fetch(tmp_path, archive((mirror / "a.zip").as_uri(), payload)).read_bytes() == payload
    assert fetch(tmp_path, archive("mirror dir/b.tar", payload[::-1])).read_bytes() == \
        payload[::-1]
    with pytest.raises(StageError, match="cannot copy mirror dir/nope.tar: No such file"):
        fetch(tmp_path, archive("mirror dir/nope.tar", payload))


def test_local_source_must_be_a_regular_file_within_max_bytes(tmp_path, payload):
    """/dev/zero or a FIFO would never end (or block): only regular files are copied."""
    fifo = tmp_path / "a.zip"
    os.mkfifo(fifo)
    with pytest.raises(StageError, match="a.zip: not a regular file"):
        fetch(tmp_path, archive(str(fifo), payload))
    (tmp_path / "zero.zip").symlink_to("/dev/zero")
    with pytest.raises(StageError, match="zero.zip: not a regular file"):
        fetch(tmp_path, archive(str(tmp_path / "zero.zip"), payload))
    big = tmp_path / "big.zip"
    big.write_bytes(payload)
    limits = Limits(**{**LIMITS.__dict__, "max_bytes": 1000})
    with pytest.raises(StageError, match="has 300000 bytes, more than download.max_bytes"):
        fetch(tmp_path, archive(str(big), payload), limits)
    assert leftovers(tmp_path) == []


def test_proxy_from_environment_is_used(archive_server, tmp_path, payload, monkeypatch):
    """requests honours HTTP_PROXY: the loopback server acts as the proxy of a made-up host."""
    archive_server.add("/zips/a.zip", payload)
    monkeypatch.setenv("HTTP_PROXY", archive_server.base_url)
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")
    out = fetch(tmp_path, archive("http://mirror.invalid/zips/a.zip", payload))
    assert out.read_bytes() == payload
    assert [r.proxied for r in archive_server.requests] == [True]
