"""The ``dedup`` pre-training phase, server side: pairwise PSI between the sites, relayed as Flower messages.

:class:`~graftfl.core.dedup.DedupCoordinator` decides what each site gets at each of the
three steps and holds no secret; this module maps its ranks to node ids and its message
dicts to ConfigRecords (message type ``query.dedup``, record ``dedup``). A site's rank is
its partition-id, which it reports in its first reply: which site keeps a shared patient
(the lowest-ranked holder) depends neither on node ids nor on the order of replies.

A site that fails, times out or answers badly is reported and gets no further messages;
the pairs that completed still apply, and the report names the pairs not checked.

Outputs: ``runs/<id>/dedup.json`` (the coordinator's report plus the node of each rank),
one ``metrics.jsonl`` row with ``round`` 0 and ``phase: "dedup"`` (the phase's serialized
Flower messages as ``bytes_up``/``bytes_down``, its totals as ``dedup_*`` fields), and the
totals as the phase's summary fields (``summary.json`` ``phases.dedup``). docs/dedup.md.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from graftfl.core.dedup import DedupConfig, DedupCoordinator
from graftfl.core.meter import metrics_row
from graftfl.core.wire import CONFIG_RECORD, DEDUP_RECORD
from graftfl.protocols import ServerPhase
from graftfl.strategies.utils import ServerRun
from graftfl.strategies.wire_bytes import message_nbytes, messages_nbytes

PHASE = "dedup"
REPORT_NAME = "dedup.json"
RANK_FIELD = "rank"  # the site's partition-id, in its reply to the first step
SUMMARY_TOTALS = ("overlap_patients", "matched_images", "dropped_records", "pairs_checked", "pairs_not_checked", "bytes_relayed")

logger = logging.getLogger(__name__)


def validate_config(cfg) -> None:
    """``dedup=psi`` needs site data (a manifest with the key columns) and valid settings."""
    group = cfg.get("dedup")
    if not group or group.get("name") != "psi":
        raise ValueError("the dedup phase runs with dedup=psi (which adds it before training); do not list 'dedup' in phases")
    if cfg.dataset.name != "site":
        raise ValueError(f"dedup=psi needs dataset=site: each site's identifiers come from its own manifest.csv "
                         f"(node-config data-path); got dataset={cfg.dataset.name}")
    DedupConfig.from_group(group)  # unknown keys and bad values: a ValueError naming what is valid


class _FlowerRelay:
    """Sends one step's messages as ``query.dedup`` and takes the replies, counting bytes both ways."""

    def __init__(self, grid: Grid, run: ServerRun, node_ids: list[int]):
        self.grid, self.run, self.node_ids = grid, run, list(node_ids)
        self.timeout_s = float(run.cfg.timeout_s)
        self.bytes_up = 0
        self.bytes_down = 0
        self.node_errors: dict[int, str] = {}

    def send(self, step: str, batch: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any] | str]:
        """``{node: fields}`` out; ``{node: reply fields, or why there is none}`` back."""
        messages = [
            Message(content=RecordDict({CONFIG_RECORD: self.run.config_record(), DEDUP_RECORD: ConfigRecord(fields)}),
                    dst_node_id=node, message_type=f"query.{PHASE}")
            for node, fields in batch.items()
        ]
        self.bytes_down += messages_nbytes(messages)
        replies = {reply.metadata.src_node_id: reply for reply in self.grid.send_and_receive(messages, timeout=self.timeout_s)}
        out: dict[int, dict[str, Any] | str] = {}
        for node in batch:
            reply = replies.get(node)
            if reply is not None:
                self.bytes_up += message_nbytes(reply)
            record = None if reply is None or reply.has_error() or DEDUP_RECORD not in reply.content else reply.content[DEDUP_RECORD]
            if reply is None:
                out[node] = f"no reply within timeout_s={self.timeout_s:g}"
            elif reply.has_error():
                out[node] = f"site error: {_shortened(str(reply.error.reason))}"
            elif not isinstance(record, ConfigRecord):
                out[node] = f"bad reply: no '{DEDUP_RECORD}' ConfigRecord"
            else:
                out[node] = dict(record)
            if isinstance(out[node], str):
                self.node_errors.setdefault(node, f"{step}: {out[node]}")
        return out


def _shortened(text: str, limit: int = 600) -> str:
    """A site's error for the report: its start and its end (where a traceback names the cause)."""
    return text if len(text) <= limit else f"{text[:150]} ... {text[-(limit - 155):]}"


