"""The real `dvc repro` of the download and unpack stages in a temporary git+DVC repo.

The project's dvc.yaml, params.yaml (data section pointed at a loopback server and a file://
URL), .dvc/config and stages/ are copied into a fresh repo; tiny COCO- and VOC-like archives with
the real archive layouts are generated in a temp dir (never in the repo).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import yaml

from stages.dataset_files import write_coco, write_voc
from stages.synthetic import make_samples
from stages.outputs import MARKER

DVC = Path(sys.executable).with_name("dvc")
CLASSES = ["rectangle", "ellipse"]


def zip_tree(root: Path, top: str, dest: Path) -> None:
    with zipfile.ZipFile(dest, "w") as zf:
        for path in sorted((root / top).rglob("*")):
            zf.write(path, path.relative_to(root).as_posix())


def tar_tree(root: Path, top: str, dest: Path) -> None:
    with tarfile.open(dest, "w") as tf:
        tf.add(root / top, arcname=top)


def make_archives(tmp: Path) -> dict[str, Path]:
    """The five real archive names, with the real top-level layouts, holding a few images."""
    samples = make_samples(4, CLASSES, image_size=32, max_objects=1, seed=0)
    src, out = tmp / "src", tmp / "archives"
    out.mkdir()
    write_coco(src / "coco", "val2017", samples[:2], CLASSES)
    write_voc(src / "voc07" / "VOCdevkit", 2007, {"trainval": samples[:2]}, CLASSES)
    write_voc(src / "voc07test" / "VOCdevkit", 2007, {"test": samples[2:]}, CLASSES)
    write_voc(src / "voc12" / "VOCdevkit", 2012, {"trainval": samples[2:]}, CLASSES)
    zip_tree(src / "coco", "val2017", out / "val2017.zip")
    zip_tree(src / "coco", "annotations", out / "annotations_trainval2017.zip")
    tar_tree(src / "voc07", "VOCdevkit", out / "VOCtrainval_06-Nov-2007.tar")
    tar_tree(src / "voc07test", "VOCdevkit", out / "VOCtest_06-Nov-2007.tar")
    tar_tree(src / "voc12", "VOCdevkit", out / "VOCtrainval_11-May-2012.tar")
    return {p.name: p for p in out.iterdir()}


def entry(url: str, path: Path) -> dict:
    data = path.read_bytes()
    return {"url": url, "md5": hashlib.md5(data).hexdigest(),
            "sha1": hashlib.sha1(data).hexdigest()}


def make_repo(repo_root: Path, repo: Path, archives: dict[str, Path], server) -> None:
    """git init + dvc init, then the project's pipeline files with params aimed at loopback."""
    repo.mkdir()
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(repo_root / name, repo / name)
    shutil.copytree(repo_root / "stages", repo / "stages",
                    ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    served = {name: server.add(f"/{name}", path.read_bytes(),
                               plan=[("cut", 2000)] if name == "val2017.zip" else [])
              for name, path in archives.items() if name != "VOCtest_06-Nov-2007.tar"}
    coco, voc = params["data"]["coco"]["archives"], params["data"]["voc"]["archives"]
    assert list(coco) == ["val2017", "annotations"]  # the project's names, kept
    assert list(voc) == ["trainval_2007", "test_2007", "trainval_2012"]
    coco["val2017"] = entry(served["val2017.zip"], archives["val2017.zip"])
    coco["annotations"] = entry(served["annotations_trainval2017.zip"],
                                archives["annotations_trainval2017.zip"])
    voc["trainval_2007"] = entry(served["VOCtrainval_06-Nov-2007.tar"],
                                 archives["VOCtrainval_06-Nov-2007.tar"])
    voc["test_2007"] = entry(archives["VOCtest_06-Nov-2007.tar"].as_uri(),
                             archives["VOCtest_06-Nov-2007.tar"])
    voc["trainval_2012"] = entry(served["VOCtrainval_11-May-2012.tar"],
                                 archives["VOCtrainval_11-May-2012.tar"])
    params["download"].update(timeout_s=10.0, retries=2, backoff_s=0.01, backoff_max_s=0.05,
                              chunk_bytes=1024)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run([str(DVC), "init", "-q"], repo)
    shutil.copy(repo_root / ".dvc" / "config", repo / ".dvc" / "config")  # the cache link type


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output}"
    return output


def linked_to_cache(repo: Path, path: Path) -> bool:
    """Is ``path`` the cache object itself (hardlink/symlink), as .dvc/config asks?"""
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    obj = repo / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]
    assert obj.is_file(), obj
    assert oct(obj.stat().st_mode & 0o777) == "0o444"  # DVC keeps the cache read-only
    return path.is_symlink() or os.path.samefile(path, obj)


def test_dvc_repro_download_and_unpack(repo_root, tmp_path, archive_server):
    archives = make_archives(tmp_path)
    repo = tmp_path / "repo"
    make_repo(repo_root, repo, archives, archive_server)

    run([str(DVC), "repro", "download", "unpack"], repo)
    coco, voc = repo / "data" / "coco", repo / "data" / "voc" / "VOCdevkit"
    assert len(list((coco / "val2017").glob("*.jpg"))) == 2
    assert (coco / "annotations" / "instances_val2017.json").is_file()
    for split in ("VOC2007/ImageSets/Main/trainval.txt", "VOC2007/ImageSets/Main/test.txt",
                  "VOC2012/ImageSets/Main/trainval.txt"):
        assert (voc / split).is_file(), split
    assert len(list((voc / "VOC2007" / "JPEGImages").glob("*.jpg"))) == 4  # trainval + test
    assert sorted(os.listdir(repo / "data" / "downloads" / "coco")) == [
        MARKER, "annotations_trainval2017.zip", "val2017.zip"]
    assert list((repo / "data" / ".partial").rglob("*.part")) == []
    # The cut connection was resumed with a Range request inside the real run.
    assert [r.range is not None for r in archive_server.requests_for("/val2017.zip")] == [
        False, True]
    # Outputs are links into the cache (hardlinks on ext4, as ordered in .dvc/config).
    assert linked_to_cache(repo, repo / "data" / "downloads" / "coco" / "val2017.zip")
    assert linked_to_cache(repo, coco / "annotations" / "instances_val2017.json")
    served = len(archive_server.requests)

    second = run([str(DVC), "repro", "download", "unpack"], repo)
    for stage in ("download@coco", "download@voc", "unpack@coco", "unpack@voc"):
        assert f"Stage '{stage}' didn't change, skipping" in second
    assert len(archive_server.requests) == served

    # A download knob changes: the download stages run again, but the persisted, verified
    # archives are kept (no request), so the unpack stages' inputs are unchanged.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["download"]["retries"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run([str(DVC), "repro", "download", "unpack"], repo)
    assert "Running stage 'download@coco'" in third and "Running stage 'download@voc'" in third
    assert "Stage 'unpack@coco' didn't change, skipping" in third
    assert "Stage 'unpack@voc' didn't change, skipping" in third
    assert len(archive_server.requests) == served
    assert linked_to_cache(repo, repo / "data" / "downloads" / "coco" / "val2017.zip")

    dag = run([str(DVC), "dag"], repo)
    for stage in ("download@coco", "download@voc", "unpack@coco", "unpack@voc"):
        assert stage in dag
