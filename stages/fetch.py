"""Fetch one archive into a partial file, keeping every byte received, then verify and publish.

HTTP(S): the body is read with ``read1`` (whatever has arrived, up to ``chunk_bytes``) and
written at once, so a dropped connection loses nothing: the next attempt resumes with a
``Range`` request at exactly the bytes on disk. An attempt that added bytes retries at once;
5xx answers, timeouts and drops without progress are retried with exponential backoff. An
overall deadline per archive and a size bound (``max_bytes``, and a Content-Length above it is
refused before any byte) stop an endless or trickling body. Redirect loops and redirects to
anything but http(s) fail with one clear error. ``file://`` URLs and plain local paths are
copied the same way (regular files only). The archive moves into the output directory only
when its md5 and sha1 both match.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import time
import urllib.parse
import urllib.request
from pathlib import Path

import requests
import urllib3
from tqdm import tqdm

from stages.common import StageError, atomic_path
from stages.data_params import Archive
from stages.partial import Digests, Limits, TooLarge, Transfer, too_large

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".part"
MAX_REDIRECTS = 10


class Retryable(Exception):
    """A failure worth another attempt: 5xx, timeout, refused or dropped connection."""


class Restart(Exception):
    """The partial file cannot be resumed (server changed range/size): start again from zero."""


def _content_range(header: str | None) -> tuple[int, int | None] | None:
    """(start, total) of ``Content-Range: bytes START-END/TOTAL`` (None if unparsable)."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (header or "").strip())
    if not match:
        return None
    return int(match.group(1)), None if match.group(2) == "*" else int(match.group(2))


def _unsatisfiable_total(header: str | None) -> int | None:
    """Total size of a 416 answer's ``Content-Range: bytes */TOTAL`` header (None if absent)."""
    match = re.fullmatch(r"bytes \*/(\d+)", (header or "").strip())
    return int(match.group(1)) if match else None


def _get(session: requests.Session, url: str, headers: dict, timeout: float):
    try:
        return session.get(url, headers=headers, stream=True, timeout=(timeout, timeout))
    except requests.TooManyRedirects:
        raise StageError(f"{url}: redirect loop (more than {session.max_redirects} redirects); "
                         "not retried") from None
    except (requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema,
            requests.exceptions.InvalidURL) as exc:
        raise StageError(f"{url}: redirected to an address that is not http(s):// ({exc}); "
                         "not retried") from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise Retryable(f"connection failed: {exc}") from exc


def http_attempt(session: requests.Session, url: str, transfer: Transfer) -> None:
    """One GET, appending to (206) or replacing (200) the partial file until the body ends.

    Raises Retryable for transient failures (the bytes that did arrive stay on disk and are
    resumed from), Restart when the partial file must be discarded, StageError otherwise.
    """
    offset = transfer.resume_offset()
    # identity: a transparently gzip-encoded body would make byte ranges refer to other bytes.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    timeout = max(min(transfer.limits.timeout_s, transfer.remaining_s()), 0.01)
    with _get(session, url, headers, timeout) as response:
        status = response.status_code
        if status == 416 and offset:
            total = _unsatisfiable_total(response.headers.get("Content-Range"))
            if total == offset:  # a previous run got every byte but stopped before verifying
                log.info("%s: partial file already complete (%d bytes)", transfer.name, offset)
                return
            raise Restart(f"server cannot serve bytes from {offset} (size {total})")
        if status >= 500:
            raise Retryable(f"HTTP {status} {response.reason}")
        if status not in (200, 206):
            raise StageError(f"{url}: HTTP {status} {response.reason} (not retried)")
        length = response.headers.get("Content-Length", "")
        total = offset + int(length) if length.isdigit() else None
        if status == 206:
            start, total_206 = _content_range(response.headers.get("Content-Range")) or (-1, None)
            if start != offset:
                raise Restart(f"server answered a different range "
                              f"({response.headers.get('Content-Range')!r}) than bytes={offset}-")
            total = total_206 if total_206 is not None else total
        if status == 200 and offset:
            log.warning("%s: server ignored the Range request (HTTP 200); restarting from zero",
                        transfer.name)
            transfer.truncate()
            offset = 0
            total = int(length) if length.isdigit() else None
        if total is not None and total > transfer.limits.max_bytes:
            raise too_large(transfer, f"the server announces {total} bytes,")
        _stream_body(response, transfer, offset, total)


def _stream_body(response: requests.Response, transfer: Transfer, offset: int,
                 total: int | None) -> None:
    """Append the body to the partial file as it arrives: every received byte is kept."""
    dropped = None
    try:
        with transfer.open(append=bool(offset)) as out, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=transfer.name, disable=None, leave=False) as bar:
            while True:
                transfer.check_deadline()
                try:  # raw bytes as stored on the server, whatever arrived (up to a chunk)
                    block = response.raw.read1(transfer.limits.chunk_bytes,
                                               decode_content=False)
                except (urllib3.exceptions.HTTPError, requests.RequestException,
                        OSError) as exc:
                    dropped = exc  # what arrived before is on disk: resume from there
                    break
                if not block:
                    break
                transfer.add(block, out, bar)
            out.flush()
            os.fsync(out.fileno())
    except TooLarge:
        raise too_large(transfer, "the body grew past") from None
    if dropped is not None:
        raise Retryable(f"connection dropped after {transfer.digests.size} bytes: {dropped}")
    if total is not None and transfer.digests.size < total:
        raise Retryable(f"body ended after {transfer.digests.size} of {total} bytes")


