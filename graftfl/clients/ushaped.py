"""U-shaped split learning, client side: bottom and head (+ loss); labels stay here."""

from __future__ import annotations

from graftfl.core.split import UShapedClient, activation_shape, model_parts
from graftfl.clients.split_turns import split_client_protocol

PROTOCOL = "ushaped"


def build_role(cfg, model, input_shape, num_classes: int, device) -> UShapedClient:
    """The site's part of ``ushaped``: the bottom and the head (with the labels and the loss)."""
    bottom, middle, head = model_parts(model, cfg.protocol.cut_stage, int(cfg.protocol.head_stages))
    role = UShapedClient(bottom, head, device=device)
    role.act_shape = activation_shape(bottom, input_shape)
    role.middle_shape = activation_shape(middle, role.act_shape)  # architecture only; the middle's weights stay unused here
    return role


CLIENT_PROTOCOL = split_client_protocol(PROTOCOL, build_role)
train, evaluate = CLIENT_PROTOCOL.train, CLIENT_PROTOCOL.evaluate  # the handlers, by name (tests call them)
