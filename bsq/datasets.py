"""The datasets the suite knows and how a stage batches them: static facts and the `data` config section.

Torch-free on purpose: the config (and so the workflow's parse) validates `data` without importing torch; the
loaders live in `bsq.data`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from bsq.checks import is_int
from bsq.errors import BSQError

__all__ = ["DatasetInfo", "DataConfig", "dataset_info", "list_datasets"]


# ---- dataset registry -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset before seeing any data (builds models, counts BOPs)."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int  # train/test crop size fed to the model
    family: str  # "digits" | "cifar" | "imagenet"


_DATASETS = {
    "cifar10": DatasetInfo("cifar10", num_classes=10, in_channels=3, image_size=32, family="cifar"),
    "digits": DatasetInfo("digits", num_classes=10, in_channels=1, image_size=8, family="digits"),
    "imagenet": DatasetInfo("imagenet", num_classes=1000, in_channels=3, image_size=224, family="imagenet"),
}


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """Static facts of a dataset; an unknown name fails with the list of known ones."""
    if name not in _DATASETS:
        raise BSQError(f"unknown dataset {name!r}; set data.name to one of {', '.join(list_datasets())}")
    return _DATASETS[name]


# ---- configuration --------------------------------------------------------------------------------------------


def _require(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise BSQError(f"data.{key} must be {expected}, got {value!r}")


@dataclass
class DataConfig:
    """Which dataset and how to batch it; validated on construction so a typo fails before any run starts."""

    name: str = "digits"
    # digits: ignored (the data ships with scikit-learn); cifar10: the folder holding cifar-10-batches-py (or that
    # folder itself); imagenet: the folder with train/ and val/ ImageFolder trees.
    root: str | None = None
    download: bool = False  # cifar10 only: torchvision download into root when the pickles are absent (network)
    batch_size: int = 128
    test_batch_size: int = 100
    workers: int = 0  # DataLoader worker processes
    pin_memory: bool | None = None  # None = on when training on CUDA
    augment: bool = True  # train-time augmentation; False = shuffled but unaugmented training batches
    train_subset: int | None = None  # first-k training examples (before sharding), for quick runs / tests
    test_subset: int | None = None  # first-k test examples
    image_size: int | None = None  # imagenet only: crop size (e.g. 299 for inception_v3); None = 224
    # Tensor datasets (digits, cifar10) kept on the training device as uint8 and cropped/flipped there in whole
    # batches: no worker processes, no host-to-device copies. Same batches as the host path. None = on with CUDA.
    on_device: bool | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and self.name in _DATASETS, "name", f"one of {list_datasets()}", self.name)
        if isinstance(self.root, os.PathLike):
            self.root = os.fspath(self.root)
        if self.root == "":
            self.root = None
        _require(self.root is None or isinstance(self.root, str), "root", "a directory path or null", self.root)
        for key in ("download", "augment"):
            _require(isinstance(getattr(self, key), bool), key, "true or false", getattr(self, key))
        for key in ("pin_memory", "on_device"):
            value = getattr(self, key)
            _require(value is None or isinstance(value, bool), key, "null, true or false", value)
        if self.on_device and self.name == "imagenet":
            raise BSQError("data.on_device applies to digits and cifar10 (in-memory tensors), not imagenet")
        for key in ("batch_size", "test_batch_size"):
            value = getattr(self, key)
            _require(is_int(value) and value > 0, key, "a positive integer", value)
        _require(is_int(self.workers) and self.workers >= 0, "workers", "an integer >= 0", self.workers)
        for key in ("train_subset", "test_subset", "image_size"):
            value = getattr(self, key)
            _require(value is None or (is_int(value) and value > 0), key, "null or a positive integer", value)
        if self.image_size is not None and self.name != "imagenet":
            raise BSQError(
                f"data.image_size applies to imagenet only; {self.name} is always fed at "
                f"{_DATASETS[self.name].image_size}x{_DATASETS[self.name].image_size}. Remove data.image_size."
            )
        if self.download and self.name != "cifar10":
            raise BSQError(f"data.download applies to cifar10 only, not {self.name}; set it to false")
