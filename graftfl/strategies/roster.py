"""The ``roster`` pre-training phase, server side: the sites in partition order, whatever their node ids.

Split's turns, DSSGD's round-robin and a DSSGD site's download selection follow the order of
the sites. Without this phase that order is the node ids', which a SuperLink draws at random
in deployment, so the same seeded deployed run trains in a different order each time
(``graftfl sim`` gives its virtual nodes ids in partition order, so there it changes nothing).
With ``phases=[roster]`` every site says its ``partition-id`` once before training
(``query.roster``) and the server walks the sites in that order
(:meth:`graftfl.strategies.utils.ServerRun.in_site_order`).

A claim is untrusted: one that is not an integer in ``[0, num_clients)``, or that a site
with a smaller node id made already, gives no place; such sites and those that do not
answer come after the others, in node id order (reported in the phase summary).
"""

from __future__ import annotations

import logging

from flwr.app import Message, RecordDict

from graftfl.protocols import ServerPhase
from graftfl.strategies.replies import claimed_partition

PHASE = "roster"
logger = logging.getLogger(__name__)


def run(grid, run, node_ids: list[int]) -> dict:
    """Ask every site its partition id and install the order; summary fields."""
    messages = [Message(RecordDict({"config": run.config_record()}), dst_node_id=node, message_type=f"query.{PHASE}") for node in node_ids]
    claims, failures = {}, []
    for reply in grid.send_and_receive(messages, timeout=run.cfg.timeout_s):
        node = reply.metadata.src_node_id
        if reply.has_error():
            failures.append(f"node {node}: {reply.error.reason}")
        else:
            claims[node] = claimed_partition(dict(reply.content.get("metrics", {})))
    partitions: dict[int, int] = {}
    for node in sorted(claims):
        if not 0 <= claims[node] < int(run.cfg.num_clients):
            failures.append(f"node {node}: partition-id {claims[node]} is not in [0, num_clients={run.cfg.num_clients})")
        elif claims[node] in partitions.values():
            failures.append(f"node {node}: partition-id {claims[node]} was claimed by another site")
        else:
            partitions[node] = claims[node]
    failures += [f"node {node}: no reply within timeout_s" for node in node_ids if node not in claims]
    run.install_site_partitions(partitions)
    if failures:
        logger.warning("[roster] %d site(s) without a place (after the others, in node id order): %s", len(failures), "; ".join(failures))
    order = run.in_site_order(node_ids)
    logger.info("[roster] site order by partition: %s", [partitions.get(node, -1) for node in order])
    return {"partitions": {str(node): partitions.get(node, -1) for node in order}, "failures": failures}


SERVER_PHASE = ServerPhase(name=PHASE, run=run)