def download_http(session: requests.Session, url: str, transfer: Transfer) -> None:
    """Fetch ``url`` into the partial file, resuming and retrying within the limits.

    The retry budget counts failures in a row: an attempt that added bytes resets it and the
    next attempt starts at once, so a link that keeps dropping still completes the archive as
    long as it makes progress (and the deadline allows).
    """
    limits, failures = transfer.limits, 0
    while True:
        transfer.check_deadline()
        before = transfer.resume_offset()
        try:
            http_attempt(session, url, transfer)
            return
        except Restart as exc:
            transfer.truncate()
            failures += 1
            error = f"{exc}; restarting from zero"
        except Retryable as exc:
            if transfer.digests.size > before:
                log.info("%s: %s; resuming at byte %d", transfer.name, exc, transfer.digests.size)
                failures = 0
                continue
            failures += 1
            error = str(exc)
        if failures > limits.retries:
            raise StageError(f"{url}: giving up after {failures} failed attempt(s) in a row "
                             f"(download.retries = {limits.retries}); last error: {error}")
        wait = min(limits.backoff_s * 2 ** (failures - 1), limits.backoff_max_s,
                   max(transfer.remaining_s(), 0))
        log.warning("%s: %s; retry %d/%d in %.1f s", transfer.name, error, failures,
                    limits.retries, wait)
        time.sleep(wait)


def local_source(url: str) -> Path | None:
    """The file a ``file://`` URL or plain local path names; None for http(s) URLs."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        return Path(urllib.request.url2pathname(parts.path))
    return None if parts.scheme in ("http", "https") else Path(url)


def copy_local(src: Path, transfer: Transfer) -> None:
    """Copy a local archive (a regular file) into the partial file, hashing as it goes."""
    transfer.truncate()
    try:
        info = src.stat()
        if not stat.S_ISREG(info.st_mode):
            raise StageError(f"cannot copy {src}: not a regular file")
        if info.st_size > transfer.limits.max_bytes:
            raise too_large(transfer, f"{src} has {info.st_size} bytes,")
        with open(src, "rb") as fh, transfer.open(append=False) as out, \
                tqdm(total=info.st_size, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=transfer.name, disable=None, leave=False) as bar:
            for block in iter(lambda: fh.read(transfer.limits.chunk_bytes), b""):
                transfer.check_deadline()
                transfer.add(block, out, bar)
            out.flush()
            os.fsync(out.fileno())
    except TooLarge:
        raise too_large(transfer, f"{src} grew past") from None
    except OSError as exc:
        raise StageError(f"cannot copy {src}: {exc.strerror or exc}") from exc


def fetch_archive(archive: Archive, out_dir: Path, partial_dir: Path, limits: Limits,
                  session: requests.Session) -> Path:
    """Make ``out_dir/<name>`` a verified copy of ``archive``; returns its path.

    An existing file with the right checksums is kept; one with other checksums is removed
    first (so a failed re-fetch never leaves it there). The archive is fetched into
    ``partial_dir/<name>.part`` and moved into ``out_dir`` only after md5 and sha1 both match.
    """
    name = archive.name
    final = out_dir / name
    if os.path.lexists(final):
        if not Digests.of_file(final, limits.chunk_bytes).mismatches(archive):
            log.info("%s: already present with the published checksums", name)
            return final
        log.warning("%s: present but checksums differ; removing it and fetching it again", name)
        final.unlink()  # a link into DVC's cache is unlinked, never written through
    transfer = Transfer(partial_dir / (name + PARTIAL_SUFFIX), name, limits)
    src = local_source(archive.url)
    log.info("%s: fetching %s", name, archive.url)
    if src is not None:
        copy_local(src, transfer)
    else:
        download_http(session, archive.url, transfer)
    problems = transfer.digests.mismatches(archive)
    if problems:
        size = transfer.digests.size
        transfer.truncate()
        raise StageError(f"{name} from {archive.url}: checksum mismatch: {'; '.join(problems)} "
                         f"({size} bytes received; partial file removed)")
    with atomic_path(final, kind="file") as tmp:
        shutil.move(transfer.path, tmp)  # a rename when both dirs share a filesystem
    log.info("%s: verified (%d bytes, md5 %s)", name, transfer.digests.size, archive.md5)
    return final


def new_session() -> requests.Session:
    """A session that honours HTTP(S)_PROXY, NO_PROXY and .netrc, and follows at most
    MAX_REDIRECTS redirects."""
    session = requests.Session()  # trust_env=True: proxies from the environment are used
    session.max_redirects = MAX_REDIRECTS
    return session
