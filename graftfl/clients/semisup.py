"""Semi-supervised split learning, client side: bottom + decoder; hidden labels never sent."""

from __future__ import annotations

from flwr.app import Context, Message

from graftfl.core.split import SemisupClient, build_decoder, split_at_cut
from graftfl.clients.split_turns import evaluate_turn, train_turn
from graftfl.protocols import ClientProtocol

PROTOCOL = "semisup"


def build_role(cfg, model, input_shape, num_classes: int, device) -> SemisupClient:
    """The site's part of ``semisup``: the ``split`` bottom plus a decoder of its activations."""
    bottom, _top, act_shape = split_at_cut(model, cfg.protocol.cut_stage, input_shape)  # the same bottom as split
    role = SemisupClient(bottom, build_decoder(act_shape, input_shape), alpha=float(cfg.protocol.alpha), device=device)
    role.act_shape = act_shape
    return role


def train(message: Message, context: Context) -> Message:
    """Answer a ``semisup`` training turn over the data plane."""
    return train_turn(message, context, build_role)


def evaluate(message: Message, context: Context) -> Message:
    """Answer a ``semisup`` evaluation turn over the data plane."""
    return evaluate_turn(message, context, build_role)


CLIENT_PROTOCOL = ClientProtocol(name=PROTOCOL, train=train, evaluate=evaluate)
