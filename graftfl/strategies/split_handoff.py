"""What the split server keeps between turns: the relayed ciphertext or the averaged client parts.

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
from graftfl.strategies.wire_bytes import arrays_nbytes


@dataclass
class HandoffState:
    """What the server keeps between turns: ciphertext (relay) or averaged arrays (average)."""

    mode: str
    ciphertext: bytes | None = None
    average: ArrayRecord | None = None
    round_weights: list[tuple[int, ArrayRecord]] = field(default_factory=list)

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
