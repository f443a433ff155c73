"""Datasets and loaders: shapes, splits, normalisation, the determinism contract, augmentation, sharding, errors."""

from __future__ import annotations

import csv
import itertools
import os
import pickle
import shlex

import numpy as np
import pytest
import torch

from bsq.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DIGITS_MEAN,
    DIGITS_STD,
    DataConfig,
    TensorImageDataset,
    TrainLoader,
    build_loaders,
    dataset_info,
    digits_split,
    imagenet_wnids,
    list_datasets,
    normalize_cifar,
    read_cifar10,
)
from bsq.errors import BSQError


def _batches(loader, epoch: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if epoch is not None:
        loader.set_epoch(epoch)
    return list(loader)


def _same(a, b) -> bool:
    if len(a) != len(b):
        return False
    return all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b, strict=True))


# ---- registry and config ---------------------------------------------------------------------------------------


def test_registry():
    assert list_datasets() == ["cifar10", "digits", "imagenet"]
    assert dataset_info("digits") == dataset_info("digits")
    info = dataset_info("digits")
    assert (info.num_classes, info.in_channels, info.image_size, info.family) == (10, 1, 8, "digits")
    assert dataset_info("cifar10").image_size == 32 and dataset_info("imagenet").num_classes == 1000
    with pytest.raises(BSQError, match="one of cifar10, digits, imagenet"):
        dataset_info("mnist")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "mnist"}, "data.name must be one of"),
        ({"batch_size": 0}, "data.batch_size must be a positive integer, got 0"),
        ({"test_batch_size": 2.5}, "data.test_batch_size must be a positive integer"),
        ({"batch_size": True}, "data.batch_size must be a positive integer"),
        ({"workers": -1}, "data.workers must be an integer >= 0"),
        ({"pin_memory": "yes"}, "data.pin_memory must be null, true or false"),
        ({"augment": 1}, "data.augment must be true or false"),
        ({"train_subset": 0}, "data.train_subset must be null or a positive integer"),
        ({"root": 3}, "data.root must be a directory path"),
        ({"image_size": 299}, "data.image_size applies to imagenet only"),
        ({"download": True}, "data.download applies to cifar10 only"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(BSQError, match=match):
        DataConfig(**kwargs)


def test_config_accepts_paths(tmp_path):
    assert DataConfig(name="cifar10", root=tmp_path).root == str(tmp_path)
    assert DataConfig(root="").root is None
    assert DataConfig(name="imagenet", image_size=299).image_size == 299


# ---- digits ----------------------------------------------------------------------------------------------------


def test_digits_split_is_fixed_disjoint_and_stratified():
    from sklearn.datasets import load_digits

    train, test = digits_split()
    assert (len(train), len(test)) == (1442, 355)
    assert not set(train) & set(test) and len(set(train) | set(test)) == 1797
    labels = load_digits().target
    for c in range(10):  # every 5th example of each class is a test example
        members = np.flatnonzero(labels == c)
        assert list(np.flatnonzero(np.isin(members, test))) == list(range(4, len(members), 5))
    share = np.bincount(labels[test], minlength=10) / np.bincount(labels, minlength=10)
    assert share.min() > 0.19 and share.max() < 0.21
    x = load_digits().data[train] / 16.0  # the written constants are these statistics
    assert x.mean() == pytest.approx(DIGITS_MEAN[0], abs=1e-12) and x.std() == pytest.approx(DIGITS_STD[0], abs=1e-12)


def test_digits_read_without_sklearn_equal_load_digits():
    """The direct CSV read gives exactly scikit-learn's images and labels, and does not import scikit-learn."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from bsq.data import _load_digits

    images, labels = _load_digits()
    bunch = load_digits()
    assert images.dtype == torch.uint8 and images.shape == (1797, 1, 8, 8)
    assert torch.equal(images[:, 0].long(), torch.from_numpy(bunch.images.astype(np.int64)))
    assert torch.equal(labels, torch.from_numpy(bunch.target.astype(np.int64)))
    code = "import sys, bsq.data as d; d._load_digits(); print('sklearn' in sys.modules, 'torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == [
        "False",
        "False",
    ]


def test_digits_loaders_shapes_and_normalisation():
    loaders = build_loaders(DataConfig(batch_size=128, test_batch_size=100, augment=False), seed=0)
    assert loaders.info == dataset_info("digits")
    assert len(loaders.train) == 12 and len(loaders.test) == 4  # 1442 = 11*128 + 34; 355 = 3*100 + 55
    train = list(loaders.train)
    assert len(train) == 12 and [len(y) for _, y in train][-1] == 1442 - 11 * 128
    x, y = train[0]
    assert x.shape == (128, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    images = torch.cat([x for x, _ in train])
    assert images.mean().item() == pytest.approx(0.0, abs=1e-5) and images.std().item() == pytest.approx(1.0, 1e-3)
    test = list(loaders.test)
    assert [len(y) for _, y in test] == [100, 100, 100, 55]
    from sklearn.datasets import load_digits

    _, test_index = digits_split()
    assert torch.equal(torch.cat([y for _, y in test]), torch.from_numpy(load_digits().target[test_index]))
    expected = (torch.from_numpy(load_digits().images[test_index[:100]]).float() / 16 - DIGITS_MEAN[0]) / DIGITS_STD[0]
    assert torch.allclose(test[0][0][:, 0], expected, atol=1e-6)


def test_last_batch_of_one_is_dropped():
    loaders = build_loaders(DataConfig(batch_size=4, train_subset=9), seed=0)
    assert len(loaders.train) == 2 and [len(y) for _, y in loaders.train] == [4, 4]
    assert len(build_loaders(DataConfig(batch_size=4, train_subset=10), seed=0).train) == 3


# ---- determinism -----------------------------------------------------------------------------------------------


def test_set_epoch_is_a_pure_function_of_seed_and_epoch():
    cfg = DataConfig(batch_size=256)
    loader = build_loaders(cfg, seed=3).train
    first = _batches(loader, 5)
    _batches(loader, 2)
    _batches(loader, 7)
    torch.manual_seed(1234)
    torch.rand(10)
    assert _same(first, _batches(loader, 5))
    fresh = build_loaders(cfg, seed=3).train  # a resumed run: new process, new loader, straight to epoch 5
    assert _same(first, _batches(fresh, 5))
    assert not _same(first, _batches(loader, 6))
    assert not _same(first, _batches(build_loaders(cfg, seed=4).train, 5))
    loader.set_epoch(5)
    order5 = loader.epoch_indices()
    assert order5 == fresh.epoch_indices()


def test_loading_leaves_the_global_rng_alone():
    loaders = build_loaders(DataConfig(batch_size=256), seed=0)
    state = torch.get_rng_state()
    _batches(loaders.train, 1)
    list(loaders.test)
    assert torch.equal(state, torch.get_rng_state())


def test_workers_give_the_same_batches():
    cfg = DataConfig(batch_size=200)
    single = build_loaders(cfg, seed=9).train
    multi = build_loaders(DataConfig(batch_size=200, workers=2), seed=9).train
    assert _same(_batches(single, 3), _batches(multi, 3))
    assert _same(_batches(single, 0), _batches(multi, 0))
    assert _same(_batches(single, 3), _batches(multi, 3))  # persistent workers, after another epoch


# ---- augmentation against an independent expectation ---------------------------------------------------------


def _candidates(image: np.ndarray, pad: int, flips: bool) -> dict[tuple[int, int, bool], np.ndarray]:
    """Every crop of the zero-padded image, and its mirror image: what RandomCrop(padding) (+ flip) can produce."""
    c, h, w = image.shape
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad), dtype=image.dtype)
    padded[:, pad : pad + h, pad : pad + w] = image
    out = {}
    for dy, dx in itertools.product(range(2 * pad + 1), repeat=2):
        crop = padded[:, dy : dy + h, dx : dx + w]
        out[(dy, dx, False)] = crop
        if flips:
            out[(dy, dx, True)] = crop[:, :, ::-1]
    return out


def _augmented_raw(pad: int, flip: bool, channels: int, size: int, epochs: int, mean, std, scale: float):
    """Run a TrainLoader over a tiny random dataset; yield (original uint8 image, de-normalised output)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256 if scale == 255.0 else 17, (6, channels, size, size), generator=gen)
    images = images.to(torch.uint8)  # no zeros inside, so padding is recognisable
    dataset = TensorImageDataset(images, torch.arange(6), mean, std, scale=scale, pad=pad, flip=flip)
    loader = TrainLoader(dataset, batch_size=4, seed=1)
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            raw = ((x * s + m) * scale).round().to(torch.uint8)
            for image, label in zip(raw, y, strict=True):
                yield images[label].numpy(), image.numpy()


