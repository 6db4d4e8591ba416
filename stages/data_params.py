"""The ``data`` params schema (``data.<dataset>``), read by the download and unpack stages.

    data:
      coco:
        archives:                                 # what to fetch, with published checksums
          val2017: {url: ..., md5: ..., sha1: ...}
          annotations: {url: ..., md5: ..., sha1: ...}
        expect: [val2017/*.jpg, ...]              # what unpacking must produce

Archives are keyed by a name (letters, digits, ``_``, ``-``): ``dvc params diff`` then says which
archive changed, and ``dvc exp run -S data.coco.archives.val2017.url=...`` points one at a
mirror. The file is stored under the last component of its URL.
"""
from __future__ import annotations

import re
import urllib.parse
from pathlib import PurePosixPath

from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from stages.config import Section, named_entries

URL_SCHEMES = ("http", "https", "file")
ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ARCHIVE_SUFFIXES = ZIP_SUFFIXES + TAR_SUFFIXES
# An archive's file name: no path separators, no leading dot (hidden and temp names are the
# stages' own), no '.'/'..', nothing a shell or filesystem treats specially.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]*")
# An archive's key in params: one params key, so no dots (`-S data.coco.archives.<key>.url=`).
ArchiveKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]


def archive_name(url: str) -> str:
    """The file name of an archive URL or local path (``.../val2017.zip`` -> ``val2017.zip``).

    The last component of the URL's (percent-decoded) path, or '' when the path ends in '/'.
    """
    path = urllib.parse.urlsplit(url).path if "://" in url else url
    path = urllib.parse.unquote(path)
    return "" if path.endswith("/") else path.rsplit("/", 1)[-1]


def is_archive_name(name: str) -> bool:
    """True for a file name the download stage may store an archive under."""
    return bool(NAME_PATTERN.fullmatch(name)) and name.lower().endswith(ARCHIVE_SUFFIXES)


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
        name = archive_name(url)
        if not is_archive_name(name):
            raise ValueError(f"URL must end with the archive's file name (got {name!r}): "
                             f"letters, digits and ._+~- not starting with a dot, ending in "
                             f"{', '.join(ARCHIVE_SUFFIXES)}")
        return url

    @property
    def name(self) -> str:
        """File name the archive is stored under (last component of the URL path)."""
        return archive_name(self.url)


class Dataset(Section):
    """``data.<dataset>``: the archives to fetch and the paths unpacking must produce."""

    archives: dict[ArchiveKey, Archive] = Field(min_length=1)
    # Relative paths (glob patterns allowed) each of which must match something after unpacking.
    expect: list[str] = Field(min_length=1)

    @field_validator("archives", mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        return named_entries(value, "val2017: {url: ..., md5: ..., sha1: ...}")

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
        names = [a.name for a in self.archives.values()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"archives must have distinct file names (repeated: {dupes})")
        return self
