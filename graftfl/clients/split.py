"""Split learning, client side: the bottom of the model up to ``protocol.cut_stage``."""

from __future__ import annotations

from flwr.app import Context, Message

from graftfl.core.split import BottomClient, split_at_cut
from graftfl.clients.split_turns import evaluate_turn, train_turn
from graftfl.protocols import ClientProtocol

PROTOCOL = "split"


def build_role(cfg, model, input_shape, num_classes: int, device) -> BottomClient:
    """The site's part of ``split``: the model up to the cut."""
    bottom, _top, act_shape = split_at_cut(model, cfg.protocol.cut_stage, input_shape)
    role = BottomClient(bottom, device=device)
    role.act_shape = act_shape
    return role


def train(message: Message, context: Context) -> Message:
    """Answer a ``split`` training turn over the data plane."""
    return train_turn(message, context, build_role)


def evaluate(message: Message, context: Context) -> Message:
    """Answer a ``split`` evaluation turn over the data plane."""
    return evaluate_turn(message, context, build_role)


CLIENT_PROTOCOL = ClientProtocol(name=PROTOCOL, train=train, evaluate=evaluate)
