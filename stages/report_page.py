"""Build the report page, DVC's HTML template for ``dvc plots show`` / ``dvc plots diff``.

    python -m stages.report_page --lock report/vendor.json --page report/page.html \\
        --out report/plots.html [--tarballs DIR]
    python -m stages.report_page --lock report/vendor.json --verify report/plots.html

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so offline no chart renders.
This inlines them instead, from the npm packages pinned in the lock file (name, version and the
registry's sha512 ``integrity`` of the tarball): each tarball is fetched with ``npm pack`` (or
taken from ``--tarballs``, e.g. on a machine without npm), its sha512 checked against the lock,
and the lock's file read from it without unpacking anything to disk. Each library goes into its
own ``<script>`` tagged with the package, version, integrity and the sha256 of the inlined text,
so ``--verify`` (and the test suite) can check the committed page against the lock offline.

Exit codes: 0 built (or verified); 2 a bad lock file, page source or arguments, refused before
any work; 1 the build failed (npm failing, a checksum mismatch, a library that cannot be inlined)
and nothing was written.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import logging
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.common import StageError, main_guard, write_text_atomic

log = logging.getLogger(__name__)

MARKER = "<!-- VENDOR -->"
# DVC's placeholders (dvc_render.html.HTML): the page must hold plot_divs once and may hold
# refresh_tag once; scripts would pull DVC's CDN <script> tags back in, so it must be absent.
# Inlined code must hold none of them, since DVC substitutes them anywhere in the page.
PLACEHOLDERS = {"{plot_divs}": (1, 1), "{refresh_tag}": (0, 1), "{scripts}": (0, 0)}
SCRIPT_RE = re.compile(
    r'<script data-package="([^"]*)" data-version="([^"]*)" data-integrity="([^"]*)" '
    r'data-sha256="([0-9a-f]{64})">\n(.*?)\n</script>', re.S)


class LockError(ValueError):
    """The lock file or the page source is unusable (exit 2)."""


class Package(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str = Field(pattern=r"^\d+\.\d+\.\d+$")  # exact: a range is not a pin
    integrity: str = Field(pattern=r"^sha512-[A-Za-z0-9+/]{86}==$")  # npm's dist.integrity
    file: str = Field(pattern=r"^[A-Za-z0-9._/-]+\.js$")  # inside the tarball's package/
    license: str


class Lock(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    comment: str = ""
    packages: list[Package] = Field(min_length=1)


def read_lock(path: str | Path) -> Lock:
    """The lock file, validated; LockError names the file and what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise LockError(f"{path}: cannot read the lock file ({exc.strerror})") from exc
    except ValueError as exc:
        raise LockError(f"{path}: not valid JSON ({exc})") from exc
    try:
        return Lock.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                             for e in exc.errors())
        raise LockError(f"{path}: {problems}") from exc


def sri_sha512(data: bytes) -> str:
    """npm's ``integrity`` string of ``data`` (Subresource Integrity, sha512)."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def check_page_source(page: str, source: str) -> None:
    """The page holds the vendor marker once and DVC's placeholders as DVC needs them."""
    if page.count(MARKER) != 1:
        raise LockError(f"{source}: needs the line {MARKER} exactly once "
                        f"(found {page.count(MARKER)})")
    for placeholder, (low, high) in PLACEHOLDERS.items():
        n = page.count(placeholder)
        if not low <= n <= high:
            raise LockError(f"{source}: {placeholder} appears {n} time(s); allowed "
                            f"{low}..{high} (DVC replaces it everywhere in the page)")


