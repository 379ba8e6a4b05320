import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from graftfl.core import data as data_module
from graftfl.core.data import DatasetUnavailable, load_dataset
from graftfl.core.partition import partition_indices


def partition_cfg(**values):
    return OmegaConf.create({"samples_per_client": None, **values})


def test_digits_loads_offline_with_a_fixed_split():
    digits = load_dataset("digits")
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert len(digits.train_y) + len(digits.test_y) == 1797
    assert abs(float(digits.train_x.mean())) < 1e-3  # standardised with the yaml's constants (computed once on this split)


@pytest.mark.parametrize("cfg", [partition_cfg(name="iid"), partition_cfg(name="dirichlet", alpha=0.3, min_partition_size=0), partition_cfg(name="shards", shards_per_client=2)])
def test_partitions_are_disjoint_and_cover_the_data(cfg):
    labels = load_dataset("digits").train_y
    parts = [partition_indices(labels, cfg, 4, pid, seed=1) for pid in range(4)]
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined))
    if cfg.name != "shards":  # shards may leave a remainder unassigned
        assert len(joined) == len(labels)
    assert parts[0].tolist() == partition_indices(labels, cfg, 4, 0, seed=1).tolist()  # reproducible


def test_dirichlet_skews_labels_more_than_iid():
    labels = load_dataset("digits").train_y

    def label_spread(cfg):
        shares = []
        for pid in range(4):
            counts = np.bincount(labels[partition_indices(labels, cfg, 4, pid, seed=0)].numpy(), minlength=10)
            shares.append(counts.max() / counts.sum())
        return np.mean(shares)

    assert label_spread(partition_cfg(name="dirichlet", alpha=0.1, min_partition_size=0)) > label_spread(partition_cfg(name="iid")) + 0.2


def test_samples_per_client_draws_that_many():
    labels = load_dataset("digits").train_y
    part = partition_indices(labels, partition_cfg(name="iid", samples_per_client=100), 3, 2, seed=0)
    assert len(part) == 100
    with pytest.raises(ValueError, match="exceeds"):
        partition_indices(labels, partition_cfg(name="iid", samples_per_client=1000), 3, 0, seed=0)


def test_partition_id_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        partition_indices(torch.zeros(10, dtype=torch.long), partition_cfg(name="iid"), 2, 2, seed=0)


def test_missing_dataset_offline_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setitem(data_module.DATASETS, "fashion_mnist", data_module._mnist_like("FashionMNIST", tmp_path / "no-debian"))
    with pytest.raises(DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", root=tmp_path, download=False)
    with pytest.raises(DatasetUnavailable, match="dataset.download"):
        load_dataset("mnist", root=tmp_path, download=False)


def test_failed_download_still_says_how_to_get_fashion_mnist(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    monkeypatch.setitem(data_module.DATASETS, "fashion_mnist", data_module._mnist_like("FashionMNIST", tmp_path / "no-debian"))
    with pytest.raises(DatasetUnavailable, match="apt-get install dataset-fashion-mnist") as error:
        load_dataset("fashion_mnist", root=tmp_path, download=True)
    assert "Error downloading" in str(error.value)


def test_idx_files_under_root_are_read(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write_idx(name, array):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        (raw / name).write_bytes(header + array.astype(np.uint8).tobytes())

    write_idx("train-images-idx3-ubyte", rng.integers(0, 255, (20, 28, 28)))
    write_idx("train-labels-idx1-ubyte", np.arange(20) % 10)
    write_idx("t10k-images-idx3-ubyte", rng.integers(0, 255, (5, 28, 28)))
    write_idx("t10k-labels-idx1-ubyte", np.arange(5))
    mnist = load_dataset("mnist", root=tmp_path, download=False)
    assert mnist.input_shape == (1, 28, 28) and len(mnist.train_y) == 20 and mnist.train_y[3] == 3


def test_unknown_dataset_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid datasets: .*fashion_mnist"):
        load_dataset("imagenet")
