import threading
import time

import cv2
import numpy as np
import pytest

from stages import images
from stages.common import StageError
from stages.synthetic import encode_jpeg
from tests.stages.waiting import wait_for

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def reference_transform(rgb: np.ndarray, size: int) -> np.ndarray:
    """GluonCV's SSD val transform as the plain numpy formula (what the project computed before
    the lookup tables): resize, /255, -mean, /std in float32, CHW."""
    resized = cv2.resize(rgb, (size, size),
                         interpolation=images.resize_interpolation(rgb.shape[:2], size))
    x = resized.astype(np.float32) / np.float32(255)
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@pytest.mark.parametrize("shape", [(480, 640), (200, 150), (280, 400), (300, 300), (1, 1),
                                   (301, 299)])  # shrink, grow, mixed, same, tiny, off by one
def test_preprocess_is_bit_identical_to_the_reference_formula(shape):
    rng = np.random.RandomState(sum(shape))
    rgb = rng.randint(0, 256, (*shape, 3)).astype(np.uint8)
    rgb[0, 0] = (0, 128, 255)  # extremes in every channel
    batch = np.full((3, 3, 300, 300), np.nan, np.float32)
    images.Preprocessor(300, MEAN, STD)(np.ascontiguousarray(rgb[:, :, ::-1]), batch[1])
    want = reference_transform(rgb, 300)
    assert np.array_equal(batch[1].view(np.uint32), want.view(np.uint32))  # bit for bit
    assert np.isnan(batch[0]).all() and np.isnan(batch[2]).all()  # only its own slot written
    out = np.empty((3, 300, 300), np.float32)
    images.Preprocessor(300, MEAN, STD)(rgb, out, bgr=False)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))


def write_images(folder, n, size=(24, 32)):
    items = []
    for i in range(n):
        path = folder / f"{i}.jpg"
        path.write_bytes(encode_jpeg(np.full((*size, 3), 20 * i, np.uint8)))
        items.append(images.ImageItem(i, path))
    return items


def expected_batch(items, size=16):
    prep = images.Preprocessor(size, (0, 0, 0), (1, 1, 1))
    out = np.empty((len(items), 3, size, size), np.float32)
    for j, item in enumerate(items):
        prep(images.read_bgr(item.path), out[j])
    return out


def loader_threads():
    """Loader threads still alive (after waiting for idle ones to notice they were stopped)."""
    alive = [t for t in threading.enumerate() if t.name.startswith("image-loader")]
    for thread in alive:
        thread.join(10)
    return [t for t in alive if t.is_alive()]