def test_digits_augmentation_is_a_zero_padded_shift():
    seen = {}
    for original, image in _augmented_raw(1, False, 1, 8, 60, DIGITS_MEAN, DIGITS_STD, 16.0):
        matches = [k for k, v in _candidates(original, 1, False).items() if np.array_equal(v, image)]
        assert len(matches) == 1, "augmented digit is not a shifted copy of its original"
        seen[matches[0]] = seen.get(matches[0], 0) + 1
    assert len(seen) == 9 and min(seen.values()) > 10  # all 9 shifts by up to one pixel occur; never a flip


def test_cifar_augmentation_is_crop_with_zero_padding_and_flip():
    shifts, flips, total = set(), 0, 0
    for original, image in _augmented_raw(4, True, 3, 8, 200, CIFAR10_MEAN, CIFAR10_STD, 255.0):
        matches = [k for k, v in _candidates(original, 4, True).items() if np.array_equal(v, image)]
        assert len(matches) == 1, "augmented image is not a padded crop (or its mirror) of its original"
        dy, dx, flipped = matches[0]
        shifts.add((dy, dx))
        flips += flipped
        total += 1
    assert len(shifts) == 81
    assert abs(flips / total - 0.5) < 0.05  # 1,200 draws: 5 % is > 3 standard deviations


