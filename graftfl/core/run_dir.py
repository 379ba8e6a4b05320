"""Where a run's files go: ``<output_dir>/<run_id>/``, and where this checkout is.

One home for the helpers that ``graftfl sim``, ``graftfl deploy-local`` and the
ServerApp all need, so the command that starts a run and the ServerApp that writes
it agree on the directory.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from omegaconf import DictConfig


def project_root() -> Path:
    """This graftfl checkout: the Flower app ``flwr run`` builds (pyproject.toml + graftfl + conf).

    Also what Ray workers need on ``PYTHONPATH`` to import this checkout's graftfl.
    """
    return Path(__file__).resolve().parents[2]


def new_run_id(cfg: DictConfig) -> str:
    """A fresh ``<time>-<protocol>-<dataset>-<4 hex>`` run id."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.protocol.name}-{cfg.dataset.name}-{uuid.uuid4().hex[:4]}"


def with_run_id(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``run_id`` filled in (resume keeps the resumed run's id and folder)."""
    cfg = cfg.copy()
    if cfg.resume:
        resumed = Path(cfg.resume)
        cfg.output_dir, cfg.run_id = str(resumed.parent), resumed.name
    elif not cfg.run_id:
        cfg.run_id = new_run_id(cfg)
    return cfg


def run_dir_of(cfg: DictConfig) -> Path:
    """``<output_dir>/<run_id>`` of a config that has its ``run_id`` (see :func:`with_run_id`)."""
    return Path(cfg.output_dir) / cfg.run_id
