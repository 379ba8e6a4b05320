"""Helpers shared by the server side of every protocol."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from omegaconf import DictConfig

from graftfl.audit.record import AuditRecorder
from graftfl.config import is_site_dataset, normalization_of, to_container
from graftfl.core.data import DatasetSplits, RawDataset, raw_from_config, standardized_splits
from graftfl.core.normalization import Statistics, checked_statistics, fixed_statistics, standardized
from graftfl.core.meter import RunRecorder
from graftfl.core.sitedata import SiteDeclaration
from graftfl.core.split import test_selection
from graftfl.core.models import StagedModel, check_accepts, model_from_config
from graftfl.core.train import evaluate, resolve_device, seed_everything
from graftfl.core.wire import CONFIG_KEY
from graftfl.strategies.checkpoint import load_checkpoint, save_checkpoint
from graftfl.strategies.replies import claimed_partition, metrics_problem
from graftfl.strategies.wire_bytes import message_nbytes


def require_choice(name: str, value, choices) -> None:
    """Raise ``ValueError`` naming the valid values when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got '{value}'")


class ServerRun:
    """What a protocol's server side needs for one run.

    Parameters
    ----------
    cfg : DictConfig
        The resolved config (the server is its source of truth).
    run_dir : Path
        ``runs/<run-id>``.
    resume : bool
        Continue from ``checkpoint.pt`` and the existing ``metrics.jsonl``.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, resume: bool = False):
        self.cfg = cfg
        self._config_text: str | None = None  # config_record's JSON
        self.run_dir = Path(run_dir)
        self.resume_state = load_checkpoint(self.run_dir) if resume else None
        # Rows logged after the checkpoint (a crash between logging a round and checkpointing it) are dropped.
        resume_round = int(self.resume_state["round"]) if self.resume_state else 0
        self.recorder = RunRecorder(self.run_dir, resume=resume, resume_round=resume_round)
        self.audit = AuditRecorder.from_config(cfg, self.run_dir)  # audit.record: what the server receives
        self.device = resolve_device(cfg.device)
        self._raw: RawDataset | None = None
        self._data: DatasetSplits | None = None
        self._federated_statistics: Statistics | None = None
        self._site_partitions: dict[int, int] | None = None  # the roster phase's {node: partition}
        self._round_started = time.monotonic()

    @property
    def site_data(self) -> bool:
        """``dataset=site``: the data lives at the sites only; the server opens none of it."""
        return is_site_dataset(self.cfg)

    @property
    def raw(self) -> RawDataset:
        """The registry dataset's raw public arrays (shapes, classes, counts). Never loaded for ``dataset=site``."""
        if self.site_data:
            raise RuntimeError("dataset=site: the server never opens site data (a code path asked the server for a dataset; "
                               "use ServerRun.input_shape / num_classes and evaluate at the sites)")
        if self._raw is None:
            self._raw = raw_from_config(self.cfg.dataset)
        return self._raw

    @property
    def data(self) -> DatasetSplits:
        """The registry dataset standardized whole with :meth:`statistics`, for what stands for every holder at
        once (the centralized baseline, the features protocol's public rows). Never a site's data."""
        if self._data is None:
            self._data = standardized_splits(self.raw, self.statistics())
        return self._data

    def statistics(self) -> Statistics | None:
        """The registry dataset's standardization: ``fixed`` (``dataset.mean`` / ``std``) or the normalize phase's."""
        if normalization_of(self.cfg) == "federated":
            if self._federated_statistics is None:
                raise RuntimeError("dataset.normalization=federated: the normalize phase has not run yet, the server has no statistics")
            return self._federated_statistics
        return fixed_statistics(self.cfg.dataset, self.raw.input_shape[0])

    def install_statistics(self, mean: list[float], std: list[float]) -> None:
        """Keep the normalize phase's result: the server's test set is standardized as the sites' rows are."""
        channels = len(mean) if self.site_data else self.raw.input_shape[0]
        self._federated_statistics = checked_statistics(mean, std, channels, "the normalize phase's result")
        self._data = None

    def install_site_partitions(self, partitions: dict[int, int]) -> None:
        """Keep the roster phase's result: each placed site's partition id."""
        self._site_partitions = dict(partitions)

    def in_site_order(self, nodes: list[int]) -> list[int]:
        """``nodes`` in the roster's partition order (sites without a place after, by node id); by node id without a roster."""
        placed = self._site_partitions or {}
        return sorted(nodes, key=lambda node: (node not in placed, placed.get(node, 0), node))

    def site_key(self, node: int) -> int:
        """A number for ``node`` in what a seeded choice per site draws from: its roster partition, else its node id (mod 100,003)."""
        placed = self._site_partitions or {}
        return placed[node] if node in placed else node % 100_003

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The model's input shape: the declaration's for ``dataset=site``, else the registry dataset's."""
        if self.site_data:
            return SiteDeclaration.from_config(self.cfg.dataset).input_shape
        return self.raw.input_shape

    @property
    def num_classes(self) -> int:
        """The number of classes: the declaration's for ``dataset=site``, else the registry dataset's."""
        if self.site_data:
            return SiteDeclaration.from_config(self.cfg.dataset).num_classes
        return self.raw.num_classes

    def max_site_rows(self) -> int:
        """The most training rows one site can have (a bound on what a split turn may stream)."""
        if self.site_data:
            return int(self.cfg.dataset.get("max_site_rows") or 100_000)
        return len(self.raw.train_y)

    def max_eval_rows(self) -> int:
        """The most rows one evaluation may score (a bound on an evaluation turn's frames)."""
        if self.site_data:
            return self.max_site_rows()
        return len(self.test_set()[1])

    @property
    def first_round(self) -> int:
        """1 for a new run; the round after the checkpoint for a resumed one."""
        return int(self.resume_state["round"]) + 1 if self.resume_state else 1

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The server's test set, subsampled reproducibly to ``dataset.test_size`` when set, standardized
        with the sites' statistics (:meth:`statistics`)."""
        x, y = self.raw.test_x, self.raw.test_y
        order = test_selection(len(y), self.cfg.dataset.get("test_size"), self.cfg.seed)
        if order is not None:
            x, y = x[order.numpy()], y[order]
        return standardized(x, self.statistics()), y

    def new_model(self) -> StagedModel:
        """The global model, initialised from ``cfg.seed`` (or from the checkpoint when resuming)."""
        seed_everything(self.cfg.seed, self.cfg.deterministic)
        model = model_from_config(self.cfg, self.input_shape, self.num_classes)
        check_accepts(model, self.input_shape, str(self.cfg.model.name))
        if self.resume_state:
            model.load_state_dict(self.resume_state["model"])
        return model

    def evaluate(self, model: torch.nn.Module) -> dict:
        """Accuracy and loss of ``model`` on the server's test set."""
        x, y = self.test_set()
        return evaluate(model, x, y, device=self.device, batch_size=self.cfg.eval.batch_size, num_classes=self.num_classes)

    def config_record(self, **extra) -> ConfigRecord:
        """The resolved config as JSON plus protocol fields, for a message's ConfigRecord.

        The JSON is made on the first call and kept (1.5 ms for every one of a round's messages
        otherwise): a run's config does not change once the server runs it.
        """
        if self._config_text is None:
            self._config_text = json.dumps(to_container(self.cfg))
        return ConfigRecord({CONFIG_KEY: self._config_text, **extra})

    def round_seconds(self) -> float:
        """Wall seconds since the previous call (the round's duration)."""
        now = time.monotonic()
        elapsed, self._round_started = now - self._round_started, now
        return elapsed

    def checkpoint(self, round_number: int, model: torch.nn.Module, extra: dict | None = None) -> None:
        """Save a checkpoint of ``model`` after ``round_number`` (``extra`` goes with it, e.g. to resume)."""
        save_checkpoint(self.run_dir, round_number, model.state_dict(), extra)


