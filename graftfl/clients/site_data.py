"""The one site loader: what every protocol's client trains and evaluates on.

``dataset=site``: the site's own files, named by its SuperNode's node-config ``data-path``
(:mod:`graftfl.core.sitedata`), with the rows a ``dedup`` phase dropped removed and the
images standardized as ``dataset.normalization`` says (``federated``: the statistics the
``normalize`` phase left in ``context.state``; ``fixed``: ``dataset.mean`` / ``dataset.std``).
Its held-out rows (manifest ``split=test``, else ``eval.site_fraction`` by patient) never train.

A registry dataset (``dataset=digits`` ...): this site's partition, read from node-config
``data-root`` when the SuperNode names one (else the run's ``dataset.root``), with a seeded
``eval.site_fraction`` held out when the run evaluates at the sites. The site keeps only its own
rows: their raw pixels are copied out of the public arrays and standardized by the same rule as
site data (``fixed``: ``dataset.mean`` / ``dataset.std``, the published figures; ``federated``:
the normalize phase over the sites' own training rows), never with the whole training set's.

Simulation cannot give each virtual SuperNode its own node config (flwr 1.41's
``run_simulation`` sets only ``partition-id`` / ``num-partitions``), so ``graftfl sim
--data-dir sites/`` sets ``GRAFTFL_DATA_DIR`` instead: a site without ``data-path`` reads
``$GRAFTFL_DATA_DIR/site-<partition-id>``. A ``data-path`` in the node config always wins.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from flwr.app import Context
from omegaconf import DictConfig

from graftfl.config import eval_where, is_site_dataset, normalization_of
from graftfl.core.data import RawDataset, raw_from_config
from graftfl.core.frozen_config import FrozenConfig
from graftfl.core.partition import partition_indices
from graftfl.core.normalization import Statistics, fixed_statistics, standardized, to_unit
from graftfl.core.site_stats import standardize
from graftfl.core.split import test_selection
from graftfl.core.sitedata import (
    DATA_PATH_KEY,
    SiteData,
    SiteDataError,
    site_data_from_config,
)
from graftfl.core.wire import NODE_DATA_ROOT, NODE_NUM_PARTITIONS, NODE_PARTITION_ID
from graftfl.protocols import phase_state_key

DATA_DIR_ENV = "GRAFTFL_DATA_DIR"
DEDUP_PHASE, NORMALIZE_PHASE = "dedup", "normalize"
DROPPED_ROWS = "dropped-rows"  # the dedup phase's record (BRANCHES2 convention)
MEAN, STD = "mean", "std"  # the normalize phase's record: JSON lists, one value per channel


class NormalizationMissing(RuntimeError):
    """``dataset.normalization=federated`` but this site holds no statistics from the normalize phase."""


def site_label(context: Context) -> str:
    """How errors name this site: ``site-<partition-id>`` (the folder name ``prepare-sites`` writes)."""
    return f"site-{context.node_config.get(NODE_PARTITION_ID, '?')}"


def data_path_of(context: Context) -> str | None:
    """Node-config ``data-path``; else ``$GRAFTFL_DATA_DIR/site-<partition-id>`` (simulation's ``--data-dir``)."""
    path = context.node_config.get(DATA_PATH_KEY)
    if path not in (None, ""):
        return str(path)
    root = os.environ.get(DATA_DIR_ENV)
    if root and NODE_PARTITION_ID in context.node_config:
        return str(Path(root) / f"site-{int(context.node_config[NODE_PARTITION_ID])}")
    return None


def load_raw_site(cfg: DictConfig, context: Context) -> SiteData:
    """This site's rows in load order, checked against the declaration, dedup drops applied, not standardized."""
    node_config = {**dict(context.node_config), DATA_PATH_KEY: data_path_of(context)}
    data = site_data_from_config(node_config, cfg.dataset, site_label(context), float(cfg.eval.site_fraction), int(cfg.seed))
    if len(data) == 0:
        raise SiteDataError(f"site {site_label(context)}: {DATA_PATH_KEY}={node_config[DATA_PATH_KEY]} holds no images")
    record = context.state.get(phase_state_key(DEDUP_PHASE))
    if record is not None and DROPPED_ROWS in record:
        dropped = [int(row) for row in json.loads(str(record[DROPPED_ROWS]))]
        keep = torch.ones(len(data), dtype=torch.bool)
        if any(not 0 <= row < len(data) for row in dropped):
            raise SiteDataError(f"site {site_label(context)}: the dedup phase dropped rows outside the site's {len(data)} rows")
        keep[dropped] = False
        data = data.keep(keep)
    if not bool((~data.test_mask).any()):
        raise SiteDataError(f"site {site_label(context)}: {DATA_PATH_KEY}={node_config[DATA_PATH_KEY]} has no training rows "
                            f"(all {len(data)} are held out)")
    return data


def standardization_of(cfg: DictConfig, context: Context) -> Statistics | None:
    """``(mean, std)`` per channel this site standardizes with, or None (images stay in [0, 1]).

    ``federated``: what the normalize phase installed at this site; ``fixed``: ``dataset.mean`` /
    ``dataset.std`` (for a registry dataset checked against its channels; one value: every channel).
    """
    if normalization_of(cfg) == "federated":
        record = context.state.get(phase_state_key(NORMALIZE_PHASE))
        if record is None or MEAN not in record:
            raise NormalizationMissing(f"site {site_label(context)}: dataset.normalization=federated but this site has no statistics "
                                       "from the normalize phase (the server runs it before the first round)")
        return json.loads(str(record[MEAN])), json.loads(str(record[STD]))
    if not is_site_dataset(cfg):
        return fixed_statistics(cfg.dataset, site_channels(cfg, context))
    mean, std = cfg.dataset.get("mean"), cfg.dataset.get("std")
    if mean is None or std is None:
        return None
    return [float(v) for v in mean], [float(v) for v in std]


def registry_raw(cfg: DictConfig, context: Context) -> RawDataset:
    """The registry dataset's raw public arrays as this site reads them: node-config ``data-root`` wins over ``dataset.root``."""
    data_cfg = cfg.dataset
    if NODE_DATA_ROOT in context.node_config:
        data_cfg = FrozenConfig({**dict(data_cfg), "root": str(context.node_config[NODE_DATA_ROOT])})
    return raw_from_config(data_cfg)


def site_channels(cfg: DictConfig, context: Context) -> int:
    """Channels of this site's images: the declaration's for ``dataset=site``, else the registry dataset's."""
    if is_site_dataset(cfg):
        return int(cfg.dataset.input_shape[0])
    return registry_raw(cfg, context).input_shape[0]


def registry_test_set(cfg: DictConfig, context: Context, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The registry dataset's public test split, standardized as this site standardizes its own rows.

    ``size``: only the server's seeded selection of that many rows, and only those rows
    are standardized: the whole
    split is 10,000 images, which cost a DSSGD site 19 ms per message to keep 100 of them.
    (:func:`graftfl.core.split.test_selection`, the server's draw.)
    """
    raw = registry_raw(cfg, context)
    x, y = raw.test_x, raw.test_y
    order = test_selection(len(y), size, int(cfg.seed))
    if order is not None:
        x, y = x[order.numpy()], y[order]
    return standardized(x, standardization_of(cfg, context)), y


def _partition_of(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config[NODE_PARTITION_ID]), int(context.node_config[NODE_NUM_PARTITIONS])
    except KeyError as err:
        raise ValueError("node config needs partition-id and num-partitions (flower-supernode --node-config)") from err


def hold_out(cfg: DictConfig, x: torch.Tensor, y: torch.Tensor, partition_id: int):
    """A registry partition's seeded ``eval.site_fraction`` held out: ``(train_x, train_y, held_x, held_y)``."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(int(cfg.seed) * 7_919 + 17 + partition_id))
    held = max(1, round(len(y) * float(cfg.eval.site_fraction)))
    if held >= len(y):
        raise ValueError(f"eval.site_fraction={cfg.eval.site_fraction} leaves no training rows of this site's {len(y)}")
    held_rows, train_rows = order[:held].sort().values, order[held:].sort().values
    return x[train_rows], y[train_rows], x[held_rows], y[held_rows]


def registry_partition(cfg: DictConfig, context: Context):
    """This site's own rows of a registry dataset, raw (uint8): ``(train_x, train_y, held_x, held_y)``.

    Only the partition's rows are copied out of the public arrays; ``held_x`` / ``held_y`` are None
    when the run evaluates at the server (``eval.where=server``): then the whole partition trains.
    """
    raw = registry_raw(cfg, context)
    partition_id, num_partitions = _partition_of(context)
    indices = partition_indices(raw.train_y, cfg.partition, num_partitions, partition_id, cfg.seed)
    x, y = torch.from_numpy(raw.train_x[indices]), raw.train_y[torch.from_numpy(indices)]
    if eval_where(cfg) != "site":
        return x, y, None, None
    return hold_out(cfg, x, y, partition_id)


def site_rows(cfg: DictConfig, context: Context):
    """``(train_x, train_y, held_x, held_y)`` of this site, standardized, for every protocol.

    ``held_x`` / ``held_y`` are None for a registry dataset evaluated at the server
    (``eval.where=server``): then the whole partition trains.
    """
    if is_site_dataset(cfg):
        data = load_raw_site(cfg, context)
        stats = standardization_of(cfg, context)
        x = standardize(data.x, *stats) if stats is not None else data.x
        keep = ~data.test_mask
        return x[keep], data.y[keep], x[data.test_mask], data.y[data.test_mask]
    train_x, train_y, held_x, held_y = registry_partition(cfg, context)
    stats = standardization_of(cfg, context)
    held = standardized(held_x, stats) if held_x is not None else None
    return standardized(train_x, stats), train_y, held, held_y


def training_pixels(cfg: DictConfig, context: Context) -> torch.Tensor:
    """This site's training images on the [0, 1] scale, not standardized (what the normalize phase's moments sum)."""
    if is_site_dataset(cfg):
        data = load_raw_site(cfg, context)
        return data.x[~data.test_mask]
    return to_unit(registry_partition(cfg, context)[0])


def site_num_classes(cfg: DictConfig, context: Context) -> int:
    """The number of classes: the declaration's for ``dataset=site``, else the registry dataset's (read at ``data-root``)."""
    if is_site_dataset(cfg):
        return int(cfg.dataset.num_classes)
    return registry_raw(cfg, context).num_classes


def held_out_metrics(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DictConfig, device: torch.device) -> dict:
    """Counts of ``model`` on this site's held-out rows: ``num-examples``, ``correct``, ``loss_sum``, ``accuracy``, ``loss``.

    Only these aggregates leave the site (the server pools them weighted by count).
    """
    from graftfl.core.train import evaluate

    count = len(y)
    if count == 0:
        return {"num-examples": 0, "correct": 0, "loss_sum": 0.0, "accuracy": 0.0, "loss": 0.0}
    result = evaluate(model, x, y, device=device, batch_size=int(cfg.eval.batch_size))
    correct = round(result["accuracy"] * count)
    return {"num-examples": count, "correct": correct, "loss_sum": float(result["loss"]) * count,
            "accuracy": float(result["accuracy"]), "loss": float(result["loss"])}
