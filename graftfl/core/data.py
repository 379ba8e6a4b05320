"""Dataset registry and partitioning.

Every dataset is loaded whole into memory as normalised float tensors; a client
then keeps only the indices of its own partition, computed with flwr-datasets
partitioners over an in-memory index table (no hub access). A named dataset that
is missing is an error that says how to get it, never a silent substitute.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DatasetUnavailable(RuntimeError):
    """A named dataset is not on disk and cannot be downloaded."""


@dataclass
class DatasetSplits:
    """A dataset in memory: normalised images and integer labels."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one training sample (without the batch dimension)."""
        return tuple(self.train_x.shape[1:])


# ---------------------------------------------------------------- loaders ---


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    return None


def _load_idx_folder(folder: Path) -> tuple[np.ndarray, ...] | None:
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    paths = [_find_idx(folder, stem) for stem in stems]
    if any(path is None for path in paths):
        return None
    return tuple(_read_idx(path) for path in paths)


def _torchvision_download(cls_name: str, root: Path, download: bool, hint: str | None = None, **split_kwargs) -> tuple[np.ndarray, ...]:
    from torchvision import datasets as tv_datasets

    cls = getattr(tv_datasets, cls_name)
    hint = hint or (
        f"{cls_name} is not under dataset.root={root}. Put the files there (torchvision layout) "
        f"or run once online with dataset.download=true"
    )
    try:
        train = cls(str(root), download=download, **split_kwargs["train"])
        test = cls(str(root), download=download, **split_kwargs["test"])
    except (RuntimeError, OSError) as err:  # torchvision raises these for missing files / no network
        raise DatasetUnavailable(f"{hint} ({err})") from err
    return _as_arrays(train) + _as_arrays(test)


def _as_arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(dataset.data)
    labels = np.asarray(getattr(dataset, "targets", None) if hasattr(dataset, "targets") else dataset.labels)
    if images.ndim == 4 and images.shape[-1] == 3:  # CIFAR: NHWC -> NCHW
        images = images.transpose(0, 3, 1, 2)
    return images, labels


def _mnist_like(cls_name: str, debian_dir: Path | None) -> Callable[[Path, bool], tuple[np.ndarray, ...]]:
    def load(root: Path, download: bool) -> tuple[np.ndarray, ...]:
        folders = [root / cls_name / "raw", root]
        if debian_dir is not None:
            folders.insert(0, debian_dir)
        for folder in folders:
            arrays = _load_idx_folder(folder)
            if arrays is not None:
                return arrays
        hint = (
            f"{cls_name} not found in {[str(f) for f in folders]}. "
            + ("Install Debian's package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), " if debian_dir else "")
            + "put the IDX files under dataset.root, or allow dataset.download=true when online."
        )
        if not download:
            raise DatasetUnavailable(hint)
        return _torchvision_download(cls_name, root, download, hint, train={"train": True}, test={"train": False})

    return load


def _cifar(cls_name: str) -> Callable[[Path, bool], tuple[np.ndarray, ...]]:
    def load(root: Path, download: bool) -> tuple[np.ndarray, ...]:
        return _torchvision_download(cls_name, root, download, train={"train": True}, test={"train": False})

    return load


def _svhn(root: Path, download: bool) -> tuple[np.ndarray, ...]:
    return _torchvision_download("SVHN", root, download, train={"split": "train"}, test={"split": "test"})


def _digits(root: Path, download: bool) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))  # fixed split, independent of run seed
    test, train = order[:360], order[360:]
    return images[train], labels[train], images[test], labels[test]


def _medmnist(subset: str) -> Callable[[Path, bool], tuple[np.ndarray, ...]]:
    def load(root: Path, download: bool) -> tuple[np.ndarray, ...]:
        path = root / f"{subset}.npz"
        if not path.exists():
            if not download:
                raise DatasetUnavailable(
                    f"MedMNIST subset '{subset}' not found at {path}. Download {subset}.npz with the "
                    f"`medmnist` package (python -m medmnist download) into dataset.root, or set dataset.download=true."
                )
            try:
                import medmnist

                info = medmnist.INFO[subset]
                getattr(medmnist, info["python_class"])(split="train", root=str(root), download=True)
            except Exception as err:  # medmnist raises bare Exceptions on network errors
                raise DatasetUnavailable(f"could not download MedMNIST '{subset}' into {root}: {err}") from err
        npz = np.load(path)
        fix = lambda images: images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)  # noqa: E731
        return (
            fix(npz["train_images"]),
            npz["train_labels"].reshape(-1),
            fix(npz["test_images"]),
            npz["test_labels"].reshape(-1),
        )

    return load