def wait_for_nodes(grid, count: int, timeout_s: float) -> list[int]:
    """Node ids once ``count`` SuperNodes are connected (they appear gradually in deployment)."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {count} SuperNodes connected within {timeout_s:.0f} s")
        time.sleep(0.5)


def in_partition_order(replies: Iterable[Message]) -> list[Message]:
    """``replies`` sorted by the partition id each claims, then by node id.

    Replies come in the order the sites finished (on Ray and in deployment), and an average
    depends on the order of its float sum: what a seeded run aggregates must not.
    """
    return sorted(replies, key=lambda reply: (claimed_partition(dict(reply.content.get("metrics", {}))), reply.metadata.src_node_id))


def site_scores(replies: list[Message]) -> tuple[list[dict], list[str]]:
    """The metrics of the sites' ``evaluate`` replies that can be pooled, and why the others cannot.

    A reply is untrusted: an error, a missing metrics record, or a count that is not a whole
    number >= 0 (a NaN ``num-examples`` stopped the server) leaves that site out.
    """
    scores, failures = [], []
    for reply in replies:
        problem = reply.error.reason if reply.has_error() else metrics_problem(reply.content, counts=("num-examples", "correct", "partition-id"))
        if problem is None:
            scores.append(dict(reply.content["metrics"]))
        else:
            failures.append(f"node {reply.metadata.src_node_id}: {problem}")
    return scores, failures


def site_evaluation_row(replies, failures: list[str] | None = None) -> dict:
    """Pool the sites' held-out counts (weighted by count) and keep the per-site figures.

    ``replies``: the metrics of each site's ``evaluate`` reply (``num-examples``,
    ``correct``, ``loss_sum``, ``partition-id``). Values are bounded before they are
    pooled: a site cannot claim more correct answers than rows, or a negative loss.
    Returns ``accuracy`` and ``loss`` (None when no site scored a row) and the
    ``metrics.jsonl`` columns ``eval_clients``, ``eval_client_accuracy``,
    ``eval_client_loss``, ``eval_client_count``, ``eval_where``, ``eval_failures``.
    """
    sites = []
    for metrics in replies:
        count = max(int(metrics.get("num-examples", 0)), 0)
        correct = min(max(int(metrics.get("correct", 0)), 0), count)
        loss_sum = float(metrics.get("loss_sum", 0.0))
        if not (loss_sum == loss_sum and 0 <= loss_sum < float("inf")):
            continue
        sites.append({"partition-id": int(metrics.get("partition-id", -1)), "count": count, "correct": correct, "loss_sum": loss_sum})
    sites.sort(key=lambda s: s["partition-id"])
    total = sum(s["count"] for s in sites)
    return {
        "accuracy": sum(s["correct"] for s in sites) / total if total else None,
        "loss": sum(s["loss_sum"] for s in sites) / total if total else None,
        "eval_clients": [s["partition-id"] for s in sites],
        "eval_client_accuracy": [s["correct"] / s["count"] if s["count"] else None for s in sites],
        "eval_client_loss": [s["loss_sum"] / s["count"] if s["count"] else None for s in sites],
        "eval_client_count": [s["count"] for s in sites],
        "eval_where": "site",
        "eval_failures": list(failures or []),
    }


def evaluate_at_sites(grid, run: ServerRun, nodes: list[int], model: torch.nn.Module, protocol: str, server_round: int) -> dict:
    """``eval.where=site``: send ``model`` to every site as ``evaluate.<protocol>``; pool their held-out counts.

    Returns :func:`site_evaluation_row`'s fields plus ``bytes_up`` / ``bytes_down`` of the exchange.
    """
    arrays = ArrayRecord(model.state_dict())
    messages = [
        Message(RecordDict({"config": run.config_record(**{"server-round": server_round}), "arrays": arrays}), dst_node_id=node,
                message_type=f"evaluate.{protocol}")
        for node in nodes
    ]
    bytes_down = sum(message_nbytes(message) for message in messages)
    replies = list(grid.send_and_receive(messages, timeout=run.cfg.timeout_s))
    scores, failures = site_scores(replies)
    if len(replies) < len(nodes):
        failures.append(f"{len(nodes) - len(replies)} site(s) did not reply within timeout_s")
    evaluation = site_evaluation_row(scores, failures)
    evaluation["eval_bytes_up"] = sum(message_nbytes(reply) for reply in replies)
    evaluation["eval_bytes_down"] = bytes_down
    return evaluation
