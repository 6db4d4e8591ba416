"""Build zip and tar archives with any member type, for the extraction tests."""
from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path


def make_zip(path: Path, entries: dict[str, bytes], symlinks: dict[str, str] | None = None,
             compression: int = zipfile.ZIP_STORED, modes: dict[str, int] | None = None) -> Path:
    """``symlinks``: name -> target (a unix symlink entry); ``modes``: name -> st_mode."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, target)
        for name, mode in (modes or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = mode << 16
            zf.writestr(info, b"")
    return path


def make_tar(path: Path, entries: dict[str, bytes], links: dict[str, tuple[bytes, str]] = (),
             mode: str = "w") -> Path:
    """``links``: name -> (tarfile.SYMTYPE, LNKTYPE, CHRTYPE, FIFOTYPE..., link target)."""
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in dict(links).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    return path


def add_tar_members(path: Path, members: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]],
                    mode: str = "w") -> Path:
    """A tar of exactly these members, in order (regular ones given with their data)."""
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tf:
        for member in members:
            info, data = member if isinstance(member, tuple) else (member, None)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path
