"""Split learning, server side (Gupta & Raskar Alg. 1-2; Jeon et al.): the top of the model and the loss.

Clients take turns; each turn is one ``train.split`` Flower message while its
per-batch activations, labels and gradients run over the gRPC data plane
(:mod:`graftfl.transport`). See docs/split.md.
"""

from __future__ import annotations

from flwr.serverapp import Grid

from graftfl.core.split import TopStage, activation_shape, model_parts
from graftfl.protocols import ServerProtocol
from graftfl.strategies.utils import ServerRun
from graftfl.strategies.split_turns import SplitRunner, server_optimizer, validate_split_config

PROTOCOL = "split"


def validate_config(cfg) -> None:
    validate_split_config(cfg)


def build_stage(run: ServerRun) -> tuple[TopStage, object]:
    """The top part of the shared-seed model (the server never needs the bottom's weights)."""
    bottom, top = model_parts(run.new_model(), run.cfg.protocol.cut_stage)
    stage = TopStage(top, server_optimizer(run.cfg, top), activation_shape(bottom, run.data.input_shape), run.data.num_classes, run.device)
    return stage, top


def run(grid: Grid, run: ServerRun) -> dict:
    stage, top = build_stage(run)
    return SplitRunner(grid, run, PROTOCOL, stage, top).run_rounds()


SERVER_PROTOCOL = ServerProtocol(name=PROTOCOL, run=run, validate_config=validate_config)
