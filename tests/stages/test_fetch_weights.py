"""The fetch_weights stage: GluonCV's pretrained files as sha1-checked DVC outputs.

No internet here: a real GluonCV-format .params file is made by the test (a small SSD's saved
weights) and its sha1 registered in GluonCV's own model store registry, the same mechanism that
holds the sha1 of vgg16_atrous and ssd_300_vgg16_atrous_coco. The zoo path runs GluonCV's own
download (``get_model_file``) against a real HTTP server on 127.0.0.1 (MXNET_GLUON_REPO)."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from stages import fetch_weights
from tests.stages.coco_helpers import run_in
from tests.stages.train_helpers import CLASSES

NAME = "test_tiny_ssd"


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A real GluonCV-format .params file: the demo SSD's weights, saved by Gluon."""
    import mxnet as mx

    from stages.models import build_detector

    net = build_detector("demo_ssd", CLASSES, None, seed=3)
    net(mx.nd.zeros((1, 3, 128, 128)))
    path = tmp_path_factory.mktemp("weights") / "tiny.params"
    net.save_parameters(str(path))
    return path


@pytest.fixture
def registered(weights_file, monkeypatch, tmp_path):
    """Register the file's sha1 under NAME; GluonCV's cache is an empty dir of the test's own."""
    from gluoncv.model_zoo import model_store

    sha1 = hashlib.sha1(weights_file.read_bytes()).hexdigest()
    monkeypatch.setitem(model_store._model_sha1, NAME, sha1)
    monkeypatch.setenv("MXNET_HOME", str(tmp_path / "mxnet_home"))
    return sha1


def zipped(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(name, data)
    return buf.getvalue()


def write_params(folder: Path, source: str, deadline_s: float = 30.0) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(
        {"weights": {NAME: {"source": source, "deadline_s": deadline_s}}}))


def run(folder: Path, out: Path) -> int:
    return run_in(folder, fetch_weights.main, [NAME, "--out", out])


def test_a_local_copy_with_the_registered_sha1_becomes_the_output(tmp_path, weights_file,
                                                                  registered):
    import mxnet as mx

    write_params(tmp_path, str(weights_file))
    out = tmp_path / "model" / "pretrained" / f"{NAME}.params"
    assert run(tmp_path, out) == 0
    assert out.read_bytes() == weights_file.read_bytes() and not out.is_symlink()
    assert set(mx.nd.load(str(out))) == set(mx.nd.load(str(weights_file)))
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp files


def test_zoo_runs_gluoncvs_download_and_leaves_its_cache_alone(tmp_path, weights_file,
                                                               registered, archive_server,
                                                               monkeypatch):
    file_name = f"{NAME}-{registered[:8]}"
    archive_server.add(f"/gluon/models/{file_name}.zip",
                       zipped(f"{file_name}.params", weights_file.read_bytes()))
    monkeypatch.setenv("MXNET_GLUON_REPO", archive_server.base_url + "/")
    write_params(tmp_path, "zoo")
    out = tmp_path / "pretrained" / "w.params"

    assert run(tmp_path, out) == 0
    assert out.read_bytes() == weights_file.read_bytes()
    assert [r.path for r in archive_server.requests] == [f"/gluon/models/{file_name}.zip"]
    assert sorted(os.listdir(out.parent)) == ["w.params"]  # the download dir is gone
    assert not (tmp_path / "mxnet_home").exists()  # GluonCV's cache: not written

    # GluonCV's cache holding the right file is used as is: no download
    cache = tmp_path / "mxnet_home" / "models"
    cache.mkdir(parents=True)
    (cache / f"{file_name}.params").write_bytes(weights_file.read_bytes())
    out.unlink()
    assert run(tmp_path, out) == 0
    assert out.read_bytes() == weights_file.read_bytes() and len(archive_server.requests) == 1


