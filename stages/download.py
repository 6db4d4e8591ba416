"""Download one dataset's archives, checksum-verified, resumable: ``data.<dataset>.archives``.

    python -m stages.download coco --out data/downloads/coco --partial-dir data/.partial/coco

Each archive streams into ``<partial-dir>/<name>`` (outside the DVC output, so DVC never
deletes or caches half a download), hashing md5 and sha1 as the bytes arrive. A rerun or a
dropped connection resumes with an HTTP ``Range`` request; 5xx answers, timeouts and dropped
connections are retried with exponential backoff. Only when both checksums match does the file
move into the output directory (one rename), so the output never holds an unverified archive.
``file://`` URLs and plain local paths (mirrors, offline copies) are copied the same way.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable

import requests
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from stages.common import StageError, atomic_path, main_guard
from stages.config import Section, load_branch, load_section

log = logging.getLogger(__name__)

URL_SCHEMES = ("http", "https", "file")


# ---------------------------------------------------------------------------------------------
# Params

class Archive(Section):
    """One entry of ``data.<dataset>.archives``: where to get it and its published checksums."""

    url: str = Field(min_length=1)
    md5: str = Field(pattern=r"^[0-9a-f]{32}$")
    sha1: str = Field(pattern=r"^[0-9a-f]{40}$")

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme and parts.scheme not in URL_SCHEMES:
            raise ValueError(f"URL scheme '{parts.scheme}' is not supported; allowed: "
                             "http://, https://, file:// or a local path")
        if parts.scheme in ("http", "https") and not parts.netloc:
            raise ValueError("http(s) URL has no host")
        if not archive_name(url):
            raise ValueError("URL must end with the archive's file name")
        return url

    @property
    def name(self) -> str:
        """File name the archive is stored under (last component of the URL path)."""
        return archive_name(self.url)


class Dataset(Section):
    """``data.<dataset>``: the archives to fetch and the paths unpacking must produce."""

    archives: list[Archive] = Field(min_length=1)
    # Relative paths (glob patterns allowed) each of which must match something after unpacking.
    expect: list[str] = Field(min_length=1)

    @field_validator("expect")
    @classmethod
    def _check_expect(cls, paths: list[str]) -> list[str]:
        for p in paths:
            pure = PurePosixPath(p)
            if not p or pure.is_absolute() or ".." in pure.parts:
                raise ValueError(f"expected path {p!r} must be relative, without '..'")
        return paths

    @model_validator(mode="after")
    def _unique_names(self) -> "Dataset":
        names = [a.name for a in self.archives]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"archives must have distinct file names (repeated: {dupes})")
        return self


class DownloadParams(Section):
    """params.yaml ``download``: how patient the downloader is."""

    timeout_s: float = Field(gt=0)        # connect timeout, and longest wait for the next bytes
    retries: int = Field(ge=0)            # failed attempts tolerated in a row (without progress)
    backoff_s: float = Field(ge=0)        # wait before the first retry; doubles each retry
    backoff_max_s: float = Field(ge=0)    # cap on one wait
    chunk_bytes: int = Field(ge=1024, le=64 << 20)


def archive_name(url: str) -> str:
    """The file name of an archive URL or local path (``.../val2017.zip`` -> ``val2017.zip``)."""
    path = urllib.parse.urlsplit(url).path if "://" in url else url
    return PurePosixPath(urllib.parse.unquote(path)).name if not path.endswith("/") else ""


# ---------------------------------------------------------------------------------------------
# Checksums

@dataclass
class Digests:
    """md5 and sha1 of the bytes fed so far (both published checksums are checked)."""

    # Integrity checks, not security: allowed on FIPS-restricted Pythons too.
    md5: "hashlib._Hash" = field(default_factory=lambda: hashlib.md5(usedforsecurity=False))
    sha1: "hashlib._Hash" = field(default_factory=lambda: hashlib.sha1(usedforsecurity=False))
    size: int = 0

    def update(self, data: bytes) -> None:
        self.md5.update(data)
        self.sha1.update(data)
        self.size += len(data)

    @classmethod
    def of_file(cls, path: Path, chunk: int) -> "Digests":
        """Digests of a whole file (an existing archive, or the part of a partial file we keep)."""
        digests = cls()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(chunk), b""):
                digests.update(block)
        return digests

    def mismatches(self, archive: Archive) -> list[str]:
        """``'md5 expected X, got Y'`` for each checksum that differs from the published one."""
        got = {"md5": self.md5.hexdigest(), "sha1": self.sha1.hexdigest()}
        return [f"{algo} expected {getattr(archive, algo)}, got {got[algo]}"
                for algo in ("md5", "sha1") if got[algo] != getattr(archive, algo)]


# ---------------------------------------------------------------------------------------------
# HTTP with resume

class Retryable(Exception):
    """A failure worth another attempt: 5xx, timeout, refused or dropped connection."""


class Restart(Exception):
    """The partial file cannot be resumed (server changed range/size): start again from zero."""


@dataclass
class Transfer:
    """The state of one archive's partial file: its path and the digests of its bytes."""

    path: Path
    chunk: int
    digests: Digests = field(default_factory=Digests)

    def resume_offset(self) -> int:
        """Bytes already on disk; makes sure the digests cover exactly those bytes."""
        size = self.path.stat().st_size if self.path.exists() else 0
        if self.digests.size != size:  # a rerun found a partial file: hash what it holds first
            self.digests = Digests.of_file(self.path, self.chunk) if size else Digests()
        return size

    def truncate(self) -> None:
        self.path.unlink(missing_ok=True)
        self.digests = Digests()


