"""Semi-supervised split learning, server side (Gupta & Raskar Alg. 3).

The server is the same as in ``split`` (top + loss on the labeled rows the
clients send); the decoder and the reconstruction loss live on the clients.
"""

from __future__ import annotations

from flwr.serverapp import Grid

from graftfl.core.split import build_decoder
from graftfl.protocols import ServerProtocol
from graftfl.strategies.utils import ServerRun
from graftfl.strategies.split_config import validate_split_config
from graftfl.strategies.split_turns import SplitRunner, top_stage

PROTOCOL = "semisup"


def validate_config(cfg) -> None:
    """Check the ``semisup`` keys on top of the ``split`` ones; a clear ``ValueError`` names the bad key."""
    validate_split_config(cfg)
    if not 0.0 <= float(cfg.protocol.unlabeled_fraction) < 1.0:
        raise ValueError(f"protocol.unlabeled_fraction must be in [0, 1), got {cfg.protocol.unlabeled_fraction}")
    if float(cfg.protocol.alpha) < 0:
        raise ValueError(f"protocol.alpha must be >= 0, got {cfg.protocol.alpha}")


def run(grid: Grid, run: ServerRun) -> dict:
    """Run the semi-supervised split protocol: the ``split`` server part over the data plane; returns the summary."""
    stage, top, client_parts = top_stage(run)  # the same server part as split
    client_parts["decoder"] = build_decoder(stage.act_shape, run.input_shape)  # the sites' decoder (architecture only)
    summary = SplitRunner(grid, run, PROTOCOL, stage, top, client_parts).run_rounds()
    return {**summary, "unlabeled_fraction": float(run.cfg.protocol.unlabeled_fraction), "alpha": float(run.cfg.protocol.alpha)}


SERVER_PROTOCOL = ServerProtocol(name=PROTOCOL, run=run, validate_config=validate_config)
