"""GluonCV's pretrained weight files, content-addressed: found by name in GluonCV's model store
registry (``gluoncv.model_zoo.model_store``: name -> sha1), fetched with GluonCV's own sha1-checked
download (``get_model_file``) or copied from a local file, and always checked against that sha1.

The registry is GluonCV's, not ours: the sha1 of ``vgg16_atrous`` (the ImageNet-pretrained base of
SSD300-VGG16) or ``ssd_300_vgg16_atrous_coco`` is whatever the pinned GluonCV release says, and a
file with any other content is refused. ``WeightFile`` says everything a user needs to provide a
file by hand (offline): its name, its sha1 and where GluonCV publishes it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from stages.common import StageError, file_digest
from stages.config import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightFile:
    """One entry of GluonCV's model store: ``name``, its ``sha1``, the file name GluonCV gives it
    (``<name>-<sha1[:8]>.params``) and the URL of the zip that holds it."""

    name: str
    sha1: str

    @property
    def file_name(self) -> str:
        return f"{self.name}-{self.sha1[:8]}.params"

    @property
    def url(self) -> str:
        from gluoncv.model_zoo import model_store

        repo = os.environ.get("MXNET_GLUON_REPO", model_store.apache_repo_url)
        repo = repo if repo.endswith("/") else repo + "/"
        # pylint: disable=protected-access
        return model_store._url_format.format(repo_url=repo, file_name=self.file_name[:-7])

    def how_to_provide(self, params_key: str) -> str:
        """What an offline user must do, in one sentence."""
        return (f"get {self.file_name} (sha1 {self.sha1}; GluonCV publishes it zipped at "
                f"{self.url}) and either put it in GluonCV's cache {cache_dir()}/ or set "
                f"params {params_key} to its path")


def registered(name: str) -> WeightFile:
    """The registry entry for ``name``; UsageError (exit 2) if GluonCV has none."""
    from gluoncv.model_zoo import model_store

    sha1 = model_store._model_sha1.get(name)  # pylint: disable=protected-access
    if sha1 is None:
        similar = sorted(n for n in model_store._model_sha1  # pylint: disable=protected-access
                         if name.split("_")[0] in n)[:8]
        raise UsageError(f"{name!r} is not in GluonCV's model store registry (gluoncv "
                         f"{_gluoncv_version()}); similar names: {', '.join(similar) or 'none'}")
    return WeightFile(name, sha1)


def _gluoncv_version() -> str:
    import gluoncv

    return gluoncv.__version__


def cache_dir() -> Path:
    """GluonCV's own cache of weight files (``$MXNET_HOME/models`` or ``~/.mxnet/models``)."""
    home = os.environ.get("MXNET_HOME")
    return Path(home, "models") if home else Path("~", ".mxnet", "models").expanduser()


def verify(path: Path, entry: WeightFile) -> None:
    """StageError unless ``path`` holds exactly the registered content."""
    actual = file_digest(path, "sha1")
    if actual != entry.sha1:
        raise StageError(f"{path}: sha1 {actual}, but GluonCV registers {entry.sha1} for "
                         f"{entry.name}: not the published weights")


def copy_local(source: Path, entry: WeightFile, dest: Path, params_key: str) -> None:
    """Copy a local file to ``dest`` after checking it is the registered one (UsageError, exit
    2, for a path that is not a regular file or holds other content: a bad input)."""
    if not source.is_file():
        raise UsageError(f"{params_key}: {str(source)!r} is not a file; to provide it, "
                         + entry.how_to_provide(params_key))
    try:
        verify(source, entry)
    except StageError as exc:
        raise UsageError(f"{params_key}: {exc}; " + entry.how_to_provide(params_key)) from None
    shutil.copyfile(source, dest)
    verify(dest, entry)  # what was written, not only what was read


def find_cached(entry: WeightFile) -> Path | None:
    """GluonCV's cached copy of the file when it has the registered content (read only)."""
    path = cache_dir() / entry.file_name
    if path.is_file() and file_digest(path, "sha1") == entry.sha1:
        return path
    return None


@contextlib.contextmanager
def _without_mxnet_home() -> Iterator[None]:
    """get_model_file prefers $MXNET_HOME over its ``root`` argument: hide it meanwhile."""
    saved = os.environ.pop("MXNET_HOME", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["MXNET_HOME"] = saved


def download(entry: WeightFile, workdir: Path, deadline_s: float, params_key: str) -> Path:
    """GluonCV's own download (zip, unpack, sha1 check) into ``workdir``; the file's path.

    GluonCV's downloader has no timeout of its own: it runs in a daemon thread given
    ``deadline_s`` seconds, after which the stage gives up (the thread dies with the process).
    """
    from gluoncv.model_zoo.model_store import get_model_file

    result: dict[str, object] = {}

    def fetch() -> None:
        try:
            with _without_mxnet_home():
                result["path"] = get_model_file(entry.name, root=str(workdir))
        except BaseException as exc:  # noqa: BLE001 - reported below, whatever it is
            result["error"] = exc

    log.info("downloading %s from %s (GluonCV's model store, sha1-checked)", entry.file_name,
             entry.url)
    thread = threading.Thread(target=fetch, name=f"download {entry.name}", daemon=True)
    thread.start()
    thread.join(deadline_s)
    if thread.is_alive():
        raise StageError(f"cannot download {entry.file_name} from {entry.url} within "
                         f"{deadline_s:g} s ({params_key.rsplit('.', 1)[0]}.deadline_s); "
                         "offline, " + entry.how_to_provide(params_key))
    if "error" in result:
        exc = result["error"]
        raise StageError(f"cannot download {entry.file_name} from {entry.url} "
                         f"({type(exc).__name__}: {exc}); offline, "
                         + entry.how_to_provide(params_key)) from None
    path = Path(str(result["path"]))
    verify(path, entry)  # GluonCV checked it too; this is the file we publish
    return path
