"""The site's defences in a split turn (issue 14): the ``defence`` block and ``privacy=dpsgd``.

:func:`site_defences` gives a role what it applies to the tensors it releases
(:class:`graftfl.core.defences.SiteDefences`); :class:`PrivateTurn` runs a training turn
under DP-SGD (:class:`graftfl.core.split_private.PrivateRole`): Poisson batches, the
accountant history kept in this site's ``context.state`` across turns (never in the relayed
weights: each site's ε covers its own records), and the cumulative ``epsilon`` in the
turn's metrics.
"""

from __future__ import annotations

import logging
import os

import torch
from flwr.app import ConfigRecord, Context

from graftfl.core.defences import DefenceConfig, SiteDefences
from graftfl.core.privacy import DpSgdConfig, dpsgd_config_from, history_from_json, history_to_json
from graftfl.core.split_private import PrivateRole, audit_sampling_generator, noise_generator

logger = logging.getLogger(__name__)

PRIVACY_STATE_KEY = "split-privacy"
# Evaluation runs only: a seed for the Poisson batches, set by the site's operator (never by the server's config)
# so that ``graftfl audit`` (given the same seed in its environment) can tell which records each recorded frame holds.
AUDIT_SAMPLING_NODE_CONFIG = "audit-sampling-seed"
AUDIT_SAMPLING_ENV = "GRAFTFL_AUDIT_SAMPLING_SEED"


def audit_sampling_seed(node_config) -> int | None:
    """The site's audit sampling seed (node config, else the environment), or None: batches from the OS CSPRNG."""
    value = node_config.get(AUDIT_SAMPLING_NODE_CONFIG, os.environ.get(AUDIT_SAMPLING_ENV, ""))
    if str(value).strip() == "":
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{AUDIT_SAMPLING_NODE_CONFIG} / {AUDIT_SAMPLING_ENV} must be a whole number, got {value!r}") from None


def site_defences(cfg, num_classes: int) -> SiteDefences:
    """The run's ``defence`` block for a role (noise and flips from the OS CSPRNG)."""
    return SiteDefences(DefenceConfig.from_config(cfg), num_classes)


def split_dpsgd_config(cfg, steps_per_turn: int, sample_rate: float) -> DpSgdConfig | None:
    """``privacy=dpsgd`` for a split site, or None; a target ε is spread over ``rounds`` turns of ``steps_per_turn`` steps."""
    return dpsgd_config_from(cfg.privacy, planned_epochs=int(cfg.rounds) * int(steps_per_turn) * float(sample_rate))


class PrivateTurn:
    """DP-SGD for one training turn of a split site, or nothing when ``privacy`` is not ``dpsgd``.

    Parameters
    ----------
    cfg : DictConfig
        The run config.
    context : Context
        The site's Flower context (the accountant history lives in its ``state``).
    role : object
        The client role, already restored for this turn.
    num_samples : int
        The site's training records.
    steps : int
        Optimizer steps of this turn (as many Poisson batches are drawn).
    partition_id : int
        This site's partition (with an audit sampling seed, part of its batches' seed).
    turn : int
        This site's count of its completed turns, this one included (with an audit sampling
        seed, part of its batches' seed): a failed turn keeps no state, so its retry draws the
        same batches, as if it had not happened.
    """

    def __init__(self, cfg, context: Context, role, num_samples: int, steps: int, partition_id: int, turn: int):
        self.context, self.private = context, None
        sample_rate = min(1.0, int(cfg.train.batch_size) / max(int(num_samples), 1))
        config = split_dpsgd_config(cfg, steps, sample_rate)
        if config is None:
            return
        state = context.state.get(PRIVACY_STATE_KEY)
        history = history_from_json(state.get("history") if state is not None else None)
        device = next(role.bottom.parameters()).device
        self.private = PrivateRole(role, config, num_samples, int(cfg.train.batch_size), history, noise_generator=noise_generator(device),
                                   sampling_generator=self._audit_sampling(context, partition_id, int(turn)))

    def _audit_sampling(self, context: Context, partition_id: int, turn: int) -> torch.Generator | None:
        seed = audit_sampling_seed(context.node_config)
        if seed is None:
            return None  # the OS CSPRNG
        logger.warning("privacy=dpsgd with an audit sampling seed (%s): this site's Poisson batches can be replayed by whoever "
                       "holds the seed, and its epsilon does not hold against them; for evaluation runs only", AUDIT_SAMPLING_NODE_CONFIG)
        return audit_sampling_generator(seed, partition_id, turn)

    def batches(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Under DP-SGD as many Poisson batches as ``batches`` (fresh draws); otherwise ``batches`` unchanged."""
        return batches if self.private is None else [self.private.poisson_batch() for _ in batches]

    def skip(self, indices: torch.Tensor) -> bool:
        """True when ``indices`` is an empty Poisson batch: its noisy step has been taken, nothing is exchanged."""
        if self.private is None or len(indices):
            return False
        self.private.empty_step()
        return True

    def finish(self) -> dict:
        """Unwrap the role, keep the accountant history for the next turn; returns the metrics to report (cumulative ``epsilon``)."""
        if self.private is None:
            return {}
        self.private.close()
        self.context.state[PRIVACY_STATE_KEY] = ConfigRecord({"history": history_to_json(self.private.history)})
        return {"epsilon": self.private.epsilon(), "noise_multiplier": self.private.noise_multiplier}
