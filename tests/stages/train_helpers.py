"""Shared material of the training tests: a small train.voc section and a tiny VOC devkit."""
from __future__ import annotations

from pathlib import Path

CLASSES = ["rectangle", "ellipse", "triangle"]
SIZE = 128  # the demo SSD's base size


def train_params(**overrides) -> dict:
    """A small train.voc section: demo SSD, 64 px, few images and epochs."""
    params = {
        "network": "demo_ssd", "pretrained_base": False, "classes": CLASSES,
        "splits": [[2007, "trainval"]], "val_split": [2007, "test"], "data_shape": SIZE,
        "batch_size": 8, "epochs": 5, "lr": 0.05, "lr_decay": 0.1, "lr_decay_epochs": [4],
        "schedule": "step", "warmup_epochs": 1, "momentum": 0.9, "wd": 0.0005,
        "augment": "flip", "devices": ["cpu"], "num_workers": 0, "seed": 11,
        "checkpoint_interval": 1, "val_interval": 2, "val_max_images": 0,
        "distributed": distributed(kvstore="device", workers=1),
    }
    params.update(overrides)
    return params


def distributed(**overrides) -> dict:
    """A train.voc.distributed section: loopback parameter server (see stages/cluster.py)."""
    section = {"kvstore": "dist_sync", "workers": 2, "servers": 1, "hosts": ["localhost"],
               "scheduler_host": "127.0.0.1", "scheduler_port": 9091,
               "progress_timeout_s": 120.0}
    section.update(overrides)
    return section


def write_devkit(root: Path) -> Path:
    """VOCdevkit/VOC2007 under ``root``: 32 trainval images (its first 16 also as 'train'),
    8 test images."""
    from stages.dataset_files import write_voc
    from stages.synthetic import make_samples

    devkit = root / "VOCdevkit"
    train = make_samples(32, CLASSES, SIZE, 3, seed=5)
    test = make_samples(8, CLASSES, SIZE, 3, seed=5, first_index=32)
    write_voc(devkit, 2007, {"trainval": train, "train": train[:16], "test": test}, CLASSES)
    return devkit