@pytest.mark.parametrize("served", ["404", "other content"])
def test_a_failed_zoo_download_says_which_file_to_provide(tmp_path, weights_file, registered,
                                                          archive_server, monkeypatch, capfd,
                                                          served):
    file_name = f"{NAME}-{registered[:8]}"
    if served == "other content":
        archive_server.add(f"/gluon/models/{file_name}.zip",
                           zipped(f"{file_name}.params", b"not the registered weights"))
    monkeypatch.setenv("MXNET_GLUON_REPO", archive_server.base_url)
    write_params(tmp_path, "zoo")
    out = tmp_path / "pretrained" / "w.params"

    assert run(tmp_path, out) == 1
    err = capfd.readouterr().err
    assert f"cannot download {file_name}.params from {archive_server.base_url}/gluon/models/" \
           f"{file_name}.zip" in err
    assert f"get {file_name}.params (sha1 {registered};" in err
    assert f"put it in GluonCV's cache {tmp_path / 'mxnet_home' / 'models'}/" in err
    assert f"set params weights.{NAME}.source to its path" in err
    assert not out.parent.exists() or os.listdir(out.parent) == []


def test_a_local_file_that_is_not_the_registered_one_is_refused(tmp_path, registered, capfd):
    wrong = tmp_path / "wrong.params"
    wrong.write_bytes(b"some other weights")
    out = tmp_path / "w.params"
    write_params(tmp_path, str(wrong))
    assert run(tmp_path, out) == 2
    err = capfd.readouterr().err
    assert f"sha1 {hashlib.sha1(b'some other weights').hexdigest()}, but GluonCV registers " \
           f"{registered} for {NAME}" in err and f"weights.{NAME}.source" in err
    assert not out.exists()

    write_params(tmp_path, str(tmp_path / "absent.params"))  # the offline user's typo
    assert run(tmp_path, out) == 2
    err = capfd.readouterr().err
    assert "absent.params' is not a file; to provide it, get" in err and registered in err
    assert not out.exists()


def test_names_and_params_are_checked_before_any_work(tmp_path, capfd):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"weights": {"vgg16_atrous_typo": {"source": "zoo", "deadline_s": 10.0},
                     "vgg16_atrous": {"source": "zoo", "deadline_s": 0}}}))
    assert run_in(tmp_path, fetch_weights.main, ["vgg16_atrous_typo", "--out", "w"]) == 2
    assert "'vgg16_atrous_typo' is not in GluonCV's model store registry" in \
        capfd.readouterr().err
    assert run_in(tmp_path, fetch_weights.main, ["vgg16_atrous", "--out", "w"]) == 2
    assert "weights.vgg16_atrous.deadline_s: Input should be greater than 0" in \
        capfd.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["params.yaml"]


def test_project_registers_the_files_it_fetches(repo_root):
    """The real pipeline's names are in the pinned GluonCV's registry, with the sha1 the
    README tells an offline user to provide."""
    from stages.pretrained import registered as lookup

    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    assert set(params["weights"]) == {"vgg16_atrous", "ssd_300_vgg16_atrous_coco"}
    readme = (repo_root / "README.md").read_text()
    for name in params["weights"]:
        entry = lookup(name)
        assert entry.file_name in readme and entry.sha1 in readme


def test_a_download_past_its_deadline_stops_the_stage(tmp_path, weights_file, archive_server):
    """GluonCV's downloader has no timeout: a server that stalls must not hang the pipeline.
    (A subprocess: the stage's download thread is left behind as the process exits.)"""
    sha1 = hashlib.sha1(weights_file.read_bytes()).hexdigest()
    file_name = f"{NAME}-{sha1[:8]}"
    archive_server.add(f"/gluon/models/{file_name}.zip",
                       zipped(f"{file_name}.params", weights_file.read_bytes()),
                       plan=[("stall", 10, 30.0)])
    write_params(tmp_path, "zoo", deadline_s=1.0)
    code = ("import sys; from gluoncv.model_zoo import model_store; "
            f"model_store._model_sha1[{NAME!r}] = {sha1!r}; "
            "from stages.common import main_guard; from stages.fetch_weights import main; "
            "main_guard(main)")
    env = dict(os.environ, MXNET_GLUON_REPO=archive_server.base_url,
               MXNET_HOME=str(tmp_path / "home"), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    proc = subprocess.run([sys.executable, "-c", code, NAME, "--out", "w.params"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"within 1 s (weights.{NAME}.deadline_s)" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["params.yaml"]
