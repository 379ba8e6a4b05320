"""The relaying server's side of the de-duplication phase, and an in-process runner.

:class:`DedupCoordinator` knows no transport and holds no secret: it says which message
each site gets at each of the three steps (``request``, ``serve``, ``finish``), takes the
replies (or the failure of a site), and writes the report. A Flower phase maps ranks to
node ids and each message dict to a ConfigRecord; :func:`run_pairwise_dedup` runs the same
loop in process, with a relay that sees (and records) every message both ways.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

log = logging.getLogger(__name__)

STEPS = ("request", "serve", "finish")
MAX_REPORT_CHARS = 1 << 20
Message = dict[str, Any]


class SiteEndpoint(Protocol):
    """What the coordinator talks to: one site's dedup party (in tests, the site object itself)."""

    def handle(self, message: Mapping[str, Any]) -> Message:
        """Answer one coordinator message with the site's reply."""
        ...


class DedupCoordinator:
    """Schedules the pairwise PSI between ``num_sites`` ranked sites (rank 0 keeps the most).

    Parameters
    ----------
    num_sites
        Number of sites; ranks are ``0 .. num_sites - 1`` in the order the server fixes.
    session
        A fresh identifier per phase, bound into every message (random if not given).
    """

    def __init__(self, num_sites: int, session: str | None = None) -> None:
        if num_sites < 1:
            raise ValueError(f"dedup needs at least one site; got num_sites={num_sites}")
        self.num_sites = num_sites
        self.session = session or secrets.token_hex(16)
        self.failed: dict[int, str] = {}
        self.begun: set[int] = set()
        self.requests: dict[int, bytes] = {}
        self.setups: dict[int, bytes] = {}
        self.responses: dict[tuple[int, int], bytes] = {}
        self.serve_seconds: dict[tuple[int, int], float] = {}
        self.site_info: dict[int, dict[str, Any]] = {rank: {} for rank in range(num_sites)}
        self.reports: dict[int, dict[str, Any]] = {}
        self.pair_errors: dict[tuple[int, int], str] = {}

    def _base(self, step: str, rank: int) -> Message:
        return {"step": step, "session": self.session, "rank": rank, "num_sites": self.num_sites}

    def outbound(self, step: str) -> dict[int, Message]:
        """The message for each site that has work at ``step`` (sites that failed get none)."""
        live = [rank for rank in range(self.num_sites) if rank not in self.failed]
        if step == "request":
            return {rank: self._base(step, rank) for rank in live if self.num_sites > 1}
        if step == "serve":
            out = {}
            for server in live:
                peers = {f"request.{j}": self.requests[j] for j in live if j > server and j in self.requests and server in self.begun}
                if peers:
                    out[server] = {**self._base(step, server), **peers}
            return out
        if step == "finish":
            out = {}
            for client in live:
                pairs = {}
                for server in range(client):
                    if (server, client) in self.responses and server in self.setups:
                        pairs[f"setup.{server}"] = self.setups[server]
                        pairs[f"response.{server}"] = self.responses[(server, client)]
                if pairs:
                    out[client] = {**self._base(step, client), **pairs}
            return out
        raise ValueError(f"unknown dedup step {step!r}; valid: {STEPS}")

    def fail(self, rank: int, step: str, reason: str) -> None:
        """Record that ``rank`` failed (or timed out) at ``step``; it gets no further messages."""
        log.warning("dedup: site %d failed at step %s: %s", rank, step, reason)
        self.failed.setdefault(rank, f"{step}: {reason}")

    def accept(self, step: str, sent: Mapping[int, Message], replies: Mapping[int, Any]) -> None:
        """Take the replies to ``sent``; a missing reply or an exception marks that site failed."""
        for rank, message in sent.items():
            reply = replies.get(rank)
            if reply is None or isinstance(reply, BaseException):
                self.fail(rank, step, "no reply (timed out)" if reply is None else f"{type(reply).__name__}: {reply}")
                continue
            if not isinstance(reply, Mapping):
                self.fail(rank, step, f"bad reply: expected a record, got {type(reply).__name__}")
                continue
            try:
                self._take(step, rank, message, reply)
            except (TypeError, ValueError, KeyError, RecursionError) as error:  # RecursionError: JSON nested past the parser's depth
                self.fail(rank, step, f"bad reply: {type(error).__name__}: {str(error)[:200]}")

    def _take(self, step: str, rank: int, message: Message, reply: Mapping[str, Any]) -> None:
        info = self.site_info[rank]
        if step == "request":
            info.update({key: _count(reply.get(key), key) for key in ("elements", "records", "patients")})
            self.begun.add(rank)
            for name, needed, store in (("request", rank > 0, self.requests), ("setup", "setup" in reply, self.setups)):
                if needed:
                    if not isinstance(reply.get(name), (bytes, bytearray)):
                        raise ValueError(f"reply to 'request' lacks the '{name}' bytes")
                    store[rank] = bytes(reply[name])
                    info[f"seconds_{name}"] = round(_seconds(reply.get(f"seconds_{name}")), 4)
        elif step == "serve":
            if "setup" in reply:  # GCS: the setup is sized for the requests, so it comes with the responses
                if not isinstance(reply["setup"], (bytes, bytearray)):
                    raise ValueError("'setup' must be bytes")
                self.setups[rank] = bytes(reply["setup"])
                info["seconds_setup"] = round(_seconds(reply.get("seconds_setup")), 4)
            for name in message:
                if name.startswith("request."):
                    peer = int(name.split(".", 1)[1])
                    response = reply.get(f"response.{peer}")
                    if isinstance(response, (bytes, bytearray)):
                        self.responses[(rank, peer)] = bytes(response)
                        self.serve_seconds[(rank, peer)] = _seconds(reply.get(f"seconds.{peer}"))
                    else:
                        why = reply.get(f"error.{peer}")
                        self.pair_errors[(rank, peer)] = f"site {rank} refused the request of site {peer}: {str(why)[:500]}" if why else f"site {rank} sent no response for site {peer}"
        elif step == "finish":
            text = reply.get("report")
            if not isinstance(text, str) or len(text) > MAX_REPORT_CHARS:
                raise ValueError("reply to 'finish' lacks a report (JSON string, at most 1 MiB)")
            report = json.loads(text)
            if not isinstance(report, dict) or not all(isinstance(report.get(key, {}), dict) for key in ("pairs", "errors")):
                raise ValueError("the report must be a JSON object whose 'pairs' and 'errors' are objects")
            pairs = {}
            for peer, result in report.get("pairs", {}).items():
                if int(peer) not in range(rank):
                    raise ValueError(f"report names pair with site {peer}, not a lower-ranked site")
                if f"response.{int(peer)}" not in message or not isinstance(result, dict):
                    raise ValueError(f"report names pair with site {peer}, whose response it was not sent, or not as an object")
                pairs[int(peer)] = {key: _count(result.get(key), key) for key in ("overlap_patients", "matched_images", "dropped_records")}
                pairs[int(peer)]["seconds"] = _seconds(result.get("seconds"))
            for peer, why in report.get("errors", {}).items():
                self.pair_errors[(int(peer), rank)] = f"site {rank} refused the messages of site {peer}: {str(why)[:500]}"
            self.reports[rank] = {"pairs": pairs, **{key: _count(report.get(key), key) for key in ("records", "patients", "dropped_records")}}

    def report(self, bytes_up: int = 0, bytes_down: int = 0, wall_seconds: float | None = None) -> dict[str, Any]:
        """The JSON-able phase report (what runs/<id>/dedup.json holds)."""
        pairs, not_checked = [], []
        totals = {"overlap_patients": 0, "matched_images": 0, "bytes_relayed": 0}
        for server in range(self.num_sites):
            for client in range(server + 1, self.num_sites):
                entry: dict[str, Any] = {"pair": [server, client], "server_site": server, "client_site": client}
                result = self.reports.get(client, {}).get("pairs", {}).get(server)
                if result is None:
                    entry.update(status="not_checked", reason=self._why_not(server, client))
                    not_checked.append([server, client])
                else:
                    relayed = len(self.requests[client]) + len(self.setups[server]) + len(self.responses[(server, client)])
                    entry.update(status="ok", overlap_patients=result["overlap_patients"], matched_images=result["matched_images"],
                                 dropped_records={str(server): 0, str(client): result["dropped_records"]}, bytes_relayed=relayed,
                                 seconds=round(self.serve_seconds.get((server, client), 0.0) + result["seconds"], 4))
                    totals["overlap_patients"] += result["overlap_patients"]
                    totals["matched_images"] += result["matched_images"]
                    totals["bytes_relayed"] += relayed
                pairs.append(entry)
        sites = []
        for rank in range(self.num_sites):
            entry = {"rank": rank, "status": "failed" if rank in self.failed else "ok", **self.site_info[rank]}
            if rank in self.failed:
                entry["error"] = self.failed[rank]
            if rank in self.reports:
                entry["dropped_records"] = self.reports[rank]["dropped_records"]
            elif rank not in self.failed:
                entry["dropped_records"] = 0
            sites.append(entry)
        totals.update(
            dropped_records=sum(site.get("dropped_records", 0) for site in sites),
            pairs_checked=len(pairs) - len(not_checked), pairs_not_checked=len(not_checked),
            bytes_up=bytes_up, bytes_down=bytes_down,
        )
        if wall_seconds is not None:
            totals["seconds"] = round(wall_seconds, 3)
        return {"session": self.session, "num_sites": self.num_sites, "pairs": pairs, "sites": sites,
                "not_checked": not_checked, "totals": totals}

    def _why_not(self, server: int, client: int) -> str:
        reasons = [f"site {rank} failed at {self.failed[rank]}" for rank in (server, client) if rank in self.failed]
        if (server, client) in self.pair_errors:
            reasons.append(self.pair_errors[(server, client)])
        return "; ".join(reasons) or "not completed"


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**10:
        raise ValueError(f"'{name}' must be a non-negative int; got {value!r}")
    return value


