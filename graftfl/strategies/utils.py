"""Helpers shared by the server side of every protocol."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from omegaconf import DictConfig

from graftfl.config import to_container
from graftfl.core.data import DatasetSplits, dataset_from_config
from graftfl.core.meter import RunRecorder
from graftfl.core.models import StagedModel, model_from_config
from graftfl.core.train import evaluate, resolve_device, seed_everything
from graftfl.core.wire import CONFIG_KEY
from graftfl.strategies.checkpoint import load_checkpoint, save_checkpoint



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
        self.run_dir = Path(run_dir)
        self.resume_state = load_checkpoint(self.run_dir) if resume else None
        # Rows logged after the checkpoint (a crash between logging a round and checkpointing it) are dropped.
        resume_round = int(self.resume_state["round"]) if self.resume_state else 0
        self.recorder = RunRecorder(self.run_dir, resume=resume, resume_round=resume_round)
        self.device = resolve_device(cfg.device)
        self._data: DatasetSplits | None = None
        self._round_started = time.monotonic()

    @property
    def data(self) -> DatasetSplits:
        """The dataset of the run, loaded on first use."""
        if self._data is None:
            self._data = dataset_from_config(self.cfg.dataset)
        return self._data

    @property
    def first_round(self) -> int:
        """1 for a new run; the round after the checkpoint for a resumed one."""
        return int(self.resume_state["round"]) + 1 if self.resume_state else 1

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The server's test set, subsampled reproducibly to ``dataset.test_size`` when set."""
        x, y = self.data.test_x, self.data.test_y
        size = self.cfg.dataset.get("test_size")
        if size:
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.cfg.seed))[: int(size)]
            x, y = x[order], y[order]
        return x, y

    def new_model(self) -> StagedModel:
        """The global model, initialised from ``cfg.seed`` (or from the checkpoint when resuming)."""
        seed_everything(self.cfg.seed, self.cfg.deterministic)
        model = model_from_config(self.cfg, self.data.input_shape, self.data.num_classes)
        if self.resume_state:
            model.load_state_dict(self.resume_state["model"])
        return model

    def evaluate(self, model: torch.nn.Module) -> dict:
        """Accuracy and loss of ``model`` on the server's test set."""
        x, y = self.test_set()
        return evaluate(model, x, y, device=self.device, batch_size=self.cfg.eval.batch_size, num_classes=self.data.num_classes)

    def config_record(self, **extra) -> ConfigRecord:
        """The resolved config as JSON plus protocol fields, for a message's ConfigRecord."""
        return ConfigRecord({CONFIG_KEY: json.dumps(to_container(self.cfg)), **extra})

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


def message_nbytes(message_or_recorddict: Message | RecordDict) -> int:
    """Bytes of a Flower message (or of its content alone) as flwr sends it: graftfl's one definition of traffic.

    flwr 1.41 moves a message as a tree of objects (the message with its metadata, the
    RecordDict, every record, array and array chunk), each serialized with
    ``deflate()`` and pushed once per message (identical objects only once). This is the
    sum of those serialized objects: payload, config and metrics records, protobuf framing
    and metadata included; the transport's own framing (HTTP/gRPC headers, TLS) is not.
    """
    objects = get_all_nested_objects(message_or_recorddict)
    return int(sum(len(obj.deflate()) for obj in objects.values()))


def arrays_nbytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord (what a dense model upload or download costs)."""
    return int(sum(array.numpy().nbytes for array in record.values()))
