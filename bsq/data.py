"""Datasets. CIFAR-10 is read straight from the python-pickle batches (no torchvision integrity check), so
the reconstructed copy in shared/data, whose md5s differ from the official ones, loads as well."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from bsq.errors import BSQError

__all__ = ["read_cifar10", "CIFAR10_MEAN", "CIFAR10_STD", "normalize_cifar"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # the official BSQ / bearpaw normalisation (spec §8.1)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
_TEST_FILES = ["test_batch"]


def _batches_dir(root: str | Path) -> Path:
    root = Path(root)
    for candidate in (root / "cifar-10-batches-py", root):
        if (candidate / "test_batch").is_file():
            return candidate
    raise BSQError(
        f"CIFAR-10 not found under {root}: expected {root}/cifar-10-batches-py/{{data_batch_1..5,test_batch}}. "
        "Set the data root to the folder that contains cifar-10-batches-py (download it from "
        "https://www.cs.toronto.edu/~kriz/cifar.html where the network allows)."
    )


def read_cifar10(root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 N x 3 x 32 x 32, labels int64 N) in the files' original order."""
    folder = _batches_dir(root)
    images, labels = [], []
    for name in _TRAIN_FILES if train else _TEST_FILES:
        path = folder / name
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
            raise BSQError(f"cannot read CIFAR-10 batch {path}: {exc}. Re-copy or re-download the dataset.") from exc
        images.append(torch.from_numpy(data.copy()))
        labels.append(torch.tensor(batch["labels"], dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def normalize_cifar(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float, ToTensor + Normalize with the official mean/std."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (images_uint8.float() / 255.0 - mean) / std