def test_no_augmentation_when_disabled():
    loaders = build_loaders(DataConfig(augment=False, batch_size=64), seed=0)
    loaders.train.set_epoch(2)
    index = loaders.train.epoch_indices()[:64]
    x, y = next(iter(loaders.train))
    dataset = loaders.train.dataset
    assert torch.equal(x, dataset.normalize(dataset.images[index])) and torch.equal(y, dataset.labels[index])


# ---- sharding ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("subset", [1000, 1001])
def test_ranks_get_disjoint_shards(subset):
    cfg = DataConfig(batch_size=100, train_subset=subset, augment=False)
    ranks = [build_loaders(cfg, seed=5, rank=r, world_size=2).train for r in range(2)]
    for loader in ranks:
        loader.set_epoch(4)
    shards = [loader.epoch_indices() for loader in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 5 and len(shards[0]) == len(shards[1]) == 500
    assert not set(shards[0]) & set(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == 1000  # all of them, or all but N mod world_size
    dataset = ranks[0].dataset
    for loader, shard in zip(ranks, shards, strict=True):  # the batches are those examples, in that order
        batches = list(loader)
        assert torch.equal(torch.cat([x for x, _ in batches]), dataset.normalize(dataset.images[shard]))
        assert torch.equal(torch.cat([y for _, y in batches]), dataset.labels[shard])
    single = build_loaders(cfg, seed=5).train
    single.set_epoch(4)
    assert sorted(shards[0] + shards[1]) == sorted(single.epoch_indices()[: 2 * 500])


# ---- errors ------------------------------------------------------------------------------------------------------


def test_bad_inputs(tmp_path):
    with pytest.raises(BSQError, match="data.train_subset=5000 exceeds the 1,442 digits training examples"):
        build_loaders(DataConfig(train_subset=5000), seed=0)
    with pytest.raises(BSQError, match="data.test_subset=400 exceeds"):
        build_loaders(DataConfig(test_subset=400), seed=0)
    with pytest.raises(BSQError, match="needs data.root"):
        build_loaders(DataConfig(name="cifar10"), seed=0)
    with pytest.raises(BSQError, match="CIFAR-10 not found.*data.download=true"):
        build_loaders(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(BSQError, match="cannot read CIFAR-10 batch"):
        build_loaders(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)
    with pytest.raises(BSQError, match="needs data.root, a folder laid out as root/train/<wnid>"):
        build_loaders(DataConfig(name="imagenet"), seed=0)
    with pytest.raises(BSQError, match="ImageNet train folder .* not found"):
        build_loaders(DataConfig(name="imagenet", root=str(tmp_path)), seed=0)
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    (tmp_path / "train" / "n99999999").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(BSQError, match="unknown ones"):
        build_loaders(DataConfig(name="imagenet", root=str(tmp_path)), seed=0)
    with pytest.raises(BSQError, match="rank"):
        build_loaders(DataConfig(), seed=0, rank=2, world_size=2)
    with pytest.raises(BSQError, match="too few for a batch"):
        build_loaders(DataConfig(train_subset=3), seed=0, world_size=2)
    with pytest.raises(BSQError, match="set_epoch"):
        build_loaders(DataConfig(), seed=0).train.set_epoch(-1)


def test_wnid_list():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and wnids[0] == "n01440764" and wnids == sorted(wnids)


# ---- CIFAR-10 pickles: the restricted unpickler -------------------------------------------------------------------


def _cifar_batch(seed: int, n: int = 20) -> dict:
    """A batch with the official keys and types: str label, list of int labels, uint8 (n, 3072) data, str names."""
    rng = np.random.default_rng(seed)
    return {
        "batch_label": f"synthetic batch {seed}",
        "labels": rng.integers(0, 10, n).tolist(),
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        "filenames": [f"img_{seed}_{i}.png" for i in range(n)],
    }


def _write_cifar(folder, protocol: int, train_first: dict | None = None) -> dict[str, dict]:
    """cifar-10-batches-py under ``folder``; ``train_first`` replaces data_batch_1's content."""
    batches = {name: _cifar_batch(seed) for seed, name in enumerate([f"data_batch_{i}" for i in range(1, 6)])}
    batches["test_batch"] = _cifar_batch(9)
    if train_first is not None:
        batches["data_batch_1"] = train_first
    out = folder / "cifar-10-batches-py"
    out.mkdir(parents=True)
    for name, batch in batches.items():
        (out / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return batches


class _Exec:
    """Unpickling calls builtins.exec, which creates the marker file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


class _System:
    """Unpickling calls os.system (pickled as posix.system), which touches the marker file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


# Pickle writes a global as "module name"; protocols < 3 use the Python 2 module names (builtins -> __builtin__).
_PLANTED = [
    (_Exec, 2, "__builtin__.exec"),
    (_Exec, pickle.HIGHEST_PROTOCOL, "builtins.exec"),
    (_System, 2, f"{os.system.__module__}.system"),  # posix.system on Linux
    (_System, pickle.HIGHEST_PROTOCOL, f"{os.system.__module__}.system"),
]


@pytest.mark.parametrize(("payload", "protocol", "forbidden"), _PLANTED)
def test_planted_batch_is_refused_and_its_code_never_runs(tmp_path, payload, protocol, forbidden):
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps({"labels": payload(control)}, protocol=protocol))  # live under plain pickle
    assert control.exists()
    marker = tmp_path / "marker"
    planted = {**_cifar_batch(0), "labels": payload(marker)}  # after a legitimate array: checked per global
    _write_cifar(tmp_path / "data", protocol=protocol, train_first=planted)
    with pytest.raises(BSQError) as info:
        read_cifar10(tmp_path / "data", train=True)
    message = str(info.value)
    assert f"forbidden global {forbidden}" in message and "data_batch_1" in message
    assert "this is not a CIFAR-10 batch; re-copy or re-download the dataset" in message
    assert not marker.exists()
    with pytest.raises(BSQError, match="forbidden global"):  # the config path reads through the same loader
        build_loaders(DataConfig(name="cifar10", root=str(tmp_path / "data")), seed=0)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_numpy_pickles_load_at_any_protocol(tmp_path, protocol):
    batches = _write_cifar(tmp_path, protocol)
    raw = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    # protocol 2 from Python 3 encodes the array bytes with _codecs.encode; protocol 5 rebuilds with _frombuffer
    assert (b"_codecs" in raw) == (protocol == 2) and (b"_frombuffer" in raw) == (protocol >= 5)
    for train, names in ((True, [f"data_batch_{i}" for i in range(1, 6)]), (False, ["test_batch"])):
        images, labels = read_cifar10(tmp_path, train=train)
        expected = np.concatenate([batches[n]["data"] for n in names]).reshape(-1, 3, 32, 32)
        assert images.dtype == torch.uint8 and torch.equal(images, torch.from_numpy(expected))
        assert labels.tolist() == sum((batches[n]["labels"] for n in names), [])


def test_truncated_batch_is_a_clear_error(tmp_path):
    _write_cifar(tmp_path, protocol=2)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BSQError, match="cannot read CIFAR-10 batch .*test_batch.*Re-copy or re-download"):
        read_cifar10(tmp_path, train=False)


# ---- real data (../shared/data) --------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_cifar10_recon(shared_data):
    root = shared_data / "cifar10_recon"
    loaders = build_loaders(DataConfig(name="cifar10", root=str(root), test_batch_size=100), seed=0)
    assert len(loaders.train.dataset) == 50_000 and len(loaders.test.dataset) == 10_000
    assert len(loaders.train) == 391 and len(loaders.test) == 100
    images, labels = read_cifar10(root, train=False)
    x, y = next(iter(loaders.test))
    assert y[0].item() == 3 and torch.equal(y, labels[:100])  # test image 0 is a cat
    assert torch.equal(x, normalize_cifar(images[:100]))
    loaders.train.set_epoch(0)
    x, y = next(iter(loaders.train))
    assert x.shape == (128, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


@pytest.mark.shared_data
def test_real_cifar_batch_loads_through_the_restricted_unpickler(shared_data):
    """The real files (numpy-1 pickles, protocol 2) need only allowed globals and give plain pickle's arrays."""
    path = shared_data / "cifar10_recon" / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as f:  # trusted read-only copy: the reference
        reference = pickle.load(f, encoding="latin1")
    images, labels = read_cifar10(shared_data / "cifar10_recon", train=False)
    assert torch.equal(images, torch.from_numpy(reference["data"].reshape(-1, 3, 32, 32)))
    assert labels.tolist() == reference["labels"] and len(labels) == 10_000


@pytest.mark.shared_data
def test_imagenet_samples(shared_data, tmp_path):
    source = shared_data / "imagenet_samples" / "sample_images_subset"
    (tmp_path / "train").symlink_to(source, target_is_directory=True)
    (tmp_path / "val").symlink_to(source, target_is_directory=True)
    cfg = DataConfig(name="imagenet", root=str(tmp_path), batch_size=2, test_batch_size=4, test_subset=4)
    loaders = build_loaders(cfg, seed=0)
    assert loaders.info.image_size == 224 and loaders.info.num_classes == 1000
    with open(source / "labels.csv") as f:
        expected = {row["path"].split("/")[0]: int(row["class_index"]) for row in csv.DictReader(f)}
    samples = loaders.test.dataset.samples + build_loaders(cfg, seed=0).train.dataset.samples
    assert expected["n01440764"] == 0 and expected["n01530575"] == 10
    for path, label in samples:
        assert label == expected[path.split("/")[-2]]
    x, y = next(iter(loaders.test))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.tolist() == [0, 10, 20, 30]
    train_cfg = DataConfig(name="imagenet", root=str(tmp_path), batch_size=2, train_subset=4, workers=2)
    multi = build_loaders(train_cfg, seed=1).train
    single = build_loaders(DataConfig(**{**vars(train_cfg), "workers": 0}), seed=1).train
    first = _batches(single, 1)
    assert first[0][0].shape == (2, 3, 224, 224)
    torch.manual_seed(7)
    assert _same(first, _batches(multi, 1)) and _same(first, _batches(single, 1))
    assert not _same(first, _batches(single, 2))
    big = build_loaders(DataConfig(name="imagenet", root=str(tmp_path), image_size=64, test_subset=2), seed=0)
    assert big.info.image_size == 64 and next(iter(big.test))[0].shape == (2, 3, 64, 64)


# ---- the device-resident path (data.on_device) ------------------------------------------------------------------
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _cifar_like(n: int = 300) -> TensorImageDataset:
    gen = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen).to(torch.uint8)
    return TensorImageDataset(images, torch.arange(n) % 10, CIFAR10_MEAN, CIFAR10_STD, pad=4, flip=True)


@pytest.mark.parametrize("device", DEVICES)
def test_resident_loader_gives_the_host_paths_batches(device):
    """Same plan, same tokens, same ops: the on-device batches equal the DataLoader's, bit for bit, every epoch."""
    dataset = _cifar_like()
    host = TrainLoader(dataset, batch_size=64, seed=3)
    resident = TrainLoader(dataset.to(device), batch_size=64, seed=3, resident=True)
    for epoch in (0, 1, 7):
        a = _batches(host, epoch)
        b = [(x.cpu(), y.cpu()) for x, y in _batches(resident, epoch)]
        assert _same(a, b), epoch
        assert all(x.device.type == device for x, _ in resident)


@pytest.mark.parametrize("name", ["digits"])
def test_on_device_config_gives_the_same_train_and_test_batches(name):
    plain = build_loaders(DataConfig(name=name, batch_size=100, on_device=False), seed=4)
    resident = build_loaders(DataConfig(name=name, batch_size=100, on_device=True), seed=4)
    assert resident.train.resident and not plain.train.resident
    assert _same(_batches(plain.train, 2), _batches(resident.train, 2))
    assert _same(list(plain.test), list(resident.test))


def test_on_device_rejects_folder_datasets():
    with pytest.raises(BSQError, match="on_device applies to digits and cifar10"):
        DataConfig(name="imagenet", root="x", on_device=True)
    with pytest.raises(BSQError, match="on_device must be null, true or false"):
        DataConfig(on_device="yes")
