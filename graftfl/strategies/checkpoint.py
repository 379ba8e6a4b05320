"""Checkpoints of the global state after each completed round (atomic writes), for :class:`~graftfl.strategies.utils.ServerRun`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from graftfl.core.weights_file import load_weights_file

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(run_dir: Path, round_number: int, model_state: dict[str, torch.Tensor], extra: dict[str, Any] | None = None) -> Path:
    """Write ``checkpoint.pt`` (round, model state, protocol extras) via a rename, so a crash never leaves half a file."""
    path = Path(run_dir) / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    torch.save({"round": round_number, "model": {k: v.detach().cpu() for k, v in model_state.items()}, "extra": extra or {}}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The last checkpoint of ``run_dir``, or None when the run has none yet.

    Loaded with PyTorch's weights-only unpickler: a run directory may come from
    elsewhere (``resume=``), and a full pickle would run any code it names.

    Raises
    ------
    UnsafeWeightsFile
        When the file holds anything but tensors and plain containers.
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    return load_weights_file(path)
