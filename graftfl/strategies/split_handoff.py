"""What the split server takes from a turn's reply and keeps between turns: the relayed ciphertext or the averaged client parts.

A reply is checked before anything is taken from it (:func:`turn_reply_problem`,
:meth:`HandoffState.problem`): a refused reply counts as a failed turn.

``protocol.handoff`` says how a client's bottom (and head) weights reach the next client:
``relay`` (the server passes on a ciphertext it cannot read), ``average`` (SplitFed-style: the
clients' parts averaged after each round) or ``local`` (each site keeps its own; nothing is handed on). Also importable
from :mod:`graftfl.strategies.split_turns`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from graftfl.core.handoff import AVERAGE_KEY, RELAY_KEY
from graftfl.strategies.replies import array_problem, metrics_problem
from graftfl.strategies.wire_bytes import arrays_nbytes


def parts_signature(parts: dict[str, torch.nn.Module]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{"bottom.conv1.0.weight": (shape, dtype), ...}``: what a site's averaged parts must look like (``role_arrays``' keys)."""
    return {f"{name}.{key}": (tuple(value.shape), str(value.detach().cpu().numpy().dtype))
            for name, module in parts.items() for key, value in module.state_dict().items()}


def turn_reply_problem(reply: Message, max_steps: int, max_rows: int) -> str | None:
    """Why a training turn's reply is refused (the turn then counts as failed), or None.

    A site is untrusted: a missing metrics record, a count that is not a whole number (NaN)
    or a list where a number belongs stopped the server. ``samples`` weighs the site's parts
    in ``handoff=average``, so it may not exceed the rows the turn could have sent
    (``steps`` x ``max_rows``).
    """
    problem = metrics_problem(reply.content, counts=("partition-id", "steps", "samples"), finite=("client_flops",))
    if problem is not None:
        return problem
    steps, samples = int(reply.content["metrics"]["steps"]), int(reply.content["metrics"]["samples"])  # whole and finite: checked
    if steps > max_steps or samples > steps * max_rows:
        return f"{steps} steps / {samples:.3g} samples exceed the turn's {max_steps} batches of at most {max_rows} rows"
    return None


@dataclass
class HandoffState:
    """What the server keeps between turns: ciphertext (relay) or averaged arrays (average).

    ``expected``: :func:`parts_signature` of the sites' parts, which every averaged reply must match.
    """

    mode: str
    expected: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    ciphertext: bytes | None = None
    average: ArrayRecord | None = None
    round_weights: list[tuple[int, ArrayRecord]] = field(default_factory=list)

    def problem(self, reply: Message) -> str | None:
        """Why a turn's hand-off must not be taken (then the turn counts as failed), or None.

        A site is untrusted: a relay ciphertext that is not bytes, or averaged parts with other
        keys, shapes or dtypes than the sites' parts or with non-finite values, would stop the
        server or make every later turn fail.
        """
        if self.mode == "relay":
            record = reply.content.config_records.get("handoff")
            value = record.get(RELAY_KEY) if record is not None else None
            return None if isinstance(value, bytes) and value else f"no relay ciphertext (bytes) in record 'handoff'.{RELAY_KEY}"
        if self.mode != "average":
            return None
        arrays = reply.content.array_records.get(AVERAGE_KEY)
        if arrays is None:
            return f"no ArrayRecord '{AVERAGE_KEY}' of the site's parts"
        if set(arrays.keys()) != set(self.expected):
            return f"parts' keys differ (missing {sorted(set(self.expected) - set(arrays.keys()))}, unexpected {sorted(set(arrays.keys()) - set(self.expected))})"
        for key, (shape, dtype) in self.expected.items():
            problem = array_problem(f"part '{key}'", arrays[key], shape, dtype)
            if problem is not None:
                return problem
        return None

    def outgoing(self) -> tuple[RecordDict, int]:
        """Records to add to a turn message and their payload bytes."""
        records, nbytes = {}, 0
        if self.mode == "relay" and self.ciphertext is not None:
            records["handoff"] = ConfigRecord({RELAY_KEY: self.ciphertext})
            nbytes = len(self.ciphertext)
        if self.mode == "average" and self.average is not None:
            records[AVERAGE_KEY] = self.average
            nbytes = arrays_nbytes(self.average)
        return records, nbytes

    def accept(self, reply: Message, samples: int) -> int:
        """Take what a finished turn handed back; returns its payload bytes."""
        if self.mode == "relay":
            self.ciphertext = bytes(reply.content["handoff"][RELAY_KEY])
            return len(self.ciphertext)
        if self.mode == "average":
            arrays = reply.content[AVERAGE_KEY]
            self.round_weights.append((samples, arrays))
            return arrays_nbytes(arrays)
        return 0

    def end_round(self) -> None:
        """SplitFed-style: the clients' parts averaged, weighted by samples trained."""
        if self.mode != "average" or not self.round_weights:
            return
        total = sum(samples for samples, _ in self.round_weights) or 1
        keys = list(self.round_weights[0][1].keys())
        averaged = {}
        for key in keys:
            arrays = [arrays[key].numpy() for _, arrays in self.round_weights]
            if np.issubdtype(arrays[0].dtype, np.floating):
                averaged[key] = sum(a.astype(np.float64) * (samples / total) for (samples, _), a in zip(self.round_weights, arrays, strict=True)).astype(arrays[0].dtype)
            else:  # counters such as batch norm's num_batches_tracked
                averaged[key] = arrays[-1]
        self.average = ArrayRecord({key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in averaged.items()})
        self.round_weights = []
