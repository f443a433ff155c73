"""Datasets and loaders for every training stage (spec §8.1).

Three datasets: the embedded ``digits`` default (scikit-learn's bundled 8x8 handwritten digits, no network),
``cifar10`` (read straight from the python-pickle batches, no torchvision integrity check, so the reconstructed copy
in shared/data, whose md5s differ from the official ones, loads as well) and ``imagenet`` (ImageFolder trees).

Determinism contract: after ``TrainLoader.set_epoch(e)`` the batches (order and augmentation) are a pure function
of (seed, e, rank, world_size). The batch sampler, which runs in the main process, draws the epoch's permutation and
one 62-bit random token per example from a generator seeded by (seed, e); every random choice of an example's
augmentation is derived from its token alone. Nothing reads the global RNG or the workers' RNG state, so resumed
runs, other worker counts and earlier epochs cannot change a batch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from bsq.checks import is_int
from bsq.datasets import DataConfig, DatasetInfo, dataset_info, list_datasets  # re-exported
from bsq.errors import BSQError

__all__ = [
    "read_cifar10",
    "train_set_in_file_order",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "normalize_cifar",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetInfo",
    "dataset_info",
    "list_datasets",
    "DataConfig",
    "Loaders",
    "TrainLoader",
    "TensorImageDataset",
    "FolderImageDataset",
    "build_loaders",
    "digits_split",
    "imagenet_wnids",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # the official BSQ / bearpaw normalisation (spec §8.1)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
# Mean and (population) std of all pixels of the digits training split (digits_split) after scaling 0..16 to
# 0..1, computed in float64 with numpy: x = load_digits().data[train] / 16; x.mean(), x.std().
DIGITS_MEAN = (0.3051358248092926,)
DIGITS_STD = (0.3761575569554463,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
_TEST_FILES = ["test_batch"]
_WNID = re.compile(r"n\d{8}")
_IMAGENET_LAYOUT = "root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG (val sorted into one folder per class)"


# ---- CIFAR-10 pickles -----------------------------------------------------------------------------------------


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


# The only globals a CIFAR-10 batch (or a legitimate re-pickled copy) references: numpy array reconstruction as
# numpy 1 and numpy 2 name it (protocol <= 4: _reconstruct + ndarray + dtype; protocol 5: _frombuffer + dtype) and
# _codecs.encode, which Python 3 uses for bytes in protocol-2 pickles. dict, list, str, bytes and int need none.
_CIFAR_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `_CIFAR_GLOBALS`: a planted batch file cannot name a callable (os.system,
    builtins.exec, ...), so no code runs while reading the dataset."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise BSQError(
            f"{self.path} references the forbidden global {module}.{name}; CIFAR-10 batches hold only numpy arrays, "
            "lists and strings, so this is not a CIFAR-10 batch; re-copy or re-download the dataset."
        )


def _read_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """(uint8 N x 3 x 32 x 32, labels) of one batch file; any unreadable file is a BSQError naming it."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, path).load()
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return data, batch["labels"]
    except BSQError:
        raise  # a forbidden global: the message already names the file and the fix
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as exc:
        raise BSQError(f"cannot read CIFAR-10 batch {path}: {exc}. Re-copy or re-download the dataset.") from exc