def fetch_tarballs(packages: Sequence[Package], dest: Path) -> dict[str, Path]:
    """``npm pack name@version`` of every package into ``dest`` (npm's own registry client)."""
    npm = shutil.which("npm")
    if npm is None:
        raise StageError("npm not found: install it, or download the tarballs listed in the lock "
                         "file and pass their directory with --tarballs")
    specs = [f"{p.name}@{p.version}" for p in packages]
    log.info("npm pack %s", " ".join(specs))
    proc = subprocess.run([npm, "pack", *specs, "--pack-destination", str(dest), "--json"],
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise StageError(f"npm pack failed (exit {proc.returncode}): "
                         f"{proc.stderr.strip()[-500:]}")
    return {p.name: dest / f"{p.name}-{p.version}.tgz" for p in packages}


def read_library(package: Package, tarball: Path) -> str:
    """The package's ``file`` from its tarball, after checking the tarball's sha512."""
    try:
        data = tarball.read_bytes()
    except OSError as exc:
        raise StageError(f"{package.name}: cannot read {tarball} ({exc.strerror})") from exc
    actual = sri_sha512(data)
    if actual != package.integrity:
        raise StageError(f"{package.name} {package.version}: checksum mismatch for {tarball}: "
                         f"expected {package.integrity}, got {actual}")
    member = f"package/{package.file}"
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            info = tar.getmember(member)
            handle = tar.extractfile(info) if info.isfile() else None
            if handle is None:
                raise StageError(f"{package.name}: {member} in {tarball} is not a file")
            text = handle.read().decode("utf-8")
    except KeyError as exc:
        raise StageError(f"{package.name}: {tarball} has no {member}") from exc
    except (tarfile.TarError, OSError, UnicodeDecodeError) as exc:
        raise StageError(f"{package.name}: cannot read {member} from {tarball}: {exc}") from exc
    check_inlinable(package.name, text)
    return text


def check_inlinable(name: str, text: str) -> None:
    """Code that would end the inline <script> early or that DVC would substitute into."""
    lowered = text.lower()
    for bad in ("</script", "<!--", *PLACEHOLDERS):
        if bad in lowered:
            raise StageError(f"{name}: the library contains {bad!r} and cannot be inlined")


def script_block(package: Package, text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return (f"<!-- {package.name} {package.version} ({package.license}), "
            f"https://www.npmjs.com/package/{package.name}, package/{package.file} -->\n"
            f'<script data-package="{html.escape(package.name)}" '
            f'data-version="{package.version}" data-integrity="{package.integrity}" '
            f'data-sha256="{digest}">\n{text}\n</script>')


def build_page(page: str, libraries: Sequence[tuple[Package, str]]) -> str:
    """``page`` with the libraries inlined, in lock order, at the vendor marker."""
    blocks = "\n".join(script_block(p, text) for p, text in libraries)
    header = ("<!-- Built by `python -m stages.report_page` from report/page.html and "
              "report/vendor.json: edit those, not this file. -->")
    return page.replace(MARKER, header + "\n" + blocks, 1)


def verify_page(page: str, lock: Lock) -> list[str]:
    """Problems of a built page against the lock (empty when it is what the lock pins)."""
    problems = []
    found = SCRIPT_RE.findall(page)
    expected = [(p.name, p.version, p.integrity) for p in lock.packages]
    if [f[:3] for f in found] != expected:
        problems.append(f"inlined libraries {[f[:3] for f in found]} are not the lock's "
                        f"{expected} (in order)")
    for name, _version, _integrity, digest, text in found:
        actual = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if actual != digest:
            problems.append(f"{name}: inlined text has sha256 {actual}, the page says {digest}")
    if re.search(r"<script[^>]*\bsrc=", page, re.I):
        problems.append("the page loads a script from elsewhere (<script src=...>)")
    for placeholder, (low, high) in PLACEHOLDERS.items():
        if not low <= page.count(placeholder) <= high:
            problems.append(f"{placeholder} appears {page.count(placeholder)} time(s)")
    return problems


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.report_page", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lock", required=True, help="pinned packages (report/vendor.json)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--verify", metavar="PAGE", help="check a built page against the lock")
    what.add_argument("--page", help="page source with the vendor marker (report/page.html)")
    parser.add_argument("--out", help="the built page (report/plots.html); with --page")
    parser.add_argument("--tarballs", type=Path,
                        help="directory holding <name>-<version>.tgz (default: npm pack)")
    args = parser.parse_args(argv)
    if args.page and not args.out:
        parser.error("--page needs --out")
    return args


def run(args: argparse.Namespace) -> int:
    lock = read_lock(args.lock)
    if args.verify:
        problems = verify_page(Path(args.verify).read_text(encoding="utf-8"), lock)
        for problem in problems:
            log.error("%s: %s", args.verify, problem)
        if not problems:
            log.info("%s inlines exactly the libraries %s pins", args.verify, args.lock)
        return 1 if problems else 0
    try:
        page = Path(args.page).read_text(encoding="utf-8")
    except OSError as exc:
        raise LockError(f"{args.page}: cannot read the page source ({exc.strerror})") from exc
    check_page_source(page, args.page)
    with tempfile.TemporaryDirectory(prefix="report-page-") as tmp:
        if args.tarballs:
            tarballs = {p.name: args.tarballs / f"{p.name}-{p.version}.tgz" for p in lock.packages}
        else:
            tarballs = fetch_tarballs(lock.packages, Path(tmp))
        libraries = [(p, read_library(p, tarballs[p.name])) for p in lock.packages]
    built = build_page(page, libraries)
    write_text_atomic(args.out, built)
    log.info("wrote %s (%d kB): %s", args.out, len(built.encode()) // 1024,
             ", ".join(f"{p.name} {p.version}" for p in lock.packages))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except LockError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    main_guard(main)
