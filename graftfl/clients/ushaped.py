"""U-shaped split learning, client side: bottom and head (+ loss); labels stay here."""

from __future__ import annotations

from flwr.app import Context, Message

from graftfl.core.split import UShapedClient, activation_shape, model_parts
from graftfl.clients.split_turns import evaluate_turn, train_turn
from graftfl.protocols import ClientProtocol

PROTOCOL = "ushaped"


def build_role(cfg, model, input_shape, num_classes: int, device) -> UShapedClient:
    """The site's part of ``ushaped``: the bottom and the head (with the labels and the loss)."""
    bottom, middle, head = model_parts(model, cfg.protocol.cut_stage, int(cfg.protocol.head_stages))
    role = UShapedClient(bottom, head, device=device)
    role.act_shape = activation_shape(bottom, input_shape)
    role.middle_shape = activation_shape(middle, role.act_shape)  # architecture only; the middle's weights stay unused here
    return role


def train(message: Message, context: Context) -> Message:
    """Answer a ``ushaped`` training turn over the data plane."""
    return train_turn(message, context, build_role)


def evaluate(message: Message, context: Context) -> Message:
    """Answer a ``ushaped`` evaluation turn over the data plane."""
    return evaluate_turn(message, context, build_role)


CLIENT_PROTOCOL = ClientProtocol(name=PROTOCOL, train=train, evaluate=evaluate)
