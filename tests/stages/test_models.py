"""Building networks: the registry, a pretrained base from a local file, weights for export."""
from __future__ import annotations

import json

import pytest

from stages.common import StageError
from stages.config import ParamsError
from stages.models import NETWORKS, build_detector, build_network, check_input_size, load_ssd
from tests.stages.train_helpers import CLASSES


def test_local_base_file_that_matches_nothing_is_refused(tmp_path):
    import mxnet as mx

    mx.nd.save(str(tmp_path / "base.params"), {"unrelated_weight": mx.nd.zeros((1,))})
    with pytest.raises(StageError, match="none of its 1 arrays matches"):
        build_detector("demo_ssd", CLASSES, tmp_path / "base.params", seed=0)


def test_a_vgg16_atrous_base_file_loads_as_gluoncv_loads_its_pretrained_base(tmp_path):
    """A file in the format of GluonCV's vgg16_atrous (saved by its VGG16-atrous extractor)
    becomes the base of SSD300-VGG16; the SSD's own layers stay seeded-random."""
    import mxnet as mx
    from gluoncv.model_zoo.ssd.vgg_atrous import vgg16_atrous_300

    mx.random.seed(123)  # another stream than the detectors' seed 0 below
    base = vgg16_atrous_300()
    base.initialize()
    base(mx.nd.zeros((1, 3, 300, 300)))
    base.save_parameters(str(tmp_path / "vgg16_atrous.params"))
    saved = mx.nd.load(str(tmp_path / "vgg16_atrous.params"))

    net = build_detector("ssd_300_vgg16_atrous_voc", ["cat", "dog"], tmp_path /
                         "vgg16_atrous.params", seed=0)
    own = net.features._collect_params_with_prefix()  # pylint: disable=protected-access
    assert set(own) == set(saved)
    assert all((own[k].data().asnumpy() == v.asnumpy()).all() for k, v in saved.items())
    fresh = build_detector("ssd_300_vgg16_atrous_voc", ["cat", "dog"], None, seed=0)
    fresh(mx.nd.zeros((1, 3, 300, 300)))  # completes the deferred initialisation
    name = "stages.0.0.weight"  # first conv: random without the base file
    assert not (fresh.features._collect_params_with_prefix()[name].data().asnumpy()
                == saved[name].asnumpy()).all()
    # a file with arrays the base does not have is refused, as GluonCV refuses it
    mx.nd.save(str(tmp_path / "extra.params"), {**saved, "foreign.weight": mx.nd.zeros((1,))})
    with pytest.raises(StageError, match="does not fit the network's base"):
        build_detector("ssd_300_vgg16_atrous_voc", ["cat"], tmp_path / "extra.params", seed=0)


def test_unknown_network_lists_the_known_ones():
    with pytest.raises(StageError, match="unknown network 'resnet'; known: demo_ssd, ssd_300"):
        build_network("resnet")
    assert set(NETWORKS) == {"demo_ssd", "ssd_300_vgg16_atrous_coco", "ssd_300_vgg16_atrous_voc"}


def test_pretrained_base_that_is_no_file_is_refused(tmp_path):
    with pytest.raises(StageError, match="absent.params': no such file"):
        build_detector("demo_ssd", CLASSES, tmp_path / "absent.params", seed=0)
    (tmp_path / "junk.params").write_bytes(b"not mxnet")
    with pytest.raises(StageError, match="not an MXNet .params file"):
        build_detector("demo_ssd", CLASSES, tmp_path / "junk.params", seed=0)


def test_a_data_shape_other_than_the_base_size_is_refused_before_training():
    net = build_detector("demo_ssd", CLASSES, None, seed=0)
    check_input_size(net, 128)
    with pytest.raises(StageError, match="data_shape 300 differs from the network's base size "
                                         "128: set data_shape: 128"):
        check_input_size(net, 300)


def test_detectors_built_from_one_seed_are_identical():
    import mxnet as mx

    def weights(seed):
        net = build_detector("demo_ssd", CLASSES, None, seed=seed)
        net(mx.nd.ones((1, 3, 128, 128)))  # completes the deferred initialisation
        return next(iter(net.collect_params().values())).data().asnumpy()

    assert (weights(4) == weights(4)).all() and not (weights(4) == weights(5)).all()


def write_trained(folder, net, **info):
    folder.mkdir(parents=True, exist_ok=True)
    net.save_parameters(str(folder / "net.params"))
    (folder / "net.json").write_text(json.dumps(info))
    return folder


def test_trained_weights_load_with_their_description(tmp_path):
    import mxnet as mx

    net = build_detector("demo_ssd", CLASSES, None, seed=1)
    net(mx.nd.zeros((1, 3, 128, 128)))
    trained = write_trained(tmp_path / "trained", net, network="demo_ssd", classes=CLASSES,
                            data_shape=128)
    ssd, source = load_ssd("trained", None, None, trained)
    assert (source.network, source.classes, source.data_shape) == ("demo_ssd", tuple(CLASSES),
                                                                   128)
    assert source.weights == str(trained / "net.params")
    x = mx.nd.random.uniform(shape=(1, 3, 128, 128))
    assert (ssd(x)[1].asnumpy() == net(x)[1].asnumpy()).all()


def test_trained_dir_missing_or_incomplete_or_not_fitting_is_refused(tmp_path):
    import mxnet as mx

    with pytest.raises(ParamsError, match="needs --trained"):
        load_ssd("trained", None, None, None)
    with pytest.raises(StageError, match="cannot read trained model description"):
        load_ssd("trained", None, None, tmp_path)
    net = build_detector("demo_ssd", CLASSES, None, seed=1)
    net(mx.nd.zeros((1, 3, 128, 128)))
    partial = write_trained(tmp_path / "partial", net, network="demo_ssd", classes=CLASSES)
    with pytest.raises(StageError, match="missing key\\(s\\) data_shape"):
        load_ssd("trained", None, None, partial)
    other = write_trained(tmp_path / "other", net, network="demo_ssd", classes=CLASSES[:2],
                          data_shape=128)
    with pytest.raises(StageError, match="does not fit the network"):
        load_ssd("trained", None, None, other)
    with pytest.raises(StageError, match="weights file not found"):
        load_ssd("file", "ssd_300_vgg16_atrous_coco", 300, None, tmp_path / "absent.params")
    with pytest.raises(ParamsError, match="needs --weights"):
        load_ssd("file", "ssd_300_vgg16_atrous_coco", 300, None, None)