def _seconds(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 10**7:
        raise ValueError(f"seconds must be a non-negative number; got {value!r}")
    return float(value)


def message_bytes(message: Mapping[str, Any]) -> int:
    """Bytes a message carries (bytes and str values, as sent in a ConfigRecord)."""
    return sum(len(value) if isinstance(value, (bytes, bytearray)) else len(str(value).encode()) for value in message.values())


class Transcript:
    """A relay that records every message the server passes on, in both directions.

    Subclass and override :meth:`relay` to alter messages (adversarial tests).
    """

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, int, Message]] = []
        self.bytes_up = 0
        self.bytes_down = 0

    def relay(self, step: str, direction: str, rank: int, message: Message) -> Message:
        """Record ``message`` on its way through the server and count its bytes; returns it unchanged."""
        self.entries.append((step, direction, rank, dict(message)))
        if direction == "down":
            self.bytes_down += message_bytes(message)
        else:
            self.bytes_up += message_bytes(message)
        return message

    def blobs(self) -> list[bytes]:
        """Every value the server saw, as bytes (for searching the transcript)."""
        out = []
        for _, _, _, message in self.entries:
            for name, value in message.items():
                out.append(name.encode())
                out.append(bytes(value) if isinstance(value, (bytes, bytearray)) else str(value).encode())
        return out