def read_cifar10(root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 N x 3 x 32 x 32, labels int64 N) in the files' original order."""
    folder = _batches_dir(root)
    images, labels = [], []
    for name in _TRAIN_FILES if train else _TEST_FILES:
        data, batch_labels = _read_batch(folder / name)
        images.append(torch.from_numpy(data.copy()))
        labels.append(torch.tensor(batch_labels, dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def normalize_cifar(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float, ToTensor + Normalize with the official mean/std."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (images_uint8.float() / 255.0 - mean) / std


# ---- datasets -------------------------------------------------------------------------------------------------


def _collate(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Datasets here return whole batches (__getitems__), so collation is the identity."""
    return batch


class TensorImageDataset(Dataset):
    """In-memory uint8 images (N, C, H, W). Augmentation is done on the raw batch with tensor ops (no PIL):
    zero-pad by ``pad`` and take a random HxW crop (torchvision's RandomCrop(size, padding=pad) semantics: the padded
    value is 0 before normalisation), then an optional horizontal flip, then (x / scale - mean) / std.

    Items are (index, token) pairs; token None = no augmentation. A token picks the crop offsets and the flip."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        scale: float = 255.0,
        pad: int = 0,
        flip: bool = False,
        augment: bool = True,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise BSQError("TensorImageDataset needs uint8 images (N, C, H, W) and N labels")
        self.images, self.labels = images, labels.long()
        c = images.shape[1]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
        self.scale, self.pad, self.flip, self.augment = scale, pad, flip, augment

    def __len__(self) -> int:
        return len(self.images)

    def head(self, k: int) -> TensorImageDataset:
        return TensorImageDataset(
            self.images[:k],
            self.labels[:k],
            self.mean.flatten().tolist(),
            self.std.flatten().tolist(),
            self.scale,
            self.pad,
            self.flip,
            self.augment,
        )

    def to(self, device: torch.device | str) -> TensorImageDataset:
        """A copy whose images, labels and normalisation constants live on ``device``."""
        moved = self.head(len(self))
        moved.images, moved.labels = self.images.to(device), self.labels.to(device)
        moved.mean, moved.std = self.mean.to(device), self.std.to(device)
        return moved

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        # same operations (and so the same bits) as normalize_cifar for CIFAR-10
        return (images.float() / self.scale - self.mean) / self.std

    def crop_and_flip(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Raw uint8 batch -> augmented raw batch; offsets and flips are decoded from the per-example tokens."""
        n, c, h, w = images.shape
        k = 2 * self.pad + 1
        dy, dx, flip = tokens % k, (tokens // k) % k, (tokens // (k * k)) % 2 == 1
        out = images
        if self.pad:
            padded = F.pad(images, (self.pad,) * 4)  # zeros around the raw image
            dev = images.device
            rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
            n_idx, c_idx = (
                torch.arange(n, device=dev)[:, None, None, None],
                torch.arange(c, device=dev)[None, :, None, None],
            )
            out = padded[n_idx, c_idx, rows, cols]
        if self.flip:
            out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        return out

    def __getitems__(self, items: Sequence[tuple[int, int | None]]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor([i for i, _ in items], dtype=torch.long)
        images = self.images[index]
        if self.augment and items and items[0][1] is not None:
            images = self.crop_and_flip(images, torch.tensor([t for _, t in items], dtype=torch.long))
        return self.normalize(images), self.labels[index]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.__getitems__([(i, None)])
        return images[0], labels[0]


class FolderImageDataset(Dataset):
    """Image files with PIL transforms (ImageNet). The transform's torchvision RNG calls are seeded from the item's
    token inside a forked RNG, so the augmentation is reproducible in any worker and the caller's RNG is untouched."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, loader: Callable) -> None:
        self.samples, self.transform, self.loader = samples, transform, loader

    def __len__(self) -> int:
        return len(self.samples)

    def head(self, k: int) -> FolderImageDataset:
        return FolderImageDataset(self.samples[:k], self.transform, self.loader)

    def _load(self, i: int, token: int | None) -> torch.Tensor:
        path = self.samples[i][0]
        try:
            image = self.loader(path)
        except OSError as exc:
            raise BSQError(f"cannot read image {path}: {exc}. Remove or replace the file.") from exc
        if token is None:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(token)
            return self.transform(image)

    def __getitems__(self, items: Sequence[tuple[int, int | None]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([self._load(i, t) for i, t in items])
        return images, torch.tensor([self.samples[i][1] for i, _ in items], dtype=torch.long)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.__getitems__([(i, None)])
        return images[0], labels[0]


# ---- samplers and loaders -------------------------------------------------------------------------------------


def _mix(*parts: Any) -> int:
    """A stable 63-bit seed from several values (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class _ShuffledBatches:
    """Batch sampler yielding [(index, token), ...]. Order and tokens depend on (seed, epoch) only; tokens are drawn
    per dataset index, so an example's augmentation does not depend on rank or world size either.

    Sharding (world_size > 1): every rank shuffles with the same permutation, drops its last N mod world_size
    entries (different examples each epoch) and takes every world_size-th one from ``rank`` on: disjoint shards of
    equal size, hence the same number of steps on every rank (which DDP needs). Batches: no drop_last, as the
    official scripts, except that a final batch of a single example is dropped (BatchNorm cannot train on it)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.per_rank = n // world_size
        self.epoch = 0

    def __len__(self) -> int:
        full, rest = divmod(self.per_rank, self.batch_size)
        return full + (rest > 1)

    def plan(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's dataset indices in visiting order, tokens of all dataset indices) for the current epoch."""
        g = torch.Generator().manual_seed(_mix("bsq.data.train", self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g)
        tokens = torch.randint(0, 2**62, (self.n,), generator=g)
        shard = order[: self.per_rank * self.world_size][self.rank :: self.world_size]
        return shard[: min(len(self) * self.batch_size, len(shard))], tokens

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        shard, tokens = self.plan()
        for start in range(0, len(shard), self.batch_size):
            index = shard[start : start + self.batch_size]
            yield list(zip(index.tolist(), tokens[index].tolist(), strict=True))


class _SequentialBatches:
    """Fixed-order batches [(index, None), ...] for evaluation."""

    def __init__(self, n: int, batch_size: int) -> None:
        self.n, self.batch_size = n, batch_size

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, None]]]:
        for start in range(0, self.n, self.batch_size):
            yield [(i, None) for i in range(start, min(start + self.batch_size, self.n))]


def _data_loader(dataset: Dataset, batch_sampler: Any, workers: int, pin_memory: bool, seed: int) -> DataLoader:
    # A private generator keeps DataLoader from drawing its worker base seed from the global RNG (which would make
    # the model's random stream depend on the loader); the data itself never uses worker RNG state.
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(_mix("bsq.data.workers", seed)),
    )


class TrainLoader:
    """Shuffled, augmented training batches (images float32 NCHW normalised, labels int64) on the CPU.

    After ``set_epoch(e)`` the batches are a pure function of (seed, e, rank, world_size): see the module docstring.
    Without set_epoch every pass repeats epoch 0 (as DistributedSampler). ``len()`` is the number of batches."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        pin_memory: bool = False,
        resident: bool = False,
    ) -> None:
        self.dataset = dataset
        self.batches = _ShuffledBatches(len(dataset), batch_size, seed, rank, world_size)
        # resident: index a TensorImageDataset where it lives (e.g. on the GPU) instead of a DataLoader.
        if resident and not isinstance(dataset, TensorImageDataset):
            raise BSQError("a resident TrainLoader needs an in-memory TensorImageDataset (digits or cifar10)")
        self.resident = resident
        self.loader = None if self.resident else _data_loader(dataset, self.batches, workers, pin_memory, seed)

    @property
    def epoch(self) -> int:
        return self.batches.epoch

    def set_epoch(self, epoch: int) -> None:
        if not is_int(epoch) or epoch < 0:
            raise BSQError(f"TrainLoader.set_epoch needs an integer >= 0, got {epoch!r}")
        self.batches.epoch = epoch

    def epoch_indices(self) -> list[int]:
        """Dataset indices this rank visits in the current epoch, in order (for checks and debugging)."""
        return self.batches.plan()[0].tolist()

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._resident_batches() if self.resident else iter(self.loader)

    def _resident_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The host path's batches, computed where the data lives: same plan, same tokens, same ops."""
        data = self.dataset
        shard, tokens = self.batches.plan()
        shard, tokens = shard.to(data.images.device), tokens.to(data.images.device)
        for start in range(0, len(shard), self.batches.batch_size):
            index = shard[start : start + self.batches.batch_size]
            images = data.images[index]
            if data.augment:
                images = data.crop_and_flip(images, tokens[index])
            yield data.normalize(images), data.labels[index]


class ResidentTestLoader:
    """Fixed-order evaluation batches of a device-resident TensorImageDataset."""

    def __init__(self, dataset: TensorImageDataset, batch_size: int) -> None:
        self.dataset, self.batch_size = dataset, batch_size

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data = self.dataset
        for start in range(0, len(data), self.batch_size):
            yield (
                data.normalize(data.images[start : start + self.batch_size]),
                data.labels[start : start + self.batch_size],
            )


@dataclass
class Loaders:
    """The training loader (sharded per rank) and the test loader. The test loader is fixed order, unaugmented and
    not sharded: every rank evaluates the whole test set, the simplest choice that is correct without an
    all-reduce of the metrics."""

    train: TrainLoader
    test: DataLoader | ResidentTestLoader
    info: DatasetInfo


# ---- dataset builders -----------------------------------------------------------------------------------------


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into ``sklearn.datasets.load_digits()``: within each class, in file order, every 5th
    example (the 5th, 10th, ...) is a test example. Stratified, fixed (no RNG, so independent of the run seed and
    of scikit-learn's shuffling code): 1,442 train / 355 test."""
    labels = _load_digits()[1].numpy()
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        is_test[np.flatnonzero(labels == c)[4::5]] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _digits_csv() -> Path | None:
    """Where scikit-learn keeps the digits CSV, found without importing it (None: scikit-learn is absent)."""
    spec = importlib.util.find_spec("sklearn")
    return Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _fingerprint(paths: list[Path]) -> str:
    """A cheap digest of data files: names and sizes (a file under 1 MiB, e.g. the digits CSV, by content)."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode())
        h.update(path.read_bytes() if path.stat().st_size < 1 << 20 else str(path.stat().st_size).encode())
    return h.hexdigest()


def dataset_source(cfg: DataConfig) -> tuple[str, str]:
    """(source URI, content fingerprint) of a dataset as configured, for its MLflow dataset input. The fingerprint
    is cheap: file names and sizes for CIFAR-10, the class folders of each split for ImageNet (not a walk over a
    million files), "" where the files cannot be read; the source is the official download where none is local."""
    source, content = None, ""
    try:
        if cfg.name == "digits":
            csv = _digits_csv()
            if csv is not None and csv.is_file():
                source, content = csv.as_uri(), _fingerprint([csv])
        elif cfg.root is not None:
            root = Path(cfg.root).expanduser().resolve()
            source = root.as_uri()
            if cfg.name == "cifar10":
                folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
                content = _fingerprint([p for p in folder.iterdir() if p.is_file()])
            else:
                listing = [
                    f"{s}/{p.name}" for s in ("train", "val") if (root / s).is_dir() for p in (root / s).iterdir()
                ]
                content = hashlib.sha256("\n".join(sorted(listing)).encode()).hexdigest()
    except OSError:
        content = ""
    if source is None:
        source = CIFAR10_URL if cfg.name == "cifar10" else f"bsq-repro://datasets/{cfg.name}"
    return source, content


@cache
def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits exactly as ``sklearn.datasets.load_digits()`` gives them, read straight from the CSV that
    scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`: 64 pixels 0..16, then the label, per row).
    Locating the file without importing scikit-learn saves ~3.5 s of start-up (it imports scipy) in every job."""
    path = _digits_csv()
    if path is None or not path.is_file():
        raise BSQError(
            "data.name=digits needs scikit-learn, which ships the digits: pip install scikit-learn "
            "(or install bsq-repro[workflow])"
        )
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise BSQError(f"cannot read the digits from {path}: {exc}. Reinstall scikit-learn.") from exc
    if table.shape != (1797, 65):
        raise BSQError(f"{path} holds {table.shape} values, not the 1797 x (64 pixels + label) digits")
    images = torch.from_numpy(table[:, :64].reshape(-1, 1, 8, 8).astype(np.uint8))  # values 0..16
    return images, torch.from_numpy(table[:, 64].astype(np.int64))


def _digits(cfg: DataConfig) -> tuple[TensorImageDataset, TensorImageDataset]:
    """Random translation by up to 1 pixel (zero padding of the raw image); no flip, digits are not mirror-symmetric."""
    images, labels = _load_digits()
    train, test = (torch.from_numpy(i) for i in digits_split())
    kw = {"mean": DIGITS_MEAN, "std": DIGITS_STD, "scale": 16.0}
    return (
        TensorImageDataset(images[train], labels[train], pad=1, flip=False, augment=cfg.augment, **kw),
        TensorImageDataset(images[test], labels[test], augment=False, **kw),
    )


def _cifar10(cfg: DataConfig) -> tuple[TensorImageDataset, TensorImageDataset]:
    """RandomCrop(32, padding=4) + RandomHorizontalFlip, Normalize with CIFAR10_MEAN/STD (spec §8.1)."""
    if cfg.root is None:
        raise BSQError(
            "data.name=cifar10 needs data.root: the folder that holds cifar-10-batches-py (e.g. "
            "../shared/data/cifar10_recon). Get the data from https://www.cs.toronto.edu/~kriz/cifar.html, or set "
            "data.root to an empty folder and data.download=true to let torchvision fetch it."
        )
    root = Path(cfg.root).expanduser()
    try:
        _batches_dir(root)
    except BSQError as exc:
        if not cfg.download:
            raise BSQError(f"{exc} Or set data.download=true to fetch it with torchvision (network needed).") from exc
        _download_cifar10(root)
    kw = {"mean": CIFAR10_MEAN, "std": CIFAR10_STD, "scale": 255.0}
    return (
        TensorImageDataset(*read_cifar10(root, train=True), pad=4, flip=True, augment=cfg.augment, **kw),
        TensorImageDataset(*read_cifar10(root, train=False), augment=False, **kw),
    )


def _download_cifar10(root: Path) -> None:
    """Only called when the pickles are absent, so an existing (e.g. reconstructed) copy is never replaced."""
    try:
        from torchvision.datasets import CIFAR10

        root.mkdir(parents=True, exist_ok=True)
        CIFAR10(str(root), train=True, download=True)
    except Exception as exc:  # network, disk and archive errors come in many types
        raise BSQError(
            f"downloading CIFAR-10 into {root} failed: {exc}. Check the network, or unpack cifar-10-python.tar.gz "
            f"from https://www.cs.toronto.edu/~kriz/cifar.html into {root} by hand."
        ) from exc


@cache
def imagenet_wnids() -> list[str]:
    """The 1000 ILSVRC-2012 WNIDs in class-index order (sorted; the torchvision / standard index)."""
    try:
        text = resources.files("bsq").joinpath("imagenet_wnids.txt").read_text()
    except OSError as exc:
        raise BSQError(
            f"package data bsq/imagenet_wnids.txt is missing ({exc}); reinstall bsq-repro from a complete checkout"
        ) from exc
    wnids = text.split()
    if len(wnids) != 1000 or wnids != sorted(wnids):
        raise BSQError("package data bsq/imagenet_wnids.txt is damaged; reinstall bsq-repro")
    return wnids


def _class_index(folder: Path, fallback: dict[str, int] | None) -> dict[str, int]:
    """WNID folders -> the standard 1000-class index, even when only some classes are present. Other names ->
    torchvision's sorted-name order (taken from the train folder, so train and val agree)."""
    try:
        names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    except OSError as exc:
        raise BSQError(f"cannot list {folder}: {exc}. Check data.root and its permissions.") from exc
    if not names:
        raise BSQError(f"no class folders in {folder}; expected {_IMAGENET_LAYOUT}")
    if any(_WNID.fullmatch(n) for n in names):
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        unknown = [n for n in names if n not in index]
        if unknown:
            raise BSQError(
                f"{folder} mixes ImageNet WNID folders with unknown ones {unknown[:5]}; every class folder must be "
                "one of the 1000 ILSVRC-2012 WNIDs (e.g. n01440764). Remove the others."
            )
        return {n: index[n] for n in names}
    if fallback is None:
        if len(names) > 1000:
            raise BSQError(f"{folder} has {len(names)} class folders; the imagenet dataset has at most 1000")
        return {n: i for i, n in enumerate(names)}
    unknown = [n for n in names if n not in fallback]
    if unknown:
        raise BSQError(f"classes {unknown[:5]} of {folder} have no train folder; use the same class folders in both")
    return {n: fallback[n] for n in names}


def _imagenet(cfg: DataConfig, size: int) -> tuple[FolderImageDataset, FolderImageDataset]:
    """Train: RandomResizedCrop(size) + RandomHorizontalFlip; test: Resize(size*256/224) + CenterCrop(size)."""
    from torchvision import transforms as T
    from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, make_dataset

    if cfg.root is None:
        raise BSQError(f"data.name=imagenet needs data.root, a folder laid out as {_IMAGENET_LAYOUT}")
    root = Path(cfg.root).expanduser()
    folders = {split: root / split for split in ("train", "val")}
    for split, folder in folders.items():
        if not folder.is_dir():
            raise BSQError(f"ImageNet {split} folder {folder} not found: data.root must hold {_IMAGENET_LAYOUT}")
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    test_tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), *normalize])
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalize]) if cfg.augment else test_tf
    sets = []
    train_index = _class_index(folders["train"], None)
    for split, tf in (("train", train_tf), ("val", test_tf)):
        index = train_index if split == "train" else _class_index(folders["val"], train_index)
        try:
            samples = make_dataset(str(folders[split]), index, extensions=IMG_EXTENSIONS)
        except (FileNotFoundError, OSError) as exc:
            raise BSQError(f"cannot scan ImageNet {split} folder {folders[split]}: {exc}") from exc
        sets.append(FolderImageDataset(samples, tf, default_loader))
    return sets[0], sets[1]


def _head(dataset: Any, k: int | None, key: str, what: str) -> Any:
    if k is None:
        return dataset
    if k > len(dataset):
        raise BSQError(
            f"data.{key}={k} exceeds the {len(dataset):,} {what} examples; lower it or set it to null (all of them)"
        )
    return dataset.head(k)


def train_set_in_file_order(cfg: DataConfig) -> TensorImageDataset:
    """The training images in file order and without augmentation: the batches of the authors' reference
    trajectories (`bsq trace`, official_trajectories.json), whatever `data.augment` says."""
    cfg = replace(cfg, augment=False)
    if cfg.name == "digits":
        return _digits(cfg)[0]
    if cfg.name == "cifar10":
        return _cifar10(cfg)[0]
    raise BSQError(f"bsq trace reads digits or cifar10 training images, not {cfg.name!r}")


def build_loaders(
    cfg: DataConfig, seed: int, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1
) -> Loaders:
    """Datasets of ``cfg`` as loaders; ``device`` only decides pin_memory when cfg.pin_memory is None."""
    if not is_int(seed):
        raise BSQError(f"seed must be an integer, got {seed!r}")
    if not (is_int(world_size) and world_size >= 1 and is_int(rank) and 0 <= rank < world_size):
        raise BSQError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    info = dataset_info(cfg.name)
    if cfg.name == "digits":
        train_set, test_set = _digits(cfg)
    elif cfg.name == "cifar10":
        train_set, test_set = _cifar10(cfg)
    else:
        info = replace(info, image_size=cfg.image_size or info.image_size)
        train_set, test_set = _imagenet(cfg, info.image_size)
    train_set = _head(train_set, cfg.train_subset, "train_subset", f"{cfg.name} training")
    test_set = _head(test_set, cfg.test_subset, "test_subset", f"{cfg.name} test")
    pin = cfg.pin_memory if cfg.pin_memory is not None else torch.device(device).type == "cuda"
    pin = pin and torch.cuda.is_available()
    resident = cfg.on_device if cfg.on_device is not None else torch.device(device).type == "cuda"
    resident = resident and isinstance(train_set, TensorImageDataset)
    if resident:
        train_set, test_set = train_set.to(device), test_set.to(device)
    train = TrainLoader(train_set, cfg.batch_size, seed, rank, world_size, cfg.workers, pin and not resident, resident)
    if len(train) == 0:
        raise BSQError(
            f"rank {rank} of {world_size} gets {len(train_set) // world_size} training example(s), too few for a "
            "batch; raise data.train_subset or use fewer processes"
        )
    if train.resident:
        return Loaders(train=train, test=ResidentTestLoader(test_set, cfg.test_batch_size), info=info)
    test = _data_loader(test_set, _SequentialBatches(len(test_set), cfg.test_batch_size), cfg.workers, pin, seed)
    return Loaders(train=train, test=test, info=info)