@pytest.mark.parametrize("workers,ahead", [(0, 0), (1, 0), (1, 2), (2, 1), (3, 5)])
def test_batches_are_complete_in_order_whatever_the_threads(tmp_path, workers, ahead):
    items = write_images(tmp_path, 11)
    loader = images.BatchLoader(items, images.Preprocessor(16, (0, 0, 0), (1, 1, 1)), 4,
                                workers=workers, ahead=ahead)
    batches = list(loader)
    assert [b.keys for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert all(size == (24, 32) for b in batches for size in b.sizes)
    for b, start in zip(batches, (0, 4, 8)):
        assert np.array_equal(b.data, expected_batch(items[start:start + len(b.keys)]))
    assert not loader_threads()


def test_a_starved_background_thread_does_not_hold_up_the_consumer(tmp_path):
    """A low-priority thread that claimed an image and gets no CPU (simulated: it blocks until
    released) must not make the consumer wait: the consumer loads that image itself."""
    items = write_images(tmp_path, 4)
    release, stalled = threading.Event(), []

    class Stalling(images.Preprocessor):
        def __call__(self, image, out, bgr=True):
            if threading.current_thread().name.startswith("image-loader"):
                stalled.append(release.wait(60))  # True only once the test releases it
            super().__call__(image, out, bgr)

    loader = images.BatchLoader(items, Stalling(16, (0, 0, 0), (1, 1, 1)), 2, workers=1,
                                ahead=1, steal_after_s=0.01)
    batches = iter(loader)
    first = next(batches)
    assert stalled == []  # the background thread is still stuck in its image ...
    assert np.array_equal(first.data, expected_batch(items[:2]))  # ... yet the batch is whole
    release.set()
    assert [b.keys for b in batches] == [[2, 3]]
    assert stalled and all(stalled)


def test_abandoned_iteration_stops_its_threads(tmp_path):
    items = write_images(tmp_path, 12)
    batches = iter(images.BatchLoader(items, images.Preprocessor(16, (0, 0, 0), (1, 1, 1)), 2,
                                      workers=2, ahead=2))
    next(batches)
    assert any(t.name.startswith("image-loader") for t in threading.enumerate())
    batches.close()  # what a consumer's early break/exception does to the generator
    assert not loader_threads()


def test_an_unreadable_image_fails_when_its_batch_is_due(tmp_path):
    items = write_images(tmp_path, 6)
    (tmp_path / "3.jpg").write_bytes(b"not a jpeg")
    batches = iter(images.BatchLoader(items, images.Preprocessor(16, (0, 0, 0), (1, 1, 1)), 2,
                                      workers=2, ahead=2))
    assert next(batches).keys == [0, 1]
    with pytest.raises(StageError, match="cannot read image .*3.jpg"):
        next(batches)
    assert not loader_threads()


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(StageError, match="cannot read image .*nope.jpg"):
        images.read_bgr(tmp_path / "nope.jpg")


def test_a_head_start_loads_its_batches_before_the_consumer_asks_and_no_more(tmp_path):
    """Started before the caller's setup, the threads load the batches of the head start at
    once (ahead=0 would otherwise keep them on batch 0), and none beyond it."""
    items = write_images(tmp_path, 12)
    prep = images.Preprocessor(16, (0, 0, 0), (1, 1, 1))
    image_bytes = 3 * 16 * 16 * 4
    with images.BatchLoader(items, prep, 2, workers=2, ahead=0,
                            head_start_bytes=3 * 2 * image_bytes + image_bytes) as loader:
        assert loader.head_start == 3  # 3.5 batches of bytes: 3 whole batches
        # nobody iterates yet: the threads load batches 0-2 (6 images) and stop there
        assert wait_for(lambda: all(loader.state.get(g, {}).get("left") == 0 for g in range(3)))
        time.sleep(0.2)
        assert loader.next_task == 6 and set(loader.state) == {0, 1, 2}
        batches = list(loader)
    assert [b.keys for b in batches] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    for b, start in zip(batches, range(0, 12, 2)):
        assert np.array_equal(b.data, expected_batch(items[start:start + 2]))
    assert not loader_threads()


def test_without_a_head_start_the_threads_stay_ahead_batches_ahead(tmp_path):
    items = write_images(tmp_path, 12)
    with images.BatchLoader(items, images.Preprocessor(16, (0, 0, 0), (1, 1, 1)), 2,
                            workers=2, ahead=1) as loader:
        assert loader.head_start == 0
        assert wait_for(lambda: all(loader.state.get(g, {}).get("left") == 0 for g in range(2)))
        time.sleep(0.2)
        assert loader.next_task == 4  # batches 0 and 1 (the due one and one ahead)


def test_leaving_the_with_block_before_iterating_stops_the_threads(tmp_path):
    """A caller whose setup fails (e.g. the model does not load) must not leave loaders."""
    items = write_images(tmp_path, 40)
    with pytest.raises(RuntimeError, match="setup failed"):
        with images.BatchLoader(items, images.Preprocessor(16, (0, 0, 0), (1, 1, 1)), 2,
                                workers=2, head_start_bytes=1 << 20):
            raise RuntimeError("setup failed")
    assert not loader_threads()


def test_covers_tells_the_items_and_batch_size_it_was_started_on(tmp_path):
    items = write_images(tmp_path, 5)
    with images.BatchLoader(items, images.Preprocessor(16, (0, 0, 0), (1, 1, 1)), 2,
                            workers=0) as loader:
        assert loader.covers(items, 2)
        assert not loader.covers(items, 3)
        assert not loader.covers(items[:4], 2)
        assert not loader.covers(items[1:] + items[:1], 2)