Deliver = Callable[[dict[int, Message]], dict[int, Any]]


def deliver_in_process(sites: Sequence[SiteEndpoint]) -> Deliver:
    """Call each site's ``handle`` in turn; an exception is that site's reply (it failed)."""

    def deliver(batch: dict[int, Message]) -> dict[int, Any]:
        replies: dict[int, Any] = {}
        for rank, message in batch.items():
            try:
                replies[rank] = sites[rank].handle(message)
            except Exception as error:  # noqa: BLE001 - a failing site must not stop the phase
                replies[rank] = error
        return replies

    return deliver


def run_pairwise_dedup(sites: Sequence[SiteEndpoint], relay: Transcript | None = None, *, session: str | None = None,
                       deliver: Deliver | None = None) -> dict[str, Any]:
    """Run the whole phase: three relayed steps between ``sites`` (rank = position).

    Parameters
    ----------
    sites
        Objects with ``handle(message) -> reply`` (:class:`~graftfl.core.dedup.site.DedupSite`).
    relay
        Sees and may alter every message both ways (default: a fresh :class:`Transcript`).
    deliver
        Sends a batch ``{rank: message}`` and returns ``{rank: reply or exception}``
        (default: in-process calls; a benchmark may use processes).

    Returns
    -------
    dict
        The report of :meth:`DedupCoordinator.report`. Each site keeps its own drops
        (``DedupSite.dropped_records()``); the server never sees which records they are.
    """
    relay = relay if relay is not None else Transcript()
    deliver = deliver or deliver_in_process(sites)
    coordinator = DedupCoordinator(len(sites), session=session)
    started = time.perf_counter()
    for step in STEPS:
        sent = {rank: relay.relay(step, "down", rank, message) for rank, message in coordinator.outbound(step).items()}
        replies = deliver(sent)
        relayed = {rank: relay.relay(step, "up", rank, reply) if isinstance(reply, Mapping) else reply for rank, reply in replies.items()}
        coordinator.accept(step, sent, relayed)
    report = coordinator.report(bytes_up=relay.bytes_up, bytes_down=relay.bytes_down, wall_seconds=time.perf_counter() - started)
    log.info("dedup: %d of %d pairs checked, %d records dropped", report["totals"]["pairs_checked"], len(report["pairs"]), report["totals"]["dropped_records"])
    return report