DATASETS: dict[str, Callable[[Path, bool], tuple[np.ndarray, ...]]] = {
    "fashion_mnist": _mnist_like("FashionMNIST", DEBIAN_FASHION_MNIST),
    "mnist": _mnist_like("MNIST", None),
    "cifar10": _cifar("CIFAR10"),
    "cifar100": _cifar("CIFAR100"),
    "svhn": _svhn,
    "digits": _digits,
}


def _dataset_loader(name: str, subset: str | None):
    if name == "medmnist":
        if not subset:
            raise ValueError("dataset 'medmnist' needs dataset.subset (e.g. organamnist)")
        return _medmnist(subset)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; valid datasets: {sorted([*DATASETS, 'medmnist'])}")
    return DATASETS[name]


def _normalise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if train.ndim == 3:  # IDX files (MNIST, Fashion-MNIST) hold N x H x W: add the channel axis
        train, test = train[:, None], test[:, None]
    train_t = torch.from_numpy(train.astype(np.float32)).div_(255.0)
    test_t = torch.from_numpy(test.astype(np.float32)).div_(255.0)
    dims = (0, 2, 3)
    mean = train_t.mean(dim=dims, keepdim=True)
    std = train_t.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return (train_t - mean) / std, (test_t - mean) / std


_CACHE: dict[tuple, DatasetSplits] = {}


def load_dataset(name: str, root: str | os.PathLike = "data", download: bool = True, subset: str | None = None) -> DatasetSplits:
    """Load a registered dataset into memory (cached per process: it is read-only)."""
    key = (name, str(root), subset)
    if key not in _CACHE:
        loader = _dataset_loader(name, subset)
        train_x, train_y, test_x, test_y = loader(Path(root).expanduser(), download)
        train_t, test_t = _normalise(train_x, test_x)
        labels = np.concatenate([train_y, test_y]).astype(np.int64)
        _CACHE[key] = DatasetSplits(
            name=subset or name,
            train_x=train_t,
            train_y=torch.from_numpy(np.asarray(train_y, dtype=np.int64)),
            test_x=test_t,
            test_y=torch.from_numpy(np.asarray(test_y, dtype=np.int64)),
            num_classes=int(labels.max()) + 1,
        )
    return _CACHE[key]


def channel_stats(data_cfg) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) of the training split on the [0, 1] scale: the
    standardisation ``load_dataset`` applied, for encoding new images the same way."""
    train_x = _dataset_loader(data_cfg.name, data_cfg.get("subset"))(Path(data_cfg.root).expanduser(), data_cfg.download)[0]
    if train_x.ndim == 3:
        train_x = train_x[:, None]
    train_t = torch.from_numpy(np.ascontiguousarray(train_x)).float().div_(255.0)
    return train_t.mean(dim=(0, 2, 3)).tolist(), train_t.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()


def raw_arrays_from_config(data_cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The dataset's raw pixels (uint8, N x C x H x W) and labels: ``train_x, train_y, test_x, test_y``.

    Unlike :func:`dataset_from_config` nothing is standardised: ``graftfl prepare-sites``
    writes these pixels out as image files.
    """
    train_x, train_y, test_x, test_y = _dataset_loader(data_cfg.name, data_cfg.get("subset"))(Path(data_cfg.root).expanduser(), data_cfg.download)
    if train_x.ndim == 3:  # IDX files hold N x H x W
        train_x, test_x = train_x[:, None], test_x[:, None]
    train_y, test_y = (np.asarray(labels, dtype=np.int64).reshape(-1) for labels in (train_y, test_y))
    return np.ascontiguousarray(train_x), train_y, np.ascontiguousarray(test_x), test_y


