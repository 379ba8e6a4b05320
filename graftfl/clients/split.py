"""Split learning, client side: the bottom of the model up to ``protocol.cut_stage``."""

from __future__ import annotations

from graftfl.core.split import BottomClient, split_at_cut
from graftfl.clients.split_turns import split_client_protocol

PROTOCOL = "split"


def build_role(cfg, model, input_shape, num_classes: int, device) -> BottomClient:
    """The site's part of ``split``: the model up to the cut."""
    bottom, _top, act_shape = split_at_cut(model, cfg.protocol.cut_stage, input_shape)
    role = BottomClient(bottom, device=device)
    role.act_shape = act_shape
    return role


CLIENT_PROTOCOL = split_client_protocol(PROTOCOL, build_role)
train, evaluate = CLIENT_PROTOCOL.train, CLIENT_PROTOCOL.evaluate  # the handlers, by name (tests call them)