def _content_range_start(header: str | None) -> int | None:
    """Start offset of a ``Content-Range: bytes START-END/TOTAL`` header (None if unparsable)."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (header or "").strip())
    return int(match.group(1)) if match else None


def _unsatisfiable_total(header: str | None) -> int | None:
    """Total size of a 416 answer's ``Content-Range: bytes */TOTAL`` header (None if absent)."""
    match = re.fullmatch(r"bytes \*/(\d+)", (header or "").strip())
    return int(match.group(1)) if match else None


def http_attempt(session: requests.Session, url: str, transfer: Transfer,
                 timeout_s: float, name: str) -> None:
    """One GET, appending to (206) or replacing (200) the partial file until the body ends.

    Raises Retryable for transient failures (the bytes that did arrive stay on disk and are
    resumed from), Restart when the partial file must be discarded, StageError for a 4xx.
    """
    offset = transfer.resume_offset()
    # identity: a transparently gzip-encoded body would make byte ranges refer to other bytes.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = session.get(url, headers=headers, stream=True, timeout=(timeout_s, timeout_s))
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise Retryable(f"connection failed: {exc}") from exc
    with response:
        status = response.status_code
        if status == 416 and offset:
            total = _unsatisfiable_total(response.headers.get("Content-Range"))
            if total == offset:  # a previous run got every byte but stopped before verifying
                log.info("%s: partial file already complete (%d bytes)", name, offset)
                return
            raise Restart(f"server cannot serve bytes from {offset} (size {total})")
        if status >= 500:
            raise Retryable(f"HTTP {status} {response.reason}")
        if status not in (200, 206):
            raise StageError(f"{url}: HTTP {status} {response.reason} (not retried)")
        if status == 206 and _content_range_start(response.headers.get("Content-Range")) != offset:
            raise Restart(f"server answered a different range "
                          f"({response.headers.get('Content-Range')!r}) than bytes={offset}-")
        if status == 200 and offset:
            log.warning("%s: server ignored the Range request (HTTP 200); restarting from zero",
                        name)
            transfer.truncate()
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        _stream_body(response, transfer, offset, total, name)


