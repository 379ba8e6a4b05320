"""A split site's hand-off state packed without pickle: the same state back, anything else refused."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct

import pytest
import torch
from torch import nn

from graftfl.core.handoff import decrypt_state, encrypt_state
from graftfl.core.state_codec import MAGIC, pack_state, unpack_state


def _trained(optimizer_class, **kwargs):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    optimizer = optimizer_class(module.parameters(), lr=0.1, **kwargs)
    for _ in range(3):
        optimizer.zero_grad()
        module(torch.randn(4, 1, 4, 4)).sum().backward()
        optimizer.step()
    return module, optimizer


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and (a == b or a != a and b != b)  # NaN == NaN here


@pytest.mark.parametrize("optimizer_class, kwargs", [(torch.optim.SGD, {"momentum": 0.9}), (torch.optim.Adam, {"betas": (0.8, 0.99)})])
def test_a_role_state_comes_back_equal_and_trains_on_identically(optimizer_class, kwargs):
    module, optimizer = _trained(optimizer_class, **kwargs)
    state = {"modules": {"bottom": module.state_dict()}, "optimizer": optimizer.state_dict()}
    back = unpack_state(pack_state(state))
    assert _equal({"modules": {"bottom": dict(state["modules"]["bottom"])}, "optimizer": state["optimizer"]}, back)
    assert isinstance(back["optimizer"]["state"], dict) and all(type(k) is int for k in back["optimizer"]["state"])

    copies = []
    for source in (state, back):  # two sites resume from the two states and take the same step
        torch.manual_seed(0)
        twin = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
        twin.load_state_dict(source["modules"]["bottom"])
        twin_optimizer = optimizer_class(twin.parameters(), lr=0.5)
        twin_optimizer.load_state_dict(source["optimizer"])
        torch.manual_seed(1)
        twin(torch.randn(4, 1, 4, 4)).sum().backward()
        twin_optimizer.step()
        copies.append(twin.state_dict())
    assert _equal(dict(copies[0]), dict(copies[1]))


def test_every_supported_kind_of_value_round_trips():
    state = {
        "tensors": [torch.arange(6, dtype=torch.int64).reshape(2, 3), torch.tensor(2.5, dtype=torch.float64),
                    torch.tensor([1.5, -2.0], dtype=torch.bfloat16), torch.tensor([True, False]), torch.zeros(0, 4),
                    torch.ones(3, 2).t(), torch.ones(2, requires_grad=True)],
        "scalars": (None, True, 3, -1.25, float("nan"), float("inf"), "text"),
        "by_int": {0: {"x": 1}, 7: []},
        "empty": {},
    }
    back = unpack_state(pack_state(state))
    expected = {**state, "tensors": [t.detach() for t in state["tensors"]]}
    assert _equal(expected, back)
    assert all(t.is_contiguous() for t in back["tensors"])
    back["tensors"][0].add_(1)  # writable: the site trains on it


@pytest.mark.parametrize("value", [{1: "a", "b": 2}, {(1, 2): 3}, {1.5: 0}, {"f": len}, {"s": {1, 2}},
                                   {"c": torch.zeros(2, dtype=torch.complex64)}])
def test_what_cannot_be_packed_faithfully_is_refused(value):
    with pytest.raises(ValueError, match="cannot pack"):
        pack_state(value)


def _with_outline(outline: dict, payload: bytes = b"") -> bytes:
    text = json.dumps(outline).encode()
    return MAGIC + struct.pack(">I", len(text)) + text + payload


@pytest.mark.parametrize("data, message", [
    (b"", "bad magic"),
    (pickle.dumps({"a": 1}), "bad magic"),
    (MAGIC + struct.pack(">I", 999) + b"{}", "outline length"),
    (MAGIC + struct.pack(">I", 3) + b"{x}", "not JSON"),
    (_with_outline({"tree": 1}), "'tensors' list"),
    (_with_outline({"tree": {"t": 0}, "tensors": []}), "does not hold"),
    (_with_outline({"tree": {"t": True}, "tensors": [{"dtype": "float32", "shape": [1]}]}, b"\0" * 4), "does not hold"),
    (_with_outline({"tree": None, "tensors": [{"dtype": "float32", "shape": [2]}]}, b"\0" * 4), "runs past the end"),
    (_with_outline({"tree": None, "tensors": [{"dtype": "float32", "shape": [1]}]}, b"\0" * 8), "trailing bytes"),
    (_with_outline({"tree": None, "tensors": [{"dtype": "object", "shape": [1]}]}, b"\0" * 8), "dtype"),
    (_with_outline({"tree": None, "tensors": [{"dtype": "int8", "shape": [-1]}]}), "non-negative"),
    (_with_outline({"tree": None, "tensors": [{"dtype": "int8", "shape": [1.0]}]}, b"\0"), "non-negative"),
    (_with_outline({"tree": {"x": 1}, "tensors": []}), "unknown tag"),
    (_with_outline({"tree": {"d": 1, "l": []}, "tensors": []}), "one tag"),
    (_with_outline({"tree": [1, 2], "tensors": []}), "one tag"),
    (_with_outline({"tree": {"i": [["0", 1]]}, "tensors": []}), "not int"),
    (_with_outline({"tree": {"d": [[0, 1]]}, "tensors": []}), "not str"),
    (_with_outline({"tree": {"d": [["a"]]}, "tensors": []}), "unknown tag or shape"),
])
def test_a_malformed_state_is_refused_with_a_reason(data, message):
    with pytest.raises(ValueError, match=message):
        unpack_state(data)


def test_deep_nesting_is_refused_not_a_crash():
    deep = '{"l": [' * 100_000 + "null" + "]}" * 100_000
    text = ('{"tensors": [], "tree": ' + deep + "}").encode()
    with pytest.raises(ValueError):
        unpack_state(MAGIC + struct.pack(">I", len(text)) + text)


def test_relay_blobs_use_the_format_and_older_sealed_states_still_open():
    key = os.urandom(32)
    module, optimizer = _trained(torch.optim.SGD, momentum=0.9)
    state = {"modules": {"bottom": dict(module.state_dict())}, "optimizer": optimizer.state_dict()}
    assert _equal(state, decrypt_state(key, encrypt_state(key, state)))

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from graftfl.core.handoff import ASSOCIATED_DATA

    buffer = io.BytesIO()
    torch.save(state, buffer)  # a checkpoint sealed before the format changed
    nonce = os.urandom(12)
    old_blob = nonce + AESGCM(key).encrypt(nonce, buffer.getvalue(), ASSOCIATED_DATA)
    assert _equal(state, decrypt_state(key, old_blob))