def _map_ranks(coordinator: DedupCoordinator, relay: _FlowerRelay, replies: dict[int, Any]) -> dict[int, int]:
    """``{rank: node}`` from the partition-ids the sites reported; ranks no site holds alone are failed."""
    claims: dict[int, list[int]] = {}
    for node, reply in replies.items():
        if isinstance(reply, str):
            continue
        rank = reply.get(RANK_FIELD)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < coordinator.num_sites:
            relay.node_errors.setdefault(node, f"request: reported partition-id {rank!r}, not in [0, {coordinator.num_sites})")
            continue
        claims.setdefault(rank, []).append(node)
    node_of_rank = {}
    for rank in range(coordinator.num_sites):
        nodes = claims.get(rank, [])
        if len(nodes) == 1:
            node_of_rank[rank] = nodes[0]
            continue
        if nodes:
            reason = f"nodes {sorted(nodes)} all report partition-id {rank}"
            for node in nodes:
                relay.node_errors.setdefault(node, f"request: {reason}")
        else:
            failed = [f"node {node}: {why}" for node, why in sorted(relay.node_errors.items())]
            reason = f"no site reported partition-id {rank}" + (f" ({'; '.join(failed)})" if failed else "")
        coordinator.fail(rank, "request", reason)
    return node_of_rank


def _accept(coordinator: DedupCoordinator, step: str, sent: dict[int, dict], replies: dict[int, Any]) -> None:
    """Failures (errors, timeouts) first, then the replies the coordinator checks."""
    for rank, reply in replies.items():
        if isinstance(reply, str):
            coordinator.fail(rank, step, reply)
    coordinator.accept(step, {rank: sent[rank] for rank, reply in replies.items() if not isinstance(reply, str)},
                       {rank: reply for rank, reply in replies.items() if not isinstance(reply, str)})


def run(grid: Grid, run: ServerRun, node_ids: list[int]) -> dict:
    """Run the three relayed steps between the connected sites; write dedup.json; return the totals."""
    started = time.perf_counter()
    coordinator = DedupCoordinator(len(node_ids))
    relay = _FlowerRelay(grid, run, node_ids)
    node_of_rank: dict[int, int] = {}
    first = coordinator.outbound("request")
    if first:  # two sites or more; each is told the session and the number of sites, and answers with its rank
        common = {key: value for key, value in first[0].items() if key != RANK_FIELD}
        replies = relay.send("request", {node: common for node in node_ids})
        node_of_rank = _map_ranks(coordinator, relay, replies)
        _accept(coordinator, "request", first, {rank: replies[node] for rank, node in node_of_rank.items()})
        for step in ("serve", "finish"):
            sent = coordinator.outbound(step)
            by_node = relay.send(step, {node_of_rank[rank]: fields for rank, fields in sent.items()})
            _accept(coordinator, step, sent, {rank: by_node[node_of_rank[rank]] for rank in sent})
    seconds = time.perf_counter() - started
    report = coordinator.report(bytes_up=relay.bytes_up, bytes_down=relay.bytes_down, wall_seconds=seconds)
    rank_of_node = {node: rank for rank, node in node_of_rank.items()}
    report["nodes"] = [{"node_id": int(node), "rank": rank_of_node.get(node), **({"error": relay.node_errors[node]} if node in relay.node_errors else {})}
                       for node in node_ids]
    (run.run_dir / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    totals = report["totals"]
    run.recorder.log_round(metrics_row(
        0, accuracy=None, loss=None, bytes_up=relay.bytes_up, bytes_down=relay.bytes_down, client_flops=0, wall_s=seconds,
        phase=PHASE, **{f"dedup_{name}": totals[name] for name in SUMMARY_TOTALS},
    ))
    failed = sorted(rank for rank, site in enumerate(report["sites"]) if site["status"] == "failed")
    if report["not_checked"]:
        logger.warning("[dedup] %d of %d pairs not checked %s (failed sites: %s); see %s", len(report["not_checked"]),
                       len(report["pairs"]), report["not_checked"], failed, run.run_dir / REPORT_NAME)
    logger.info("[dedup] %d pairs checked, %d shared patients, %d records dropped, %.1f s", totals["pairs_checked"],
                totals["overlap_patients"], totals["dropped_records"], seconds)
    return {**{name: totals[name] for name in SUMMARY_TOTALS}, "bytes_up": relay.bytes_up, "bytes_down": relay.bytes_down,
            "seconds": round(seconds, 3), "failed_sites": failed, "not_checked": report["not_checked"], "report": REPORT_NAME}


SERVER_PHASE = ServerPhase(name=PHASE, run=run, validate_config=validate_config)