def _stream_body(response: requests.Response, transfer: Transfer, offset: int,
                 total: int | None, name: str) -> None:
    """Append the body to the partial file, hashing and showing progress as bytes arrive."""
    mode = "ab" if offset else "wb"
    try:
        with open(transfer.path, mode) as out, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=name, disable=None, leave=False) as bar:
            for chunk in response.iter_content(chunk_size=transfer.chunk):
                out.write(chunk)
                transfer.digests.update(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    except (requests.ConnectionError, requests.Timeout,
            requests.exceptions.ChunkedEncodingError) as exc:
        raise Retryable(f"connection dropped after {transfer.digests.size} bytes: {exc}") from exc
    if total is not None and transfer.digests.size < total:
        raise Retryable(f"body ended after {transfer.digests.size} of {total} bytes")


def download_http(session: requests.Session, url: str, transfer: Transfer,
                  params: DownloadParams, name: str) -> None:
    """Fetch ``url`` into the partial file, resuming and retrying with exponential backoff.

    The retry budget counts failures in a row: an attempt that added bytes resets it, so a long
    download over a flaky link keeps going as long as it makes progress.
    """
    failures = 0
    while True:
        before = transfer.resume_offset()
        try:
            http_attempt(session, url, transfer, params.timeout_s, name)
            return
        except Restart as exc:
            transfer.truncate()
            failures += 1
            error = f"{exc}; restarting from zero"
        except Retryable as exc:
            if transfer.digests.size > before:
                failures = 0
            failures += 1
            error = str(exc)
        if failures > params.retries:
            raise StageError(f"{url}: giving up after {failures} failed attempt(s) in a row "
                             f"(download.retries = {params.retries}); last error: {error}")
        wait = min(params.backoff_s * 2 ** (failures - 1), params.backoff_max_s)
        log.warning("%s: %s; retry %d/%d in %.1f s", name, error, failures, params.retries, wait)
        time.sleep(wait)


# ---------------------------------------------------------------------------------------------
# Local copies and the whole archive

def local_source(url: str) -> Path | None:
    """The file a ``file://`` URL or plain path names; None for http(s) URLs."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        return Path(urllib.request.url2pathname(parts.path))
    return None if parts.scheme in ("http", "https") else Path(url)


def copy_local(src: Path, transfer: Transfer, name: str) -> None:
    """Copy a local archive into the partial file, hashing as it goes (no resume needed)."""
    transfer.truncate()
    try:
        size = src.stat().st_size
        with open(src, "rb") as fh, open(transfer.path, "wb") as out, \
                tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                     disable=None, leave=False) as bar:
            for block in iter(lambda: fh.read(transfer.chunk), b""):
                out.write(block)
                transfer.digests.update(block)
                bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise StageError(f"cannot copy {src}: {exc.strerror or exc}") from exc


def fetch_archive(archive: Archive, out_dir: Path, partial_dir: Path, params: DownloadParams,
                  session: requests.Session) -> Path:
    """Make ``out_dir/<name>`` a verified copy of ``archive``; returns its path.

    An existing file with the right checksums is kept. Otherwise the archive is fetched into
    ``partial_dir`` and moved into ``out_dir`` only after md5 and sha1 both match.
    """
    name = archive.name
    final = out_dir / name
    if final.is_file():
        if not Digests.of_file(final, params.chunk_bytes).mismatches(archive):
            log.info("%s: already present with the published checksums", name)
            return final
        log.warning("%s: present but checksums differ; fetching it again", name)
    transfer = Transfer(partial_dir / name, params.chunk_bytes)
    src = local_source(archive.url)
    log.info("%s: fetching %s", name, archive.url)
    if src is not None:
        copy_local(src, transfer, name)
    else:
        download_http(session, archive.url, transfer, params, name)
    problems = transfer.digests.mismatches(archive)
    if problems:
        transfer.truncate()
        raise StageError(f"{name} from {archive.url}: checksum mismatch: {'; '.join(problems)} "
                         f"({transfer.digests.size} bytes; partial file removed)")
    with atomic_path(final) as tmp:
        shutil.move(transfer.path, tmp)  # a rename when both dirs share a filesystem
    log.info("%s: verified (%d bytes, md5 %s)", name, transfer.digests.size, archive.md5)
    return final


def remove_stale(directory: Path, keep: Iterable[str]) -> list[str]:
    """Delete entries of ``directory`` not named in ``keep``; returns the removed names."""
    keep = set(keep)
    removed = []
    for entry in sorted(directory.iterdir()) if directory.is_dir() else []:
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed


def download_dataset(dataset: Dataset, out_dir: Path, partial_dir: Path,
                     params: DownloadParams) -> list[Path]:
    """Fetch every archive of ``dataset`` into ``out_dir``; remove what the list no longer has."""
    names = [a.name for a in dataset.archives]
    out_dir.mkdir(parents=True, exist_ok=True)
    partial_dir.mkdir(parents=True, exist_ok=True)
    for directory in (out_dir, partial_dir):
        for stale in remove_stale(directory, names):
            log.info("removed stale %s", directory / stale)
    # requests.Session has trust_env=True: HTTP(S)_PROXY, NO_PROXY and .netrc from the
    # environment are honoured, as users behind a proxy expect.
    with requests.Session() as session:
        return [fetch_archive(a, out_dir, partial_dir, params, session) for a in dataset.archives]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="key under params `data` (e.g. coco, voc)")
    parser.add_argument("--out", required=True, type=Path, help="directory of verified archives")
    parser.add_argument("--partial-dir", required=True, type=Path,
                        help="where unverified partial downloads live (not a DVC output)")
    args = parser.parse_args(argv)
    dataset = load_branch("data", args.dataset, Dataset)
    params = load_section("download", DownloadParams)
    paths = download_dataset(dataset, args.out, args.partial_dir, params)
    log.info("%s: %d archive(s) verified in %s", args.dataset, len(paths), args.out)
    return 0


if __name__ == "__main__":
    main_guard(main)
