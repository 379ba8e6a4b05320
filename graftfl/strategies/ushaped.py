"""U-shaped split learning, server side (Gupta & Raskar §3.6): only the middle of the model.

The client keeps the bottom and the head with the loss, so labels never reach
the server: the server receives activations, returns the middle's outputs,
then receives their gradient and returns the gradient of the activations.
"""

from __future__ import annotations

from flwr.serverapp import Grid

from graftfl.protocols import ServerProtocol
from graftfl.strategies.utils import ServerRun
from graftfl.strategies.split_config import validate_split_config
from graftfl.strategies.split_turns import SplitRunner, middle_stage

PROTOCOL = "ushaped"


def validate_config(cfg) -> None:
    """Check the ``ushaped`` keys on top of the ``split`` ones; a clear ``ValueError`` names the bad key."""
    validate_split_config(cfg)
    if int(cfg.protocol.head_stages) < 1:
        raise ValueError("protocol.head_stages must be >= 1 (the client keeps at least the last stage and the loss)")


def run(grid: Grid, run: ServerRun) -> dict:
    """Run U-shaped split learning: the middle of the model on the server, head and labels at the sites."""
    stage, middle, client_parts = middle_stage(run)
    return SplitRunner(grid, run, PROTOCOL, stage, middle, client_parts).run_rounds()


SERVER_PROTOCOL = ServerProtocol(name=PROTOCOL, run=run, validate_config=validate_config)
