"""The convert stage: exported models match the Gluon block, params are checked first."""
import hashlib
import json
from pathlib import Path

import pytest

from stages import convert
from stages.export import check_input, compare_outputs, outputs_to_numpy
from stages.heads import make_detector
from stages.inference import load_detector
from stages.models import build_network
from tests.stages.coco_helpers import (NETWORK, convert_params, run_in, shared_workspace,
                                       write_params)


@pytest.mark.parametrize("head", ["seed", "gluoncv"])
def test_exported_model_matches_gluon_block(tmp_path, tmp_path_factory, head):
    ws = shared_workspace(tmp_path_factory)
    write_params(tmp_path, convert=convert_params(head=head))
    out = tmp_path / "model" / "fp32"

    assert run_in(tmp_path, convert.main, ["coco", "--out", out, "--weights", ws.weights]) == 0

    net, meta = load_detector(out)
    assert {"network", "classes", "data_shape", "head", "precision", "mean", "std"} <= set(meta)
    assert (meta["network"], meta["head"], meta["precision"], meta["data_shape"]) == \
        (NETWORK, head, "fp32", 300) and len(meta["classes"]) == 80
    ssd = build_network(NETWORK)
    ssd.load_parameters(str(ws.weights))
    gluon = make_detector(ssd, convert.head_spec(convert.ConvertParams(
        **convert_params(head=head)["coco"])), 300)  # imperative, not hybridized
    x = check_input(300)
    want = outputs_to_numpy(gluon(x))
    got = outputs_to_numpy(net(x))
    assert compare_outputs(want, got, atol=1e-3) is None
    assert got[0].shape == (2, 100, 1) and got[2].shape == (2, 100, 4)
    assert (got[0] >= 0).sum() > 20  # the check exercises real detections, not empty rows
    assert not list(tmp_path.glob("model/.*"))  # no staging leftovers
    assert meta["weights"] == str(ws.weights)  # provenance: which file, and its content
    assert meta["weights_sha1"] == hashlib.sha1(ws.weights.read_bytes()).hexdigest()


@pytest.mark.parametrize("change, message", [
    ({"head": "yolo"}, "convert.coco.head: Input should be 'seed' or 'gluoncv'"),
    ({"head": "gluoncv", "score_thresh": 0.05}, "score_thresh is fixed at 0.01"),
    ({"weights": "trained"}, "must not be set with weights: trained"),
    ({"nms_topk": 0}, "convert.coco.nms_topk: Input should be greater than 0"),
    # the gluoncv head's prefiltered graph cannot be built with fewer NMS rows than it keeps
    ({"head": "gluoncv", "nms_topk": 50, "post_nms": 100},
     "convert.coco: Value error, post_nms (100) must not exceed nms_topk (50)"),
    ({"head": "seed", "nms_topk": 99, "post_nms": 100},
     "post_nms (100) must not exceed nms_topk (99)"),
])
def test_bad_params_fail_before_work(tmp_path, capfd, change, message):
    params = convert_params()
    params["coco"].update(change)
    write_params(tmp_path, convert=params)

    assert run_in(tmp_path, convert.main, ["coco", "--out", tmp_path / "m", "--weights",
                                           tmp_path / "absent.params"]) == 2
    assert message in capfd.readouterr().err
    assert not list(tmp_path.glob("m*"))


def test_missing_weights_file_is_a_clear_error(tmp_path, capfd):
    write_params(tmp_path, convert=convert_params())

    assert run_in(tmp_path, convert.main, ["coco", "--out", tmp_path / "m", "--weights",
                                           tmp_path / "absent.params"]) == 1
    assert "weights file not found" in capfd.readouterr().err
    assert not list(tmp_path.glob("m*"))


def test_trained_weights_come_with_net_json(tmp_path, tmp_path_factory):
    ws = shared_workspace(tmp_path_factory)
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "net.params").symlink_to(ws.weights)
    classes = json.loads(Path(f"{ws.fp32}-meta.json").read_text())["classes"]
    (trained / "net.json").write_text(json.dumps(
        {"network": NETWORK, "classes": classes, "data_shape": 300}))
    write_params(tmp_path, convert={"coco": {"weights": "trained", "head": "seed"}})

    assert run_in(tmp_path, convert.main, ["coco", "--out", tmp_path / "m", "--trained",
                                           trained]) == 0
    meta = json.loads((tmp_path / "m-meta.json").read_text())
    assert meta["weights"] == str(trained / "net.params") and meta["classes"] == classes



@pytest.mark.parametrize("weights, args, needle", [
    ("file", ["--weights", "w.params", "--trained", "."], "'file': --trained must not be given"),
    ("file", [], "'file': --weights is required"),
    ("trained", ["--trained", "."], "'trained': --weights must not be given"),
    ("trained", [], "'trained': --trained is required"),
])
def test_the_weights_given_must_match_the_weights_param(tmp_path, capfd, weights, args, needle):
    params = convert_params() if weights == "file" else {"coco": {"weights": "trained"}}
    write_params(tmp_path, convert=params)
    if weights == "trained" and "--trained" in args:
        args = [*args, "--weights", "w.params"]
    assert run_in(tmp_path, convert.main, ["coco", "--out", tmp_path / "m", *args]) == 2
    err = capfd.readouterr().err
    assert f"convert.coco.weights is {needle}" in err
    assert not list(tmp_path.glob("m*"))


def test_an_output_path_it_does_not_own_is_refused_before_any_work(tmp_path, capfd):
    write_params(tmp_path, convert=convert_params())
    taken = tmp_path / "m-meta.json"  # a directory where the stage writes a file
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert run_in(tmp_path, convert.main, ["coco", "--out", tmp_path / "m", "--weights",
                                           tmp_path / "absent.params"]) == 2
    assert "m-meta.json" in capfd.readouterr().err
    assert (taken / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-meta.json", "params.yaml"]
