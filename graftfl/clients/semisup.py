"""Semi-supervised split learning, client side: bottom + decoder; hidden labels never sent."""

from __future__ import annotations

from graftfl.core.split import SemisupClient, build_decoder, split_at_cut
from graftfl.clients.split_turns import split_client_protocol

PROTOCOL = "semisup"


def build_role(cfg, model, input_shape, num_classes: int, device) -> SemisupClient:
    """The site's part of ``semisup``: the ``split`` bottom plus a decoder of its activations."""
    bottom, _top, act_shape = split_at_cut(model, cfg.protocol.cut_stage, input_shape)  # the same bottom as split
    role = SemisupClient(bottom, build_decoder(act_shape, input_shape), alpha=float(cfg.protocol.alpha), device=device)
    role.act_shape = act_shape
    return role


CLIENT_PROTOCOL = split_client_protocol(PROTOCOL, build_role)
train, evaluate = CLIENT_PROTOCOL.train, CLIENT_PROTOCOL.evaluate  # the handlers, by name (tests call them)
