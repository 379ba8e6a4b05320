"""Split learning, server side (Gupta & Raskar Alg. 1-2; Jeon et al.): the top of the model and the loss.

Clients take turns; each turn is one ``train.split`` Flower message while its
per-batch activations, labels and gradients run over the gRPC data plane
(:mod:`graftfl.transport`). See docs/split.md.
"""

from __future__ import annotations

from flwr.serverapp import Grid

from graftfl.protocols import ServerProtocol
from graftfl.strategies.utils import ServerRun
from graftfl.strategies.split_config import validate_split_config
from graftfl.strategies.split_turns import SplitRunner, top_stage

PROTOCOL = "split"


def validate_config(cfg) -> None:
    """Check the protocol config of ``split``; a clear ``ValueError`` names the bad key."""
    validate_split_config(cfg)


def run(grid: Grid, run: ServerRun) -> dict:
    """Run split learning: the top of the model on the server, turns over the data plane; returns the summary."""
    stage, top, client_parts = top_stage(run)
    return SplitRunner(grid, run, PROTOCOL, stage, top, client_parts).run_rounds()


SERVER_PROTOCOL = ServerProtocol(name=PROTOCOL, run=run, validate_config=validate_config)
