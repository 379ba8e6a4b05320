"""Partitioning a dataset among sites: flwr-datasets partitioners over an in-memory index table.

No hub access: the partitioner sees a table of ``(index, label)`` rows built here, and
a site keeps only the indices of its own partition (:func:`partition_indices`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref

import numpy as np
import torch

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


_DIGESTS: dict[int, tuple] = {}  # id(labels) -> (weak reference, version counter, digest) of the last labels hashed


def _labels_digest(labels: torch.Tensor) -> str:
    """A digest of ``labels``' contents, hashed again only for another tensor or one changed in place since.

    Hashing 60,000 labels costs about a millisecond, which every message of every site would pay.
    """
    seen = _DIGESTS.get(id(labels))
    if seen is not None and seen[0]() is labels and seen[1] == labels._version:
        return seen[2]
    digest = hashlib.blake2b(labels.numpy().tobytes(), digest_size=16).hexdigest()
    _DIGESTS.clear()  # one dataset's labels at a time: ids of freed tensors are reused
    _DIGESTS[id(labels)] = (weakref.ref(labels), labels._version, digest)
    return digest


def _partition_key(labels: torch.Tensor, partition_cfg, num_partitions: int, seed: int) -> tuple:
    """What a partitioning depends on: the labels' contents, the partition config, the count and the seed."""
    digest = _labels_digest(labels)
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
