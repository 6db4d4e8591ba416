"""Export helpers: a real (small) detector exported, reloaded, compared, published."""
import json
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from stages import export
from stages.common import StageError
from stages.heads import HeadSpec, make_detector
from stages.models import build_network, init_like_trained

CLASSES = ["rectangle", "ellipse", "triangle"]
SIZE = 128  # the demo SSD's base size


@pytest.fixture(scope="module")
def detector():
    ssd = build_network("demo_ssd", classes=CLASSES)
    init_like_trained(ssd, seed=3, background=4.0, data_shape=SIZE)
    return make_detector(ssd, HeadSpec("seed"), SIZE)


def outputs(ids, scores, boxes):
    return [np.asarray(ids, np.float32), np.asarray(scores, np.float32),
            np.asarray(boxes, np.float32)]


def test_compare_outputs_names_what_differs():
    ref = outputs([[[1], [-1]]], [[[0.9], [-1]]], [[[1, 2, 3, 4], [-1, -1, -1, -1]]])
    assert export.compare_outputs(ref, [a.copy() for a in ref], atol=1e-3) is None
    close = [ref[0], ref[1] + 5e-4, ref[2] - 5e-4]
    assert export.compare_outputs(ref, close, atol=1e-3) is None
    other_ids = [np.where(ref[0] == 1, 2, ref[0]), ref[1], ref[2]]
    assert export.compare_outputs(ref, other_ids, atol=1e-3) == "ids differ in 1 of 2 rows"
    far = [ref[0], ref[1], ref[2] + 0.5]
    assert export.compare_outputs(ref, far, atol=1e-3) == "bboxes differ by up to 0.5 " \
                                                          "(allowed 0.001)"
    assert export.compare_outputs(ref, [ref[0][:, :1], ref[1], ref[2]], atol=1e-3) == \
        "ids: shape (1, 1, 1) != (1, 2, 1)"


def test_check_input_is_fixed():
    a, b = export.check_input(SIZE), export.check_input(SIZE)
    assert a.shape == (2, 3, SIZE, SIZE) and a.dtype == np.float32
    assert np.array_equal(a.asnumpy(), b.asnumpy()) and float(a.asnumpy().std()) > 0.5


def test_export_reloads_to_the_same_detections_and_publishes(tmp_path, detector):
    out = tmp_path / "model" / "fp32"
    out.parent.mkdir()
    export.model_files(out)[2].write_text("{}")  # an old meta: replaced last
    x = export.check_input(SIZE)
    with export.StagingDir(out) as tmp_prefix:
        assert tmp_prefix.parent.parent == out.parent and tmp_prefix.name == "fp32"
        expected = export.export_block(detector, tmp_prefix, x)
        export.verify_roundtrip(tmp_prefix, x, expected, atol=1e-3)
        export.publish(tmp_prefix, out, {"network": "demo_ssd"})
        staging = tmp_prefix.parent
    assert not staging.exists()  # the staging dir is gone, only the published files remain
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "fp32-0000.params", "fp32-meta.json", "fp32-symbol.json"]
    assert json.loads(export.model_files(out)[2].read_text()) == {"network": "demo_ssd"}
    assert (expected[0] >= 0).sum() > 0  # the check compares real detections
    export.verify_roundtrip(out, x, expected, atol=1e-3)


def test_roundtrip_that_differs_or_is_missing_fails(tmp_path, detector):
    x = export.check_input(SIZE)
    prefix = tmp_path / "m"
    expected = export.export_block(detector, prefix, x)
    shifted = [expected[0], expected[1], expected[2] + 1.0]
    with pytest.raises(StageError, match="differs from the Gluon block: bboxes differ"):
        export.verify_roundtrip(prefix, x, shifted, atol=1e-3)
    with pytest.raises(StageError, match="model file not found"):
        export.verify_roundtrip(tmp_path / "absent", x, expected, atol=1e-3)


def test_staging_dir_is_removed_when_the_export_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with export.StagingDir(tmp_path / "m") as tmp_prefix:
            tmp_prefix.parent.joinpath("partial").write_text("x")
            raise RuntimeError("export failed")
    assert list(tmp_path.iterdir()) == []


def test_outputs_to_numpy():
    got = export.outputs_to_numpy([mx.nd.ones((1, 2, 1)), mx.nd.zeros((1, 2, 1))])
    assert all(isinstance(a, np.ndarray) for a in got) and got[0].sum() == 2


EXPORT_ONCE = """
import sys
from stages import export
from stages.heads import HeadSpec, make_detector
from stages.models import build_network, init_like_trained
ssd = build_network("demo_ssd", classes=%r)
init_like_trained(ssd, seed=3, background=4.0, data_shape=%d)
export.export_block(make_detector(ssd, HeadSpec("seed"), %d), sys.argv[1], export.check_input(%d))
""" % (CLASSES, SIZE, SIZE, SIZE)


def test_two_runs_export_the_same_model_to_the_same_bytes(tmp_path):
    """Two processes (two runs of the stage) export the same model to byte-identical files:
    the symbol names nothing run-specific (Gluon's constants name their initializer after an
    object id), so a rerun leaves dvc.lock's model md5s unchanged."""
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", EXPORT_ONCE, str(tmp_path / name)], check=True,
                       capture_output=True)
    for suffix in ("-symbol.json", "-0000.params"):
        assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes()
