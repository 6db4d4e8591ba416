"""Training batches: seeded order and flips, the flip path's labels, normalisation."""
from __future__ import annotations

import numpy as np

from stages.models import GLUONCV_MEAN, GLUONCV_STD
from stages.train_data import (SeededTransform, derive_seed, epoch_batches, flip_batch,
                               normalize, shard_batch)


def test_epoch_order_is_a_seeded_full_cover():
    a = epoch_batches(10, 4, seed=1, epoch=3)
    assert a == epoch_batches(10, 4, seed=1, epoch=3)
    assert a != epoch_batches(10, 4, seed=1, epoch=4)
    assert [len(x) for x in a] == [4, 4, 4] and set(sum(a, [])) == set(range(10))
    assert len(epoch_batches(3, 8, seed=1, epoch=0)[0]) == 8  # fewer images than a batch


def test_derived_seeds_are_independent_per_tuple():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    seeds = {derive_seed(1, e, i) for e in range(5) for i in range(5)}
    assert len(seeds) == 25 and all(0 <= s < 2 ** 32 for s in seeds)
    assert derive_seed(1, 2) != derive_seed(2, 1)


def test_seeded_transform_draws_the_same_for_an_item_whatever_came_before():
    def noisy(img, label):  # a transform drawing from the global RNG, as GluonCV's do
        return img + np.random.rand(), label

    view = SeededTransform([(0.0, "a"), (0.0, "b")], noisy, seed=7)
    first = view[(3, 1)]
    view[(3, 0)], view[(4, 1)], np.random.rand()
    assert view[(3, 1)] == first and view[(4, 1)] != first and len(view) == 2


def test_flip_batch_mirrors_images_and_their_boxes_only():
    images = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
    labels = np.array([[[1, 0, 3, 2, 0], [-1, -1, -1, -1, -1]],
                       [[0, 1, 6, 4, 1], [-1, -1, -1, -1, -1]]], np.float32)
    rng_state = np.random.RandomState(6)
    flips = np.random.RandomState(6).random_sample(2) < 0.5
    got_images, got_labels = flip_batch(images, labels, rng_state)
    assert flips.tolist() == [False, True]  # with seed 6: image 1 flips, image 0 does not
    np.testing.assert_array_equal(got_images[0], images[0])
    np.testing.assert_array_equal(got_images[1], images[1, :, ::-1])
    np.testing.assert_array_equal(got_labels[0], labels[0])
    np.testing.assert_array_equal(got_labels[1, 0], [0, 1, 6, 4, 1])  # full width stays full
    np.testing.assert_array_equal(got_labels[1, 1], [-1, -1, -1, -1, -1])  # padding untouched
    labels[1, 0, :4] = [1, 0, 2, 3]
    _, moved = flip_batch(images, labels, np.random.RandomState(6))
    np.testing.assert_array_equal(moved[1, 0, :4], [4, 0, 5, 3])  # x0' = W - x1, x1' = W - x0


def test_normalize_is_gluoncv_imagenet_normalisation_in_chw():
    images = np.zeros((1, 2, 3, 3), np.uint8)
    images[0, 0, 0] = 255
    x = normalize(images)
    assert x.shape == (1, 3, 2, 3) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    mean, std = np.array(GLUONCV_MEAN), np.array(GLUONCV_STD)
    np.testing.assert_allclose(x[0, :, 1, 1], -mean / std, rtol=1e-6)
    np.testing.assert_allclose(x[0, :, 0, 0], (1 - mean) / std, rtol=1e-6)


def test_workers_split_every_global_batch_into_contiguous_shares():
    for epoch in (0, 1):
        for batch in epoch_batches(10, 4, seed=1, epoch=epoch):
            assert shard_batch(batch, 0, 1) == batch
            assert shard_batch(batch, 0, 2) + shard_batch(batch, 1, 2) == batch
            assert [len(shard_batch(batch, r, 4)) for r in range(4)] == [1, 1, 1, 1]
    # a new shuffle every epoch: worker 0's first share changes
    assert shard_batch(epoch_batches(10, 4, 1, 0)[0], 0, 2) != \
        shard_batch(epoch_batches(10, 4, 1, 1)[0], 0, 2)


def test_a_workers_share_gets_the_flips_of_the_global_batch():
    rng = np.random.RandomState(0)
    images = rng.randint(0, 255, (4, 4, 6, 3)).astype(np.uint8)
    labels = np.tile(np.array([[[1, 0, 3, 2, 0]]], np.float32), (4, 1, 1))
    whole = flip_batch(images, labels, np.random.RandomState(9))
    parts = [flip_batch(images[s:s + 2], labels[s:s + 2], np.random.RandomState(9), draws=4,
                        start=s) for s in (0, 2)]
    for k in (0, 1):
        np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), whole[k])
