"""Dataset registry: raw public arrays and their standardization (partitioning: :mod:`graftfl.core.partition`).

A registry dataset is read once per process as its raw public arrays (uint8 pixels and
labels, read-only: the public file on disk). Nothing here standardizes a whole training set
for a site: a site takes its own partition's raw rows (indices computed with flwr-datasets
partitioners over an in-memory label table, no hub access) and standardizes only those
(:mod:`graftfl.core.normalization`). A named dataset that is missing is an error that says
how to get it, never a silent substitute.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from graftfl.core.normalization import PUBLISHED, Statistics, checked_statistics, fixed_statistics, standardized

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DatasetUnavailable(RuntimeError):
    """A named dataset is not on disk and cannot be downloaded."""


@dataclass(frozen=True)
class RawDataset:
    """A registry dataset as published: uint8 pixels (N x C x H x W, read-only numpy) and int64 labels."""

    name: str
    train_x: np.ndarray
    train_y: torch.Tensor
    test_x: np.ndarray
    test_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample (without the batch dimension)."""
        return tuple(int(d) for d in self.train_x.shape[1:])


@dataclass
class DatasetSplits:
    """A dataset in memory: standardized images and integer labels."""

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


_CACHE: dict[tuple, RawDataset] = {}


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.setflags(write=False)
    return array


def load_raw(name: str, root: str | os.PathLike = "data", download: bool = True, subset: str | None = None) -> RawDataset:
    """The registry dataset's raw public arrays (cached per process: read-only, never standardized)."""
    key = (name, str(root), subset)
    if key not in _CACHE:
        train_x, train_y, test_x, test_y = _dataset_loader(name, subset)(Path(root).expanduser(), download)
        if train_x.ndim == 3:  # IDX files (MNIST, Fashion-MNIST) hold N x H x W: add the channel axis
            train_x, test_x = train_x[:, None], test_x[:, None]
        train_y, test_y = (np.asarray(labels, dtype=np.int64).reshape(-1) for labels in (train_y, test_y))
        _CACHE[key] = RawDataset(
            name=subset or name,
            train_x=_read_only(train_x),
            train_y=torch.from_numpy(train_y),
            test_x=_read_only(test_x),
            test_y=torch.from_numpy(test_y),
            num_classes=int(np.concatenate([train_y, test_y]).max()) + 1,
        )
    return _CACHE[key]


def raw_from_config(data_cfg) -> RawDataset:
    """:func:`load_raw` for a ``dataset`` config group."""
    return load_raw(data_cfg.name, data_cfg.root, data_cfg.download, data_cfg.get("subset"))


def standardized_splits(raw: RawDataset, statistics: Statistics | None) -> DatasetSplits:
    """The whole dataset standardized with ``statistics`` (None: [0, 1] scale).

    For code that stands for every holder at once (the server's test set, the centralized
    baseline, benchmarks), never for one site: a site standardizes only its own rows.
    """
    return DatasetSplits(
        name=raw.name,
        train_x=standardized(raw.train_x, statistics),
        train_y=raw.train_y,
        test_x=standardized(raw.test_x, statistics),
        test_y=raw.test_y,
        num_classes=raw.num_classes,
    )


def load_dataset(name: str, root: str | os.PathLike = "data", download: bool = True, subset: str | None = None,
                 statistics: Statistics | None = None) -> DatasetSplits:
    """A registered dataset standardized with ``statistics``, by default its published figures
    (:data:`graftfl.core.normalization.PUBLISHED`, the same numbers as ``conf/dataset/<name>.yaml``)."""
    raw = load_raw(name, root, download, subset)
    if statistics is None and name in PUBLISHED:
        statistics = checked_statistics(*PUBLISHED[name], raw.input_shape[0], f"published statistics of '{name}'")
    return standardized_splits(raw, statistics)


def channel_stats(data_cfg) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) on the [0, 1] scale that ``dataset.normalization=fixed`` standardizes with
    (unit scale when ``dataset.mean`` / ``std`` are null). Federated ones: ``site_data.standardization_of``."""
    channels = raw_from_config(data_cfg).input_shape[0]
    statistics = fixed_statistics(data_cfg, channels)
    return statistics if statistics is not None else ([0.0] * channels, [1.0] * channels)


def raw_arrays_from_config(data_cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw uint8 pixels (N x C x H x W) and labels ``train_x, train_y, test_x, test_y`` (``prepare-sites`` writes them out)."""
    raw = raw_from_config(data_cfg)
    return raw.train_x, raw.train_y.numpy(), raw.test_x, raw.test_y.numpy()


def dataset_from_config(data_cfg, statistics: Statistics | None = None) -> DatasetSplits:
    """The ``dataset`` config group's dataset standardized whole (not for a site: :func:`standardized_splits`) with
    ``statistics``, else the fixed ``dataset.mean`` / ``std``; ``normalization=federated`` must pass the phase's."""
    raw = raw_from_config(data_cfg)
    if statistics is None:
        if str(data_cfg.get("normalization") or "fixed") == "federated":
            raise ValueError("dataset.normalization=federated: the statistics come from the normalize phase; pass them")
        statistics = fixed_statistics(data_cfg, raw.input_shape[0])
    return standardized_splits(raw, statistics)


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A deterministic DataLoader over in-memory tensors that takes each batch with one gather.

    The same batches in the same order as :func:`per_row_loader` (the same sampler, drawing
    from a generator the loader also seeds its iterator from), without indexing and stacking
    the rows one by one: one kernel per batch instead of one per row, which matters on a GPU,
    where ``x`` and ``y`` may already live.
    """
    generator = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(x, y)
    rows = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(dataset, sampler=BatchSampler(rows, batch_size, drop_last=False), batch_size=None, generator=generator)


def per_row_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A deterministic DataLoader over in-memory tensors that collates row by row: what Opacus's
    Poisson sampler needs (it keeps the loader's dataset and collate function, and draws its own rows)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)