def dataset_from_config(data_cfg) -> DatasetSplits:
    """Load the dataset described by a ``dataset`` config group."""
    return load_dataset(data_cfg.name, data_cfg.root, data_cfg.download, data_cfg.get("subset"))


# ------------------------------------------------------------ partitioning ---

PARTITIONERS = ("iid", "dirichlet", "shards")


def _make_partitioner(partition_cfg, num_partitions: int, seed: int):
    from flwr_datasets import partitioner as fp

    kind = partition_cfg.name
    if kind == "iid":
        return fp.IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        return fp.DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(partition_cfg.alpha),
            min_partition_size=int(partition_cfg.get("min_partition_size", 0)),
            seed=seed,
        )
    if kind == "shards":
        return fp.ShardPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_shards_per_partition=int(partition_cfg.shards_per_client),
            seed=seed,
        )
    raise ValueError(f"unknown partitioner '{kind}'; valid partitioners: {list(PARTITIONERS)}")


_PARTITIONS: dict[tuple, dict] = {}  # (labels digest, partition config, num_partitions, seed) -> {partition id: indices}
_PARTITIONERS: dict[tuple, object] = {}  # the same key -> the partitioner holding its table (at most _PARTITIONS_KEPT)
_PARTITIONS_KEPT = 4
_PARTITIONS_LOCK = threading.Lock()


def _partition_key(labels: torch.Tensor, partition_cfg, num_partitions: int, seed: int) -> tuple:
    """What a partitioning depends on: the labels' contents, the partition config, the count and the seed."""
    digest = hashlib.blake2b(labels.numpy().tobytes(), digest_size=16).hexdigest()
    settings = json.dumps({str(key): partition_cfg[key] for key in partition_cfg}, sort_keys=True, default=str)
    return digest, len(labels), settings, int(num_partitions), int(seed)


def partition_indices(labels: torch.Tensor, partition_cfg, num_partitions: int, partition_id: int, seed: int) -> np.ndarray:
    """Indices (into ``labels``) of partition ``partition_id`` of ``num_partitions``.

    ``partition.samples_per_client`` (when set) first draws that many samples per
    client from the whole set, as in the papers' 10 x 1,000 or 5 x 1,000 settings.
    The partitioning is deterministic, so it is computed once per process and kept
    (keyed by the labels' contents, the config, the count and the seed): a simulation
    worker that hosts many virtual clients does not repartition for every message.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions}) (num-partitions={num_partitions})")
    key = _partition_key(labels, partition_cfg, num_partitions, seed)
    with _PARTITIONS_LOCK:
        if key not in _PARTITIONERS:
            while len(_PARTITIONERS) >= _PARTITIONS_KEPT:
                oldest = next(iter(_PARTITIONERS))
                _PARTITIONERS.pop(oldest)
                _PARTITIONS.pop(oldest, None)
            _PARTITIONERS[key] = _partitioner_on(labels, partition_cfg, num_partitions, seed)
            _PARTITIONS[key] = {}
        found = _PARTITIONS[key]
        if partition_id not in found:
            found[partition_id] = np.asarray(_PARTITIONERS[key].load_partition(partition_id)["index"], dtype=np.int64)
        return found[partition_id].copy()


def _partitioner_on(labels: torch.Tensor, partition_cfg, num_partitions: int, seed: int):
    """A flwr-datasets partitioner over the (shuffled, optionally subsampled) sample indices."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))  # IidPartitioner shards contiguously: shuffle first
    per_client = partition_cfg.get("samples_per_client")
    if per_client:
        needed = int(per_client) * num_partitions
        if needed > len(order):
            raise ValueError(f"partition.samples_per_client={per_client} x {num_partitions} clients exceeds the {len(order)} training samples")
        order = order[:needed]
    table = Dataset.from_dict({"index": order, "label": labels.numpy()[order]})
    partitioner = _make_partitioner(partition_cfg, num_partitions, seed)
    partitioner.dataset = table
    return partitioner


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A deterministic DataLoader over in-memory tensors."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)
