"""SuperNode ids that follow the partitions, the same in every simulation run with one seed.

Flower draws a node id from the OS's random bytes when a SuperNode registers, and a Ray
simulation registers its virtual SuperNodes in partition order (``vce_api._register_nodes``).
Protocols that walk the nodes in id order (split's turns, DSSGD's round robin and upload
order, Flower's own sampling of ``fraction_train``) then walk the partitions in an order that
changes from run to run, and a seeded run's weights with it. In simulation graftfl draws the ids
instead from a counter whose start the seed fixes: ascending in registration order, so id
order is partition order on both backends and in every run. Deployment keeps the SuperLink's
random ids (docs/configuration.md, "Determinism").
"""

from __future__ import annotations

import itertools
import random
from contextlib import contextmanager
from typing import Iterator

import flwr.server.superlink.linkstate.in_memory_linkstate as flower_link_state

FIRST_ID_RANGE = (2**32, 2**62)  # clear of 0 and the SuperLink's id, within Flower's 8-byte ids


def seeded_ids(seed: int) -> Iterator[int]:
    """Ascending ids from a start that ``seed`` fixes."""
    return itertools.count(random.Random(int(seed)).randrange(*FIRST_ID_RANGE))


@contextmanager
def partition_ordered_node_ids(seed: int):
    """While the block runs, Flower's in-memory link state (where a Ray simulation registers its
    SuperNodes) draws its node, run and task ids from :func:`seeded_ids` instead of random bytes."""
    ids = seeded_ids(seed)
    original = flower_link_state.generate_rand_int_from_bytes

    def draw(num_bytes: int, exclude: set[int] | None = None) -> int:
        return next(value for value in ids if value not in (exclude or ()) and value < 256**num_bytes)

    flower_link_state.generate_rand_int_from_bytes = draw
    try:
        yield
    finally:
        flower_link_state.generate_rand_int_from_bytes = original
