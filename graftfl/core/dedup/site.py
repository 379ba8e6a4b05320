"""One site's side of pairwise ECDH PSI de-duplication (openmined-psi).

For every pair of sites i < j, site i is the PSI *server* and site j the *client*: j
learns which of its elements i also holds and drops those records; i learns only the
size of j's set. Each site runs three steps, each answering one relayed message:

``request``  make fresh EC keys; a client-role site (rank > 0) blinds its elements
             once (the same request goes to every lower-ranked site); a server-role site
             (rank < num_sites - 1) encodes its own blinded elements once (the setup; with
             GCS that waits for ``serve``, where the requests' sizes are known).
``serve``    for every higher-ranked site's request, apply this site's key (the response).
``finish``   for every lower-ranked site, unblind its response, look it up in its setup,
             and drop every record of each patient (and each image) found.

All messages are bytes in authenticated envelopes (:mod:`.wire`); the keys that survive
between steps live in :meth:`DedupSite.secret_state`, which never leaves the site.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import DedupConfig
from .keys import SaltedKeys
from .wire import DedupProtocolError, open_envelope, seal

log = logging.getLogger(__name__)

@dataclass
class PairResult:
    """What a client-role site found against one lower-ranked site."""

    peer: int
    overlap_patients: int
    matched_images: int
    dropped_records: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _psi():
    import private_set_intersection.python as psi

    return psi


def _parse(message_cls, payload: bytes, what: str):
    from google.protobuf.message import DecodeError

    parsed = message_cls()
    try:
        parsed.ParseFromString(payload)
    except DecodeError as error:
        raise DedupProtocolError(f"{what}: payload is not a valid PSI message ({error})") from error
    return parsed


class DedupSite:
    """One site's records and its side of the pairwise PSI.

    Parameters
    ----------
    keys
        One identifier per record (record index = position): a string for a one-column key, a
        tuple in ``config.key`` column order for a composite key, or a manifest row mapping.
        They are normalized here (see :class:`~graftfl.core.dedup.keys.KeySpec`).
    salt
        The secret shared by the sites (:func:`~graftfl.core.dedup.keys.resolve_salt`).
    config
        Shared settings (:class:`DedupConfig`).
    image_hashes
        With ``config.images == "phash"``: one 64-bit pHash (or ``None``) per record.
    secret_state
        What :meth:`secret_state` returned after an earlier step (a fresh process per message).
    """

    def __init__(self, keys: Sequence[Any], salt: str | bytes, config: DedupConfig | None = None,
                 image_hashes: Sequence[int | None] | None = None, secret_state: Mapping[str, bytes] | None = None) -> None:
        self.config = config or DedupConfig()
        self._salted = SaltedKeys.from_salt(salt)
        spec = self.config.key_spec()
        self.num_records = len(keys)
        self._element_records: dict[str, list[int]] = {}
        self._element_kind: dict[str, str] = {}
        for index, value in enumerate(keys):
            row = _as_row(value, spec.columns, index)
            self._add(self._salted.element("patient", spec.domain, spec.key(row, where=f"record {index}")), "patient", index)
        if self.config.images == "phash":
            if image_hashes is None or len(image_hashes) != self.num_records:
                raise ValueError(f"dedup.images=phash needs one pHash per record ({self.num_records}); got {None if image_hashes is None else len(image_hashes)}")
            scheme = self.config.band_scheme()
            for index, phash in enumerate(image_hashes):
                if phash is not None:
                    for value in scheme.values(int(phash)):
                        self._add(self._salted.element("image", scheme.domain, value), "image", index)
        # Local de-duplication: one PSI element per distinct key; sorted so the order of
        # elements on the wire says nothing about the order of records on disk.
        self.elements = sorted(self._element_records)
        self.num_patients = sum(1 for kind in self._element_kind.values() if kind == "patient")
        self._digest = hashlib.sha256("\n".join(self.elements).encode()).digest()
        self._state: dict[str, Any] = {}
        if secret_state:
            self._load_state(secret_state)
        self.results: dict[int, PairResult] = {}

    def _add(self, element: str, kind: str, record: int) -> None:
        self._element_records.setdefault(element, []).append(record)
        self._element_kind[element] = kind

    # ------------------------------------------------------------- state ---
    def secret_state(self) -> dict[str, bytes]:
        """Keys and results to keep at the site between steps (e.g. in Flower's context.state). Never send it."""
        return {"dedup.state": json.dumps({
            "session": self._state.get("session"), "rank": self._state.get("rank"), "num_sites": self._state.get("num_sites"),
            "server_key": self._state.get("server_key", b"").hex(), "client_key": self._state.get("client_key", b"").hex(),
            "digest": self._digest.hex(), "dropped": self.dropped_records(),
        }).encode()}

    def _load_state(self, state: Mapping[str, bytes]) -> None:
        data = json.loads(bytes(state["dedup.state"]))
        if bytes.fromhex(data["digest"]) != self._digest:
            raise DedupProtocolError("this site's dedup keys changed between steps of the phase; restart the phase")
        self._state = {"session": data["session"], "rank": data["rank"], "num_sites": data["num_sites"],
                       "server_key": bytes.fromhex(data["server_key"]), "client_key": bytes.fromhex(data["client_key"])}
        self._restored_drops = set(data.get("dropped", []))

    def _expect(self, session: str, rank: int) -> None:
        if self._state.get("session") != session or self._state.get("rank") != rank:
            raise DedupProtocolError(f"dedup step for session {session!r} rank {rank} does not follow this site's request step "
                                     f"(session {self._state.get('session')!r} rank {self._state.get('rank')})")

    # ------------------------------------------------------------- steps ---
    def begin(self, session: str, rank: int, num_sites: int) -> dict[str, Any]:
        """Step ``request``: fresh keys; the client request (rank > 0) and the setup (rank < num_sites - 1)."""
        if not (isinstance(rank, int) and isinstance(num_sites, int) and 0 <= rank < num_sites):
            raise DedupProtocolError(f"dedup rank {rank!r} is not in [0, num_sites={num_sites!r})")
        psi = _psi()
        self._state = {"session": str(session), "rank": rank, "num_sites": num_sites}
        self.results = {}  # a new session reports only its own pairs
        reply: dict[str, Any] = {"elements": len(self.elements), "records": self.num_records, "patients": self.num_patients}
        mac = self._salted.mac_key
        if rank > 0:
            started = time.perf_counter()
            client = psi.client.CreateWithNewKey(True)
            self._state["client_key"] = bytes(client.GetPrivateKeyBytes())
            payload = client.CreateRequest(self.elements).SerializeToString()
            reply["request"] = seal(mac, "request", session, rank, None, len(self.elements), payload)
            reply["seconds_request"] = time.perf_counter() - started
        if rank < num_sites - 1:
            server = psi.server.CreateWithNewKey(True)
            self._state["server_key"] = bytes(server.GetPrivateKeyBytes())
            if self.config.data_structure == "raw":  # RAW ignores the client's size: set up now, in parallel with requests
                reply.update(self.server_setup(0))
        return reply

    def server_setup(self, num_client_inputs: int) -> dict[str, Any]:
        """This site's blinded elements for every higher-ranked site: ``{"setup": bytes, "seconds_setup": float}``.

        GCS is sized for ``num_client_inputs`` (the largest request served); where the library
        cannot build it (it fails for small sets against large requests) the exact RAW form is sent.
        """
        psi, started = _psi(), time.perf_counter()
        server = psi.server.CreateFromKey(self._state["server_key"], True)
        structure = psi.DataStructure.RAW
        if self.config.data_structure == "gcs":
            try:
                setup = server.CreateSetupMessage(self.config.fpr, max(1, num_client_inputs), self.elements, psi.DataStructure.GCS)
                structure = None
            except (ValueError, RuntimeError) as error:
                log.warning("dedup: GCS setup failed (%s); sending the exact RAW setup instead", error)
        if structure is not None:
            setup = server.CreateSetupMessage(self.config.fpr, max(1, num_client_inputs), self.elements, structure)
        sealed = seal(self._salted.mac_key, "setup", self._state["session"], self._state["rank"], None, len(self.elements), setup.SerializeToString())
        return {"setup": sealed, "seconds_setup": time.perf_counter() - started}

    def _open_request(self, peer: int, request: bytes):
        psi, session, rank = _psi(), self._state.get("session"), self._state.get("rank")
        if not self._state.get("server_key") or not isinstance(peer, int) or not rank < peer < self._state["num_sites"]:
            raise DedupProtocolError(f"site {rank} serves only higher-ranked sites after its request step; got a request from {peer!r}")
        header, payload = open_envelope(self._salted.mac_key, request, kind="request", session=session, sender=peer,
                                        receiver=None, max_bytes=self.config.max_message_bytes)
        parsed = _parse(psi.Request, payload, f"dedup request from site {peer}")
        count = len(parsed.encrypted_elements)
        if count != header["count"] or count > self.config.max_peer_items or not parsed.reveal_intersection:
            raise DedupProtocolError(f"dedup request from site {peer}: {count} elements (header says {header['count']}, "
                                     f"limit dedup.max_peer_items={self.config.max_peer_items})")
        return parsed

    def serve(self, requests: Mapping[int, bytes]) -> dict[str, Any]:
        """Step ``serve``: ``{"response.<j>": bytes}`` for each valid request, ``{"error.<j>": str}`` for each refused one,
        and ``"setup"`` when it was deferred to now (GCS). One bad request costs that pair only."""
        reply: dict[str, Any] = {}
        parsed = {}
        for peer, request in sorted(requests.items()):
            try:
                parsed[peer] = self._open_request(peer, request)
            except DedupProtocolError as error:
                log.warning("dedup: refused the request of site %d: %s", peer, error)
                reply[f"error.{peer}"] = str(error)
        if self.config.data_structure != "raw" and parsed:
            reply.update(self.server_setup(max(len(request.encrypted_elements) for request in parsed.values())))
        for peer, request in parsed.items():
            started = time.perf_counter()
            reply[f"response.{peer}"] = self._respond(peer, request)
            reply[f"seconds.{peer}"] = time.perf_counter() - started
        return reply

    def server_response(self, peer: int, request: bytes) -> bytes:
        """One pair's response (raises :class:`DedupProtocolError` on a bad request); :meth:`serve` does all peers."""
        return self._respond(peer, self._open_request(peer, request))

    def _respond(self, peer: int, request) -> bytes:
        server = _psi().server.CreateFromKey(self._state["server_key"], True)
        response = server.ProcessRequest(request).SerializeToString()
        return seal(self._salted.mac_key, "response", self._state["session"], self._state["rank"], peer, len(request.encrypted_elements), response)

    def client_finish(self, peer: int, setup: bytes, response: bytes) -> PairResult:
        """Step ``finish`` for one lower-ranked ``peer``: the records to drop because ``peer`` holds them too."""
        psi, session, rank = _psi(), self._state.get("session"), self._state.get("rank")
        if not self._state.get("client_key") or not isinstance(peer, int) or not 0 <= peer < rank:
            raise DedupProtocolError(f"site {rank} finishes only against lower-ranked sites after its request step; got {peer!r}")
        started = time.perf_counter()
        limit = self.config.max_message_bytes
        setup_header, setup_payload = open_envelope(self._salted.mac_key, setup, kind="setup", session=session, sender=peer, receiver=None, max_bytes=limit)
        _, response_payload = open_envelope(self._salted.mac_key, response, kind="response", session=session, sender=peer, receiver=rank, max_bytes=limit)
        parsed_setup = _parse(psi.ServerSetup, setup_payload, f"dedup setup from site {peer}")
        parsed_response = _parse(psi.Response, response_payload, f"dedup response from site {peer}")
        if len(parsed_response.encrypted_elements) != len(self.elements):
            raise DedupProtocolError(f"dedup response from site {peer} has {len(parsed_response.encrypted_elements)} elements; "
                                     f"this site asked about {len(self.elements)}")
        if setup_header["count"] > self.config.max_peer_items:
            raise DedupProtocolError(f"dedup setup from site {peer} claims {setup_header['count']} elements (limit {self.config.max_peer_items})")
        client = psi.client.CreateFromKey(self._state["client_key"], True)
        found = client.GetIntersection(parsed_setup, parsed_response)
        # The library can return indices outside the request (documented upstream); ignore them.
        indices = sorted({index for index in found if 0 <= index < len(self.elements)})
        dropped: set[int] = set()
        patients, images = set(), set()
        for index in indices:
            element = self.elements[index]
            records = self._element_records[element]
            dropped.update(records)
            if self._element_kind[element] == "patient":
                patients.add(element)
            else:
                images.update(records)
        result = PairResult(peer=peer, overlap_patients=len(patients), matched_images=len(images),
                            dropped_records=sorted(dropped), seconds=time.perf_counter() - started)
        self.results[peer] = result
        return result

    def dropped_records(self) -> list[int]:
        """Indices of this site's records to leave out of training and held-out evaluation."""
        dropped = set(getattr(self, "_restored_drops", ()))
        for result in self.results.values():
            dropped.update(result.dropped_records)
        return sorted(dropped)

    def finish_report(self) -> dict[str, Any]:
        """Counts only (no indices, no elements): what the site tells the server after ``finish``."""
        return {
            "rank": self._state.get("rank"), "records": self.num_records, "patients": self.num_patients,
            "elements": len(self.elements), "dropped_records": len(self.dropped_records()),
            "pairs": {str(peer): {"overlap_patients": r.overlap_patients, "matched_images": r.matched_images,
                                  "dropped_records": len(r.dropped_records), "seconds": round(r.seconds, 4)}
                      for peer, r in sorted(self.results.items())},
        }

    # ---------------------------------------------------------- dispatch ---
    def handle(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one relayed message (a ConfigRecord-like mapping of str -> bytes/str/int).

        ``{"step": "request", "session", "rank", "num_sites"}`` -> ``{"elements", "request"?, "setup"?, "seconds_*"}``;
        ``{"step": "serve", ..., "request.<j>": bytes}`` -> ``{"response.<j>": bytes | "error.<j>": str, "seconds.<j>": float, "setup"?}``;
        ``{"step": "finish", ..., "setup.<i>": bytes, "response.<i>": bytes}`` -> ``{"report": JSON str}`` (counts, and
        ``errors``: peer -> why its messages were refused).
        """
        step, session, rank = message.get("step"), message.get("session"), message.get("rank")
        if not isinstance(session, str) or not isinstance(rank, int):
            raise DedupProtocolError(f"dedup message needs 'session' (str) and 'rank' (int); got {session!r}, {rank!r}")
        if step == "request":
            return self.begin(session, rank, message.get("num_sites"))
        self._expect(session, rank)
        if step == "serve":
            return self.serve({peer: message[f"request.{peer}"] for peer in _peers(message, "request.")})
        if step == "finish":
            errors = {}
            for peer in _peers(message, "setup."):
                try:
                    self.client_finish(peer, message[f"setup.{peer}"], message.get(f"response.{peer}"))
                except DedupProtocolError as error:
                    log.warning("dedup: refused the messages of site %d: %s", peer, error)
                    errors[str(peer)] = str(error)
            return {"report": json.dumps({**self.finish_report(), "errors": errors})}
        raise DedupProtocolError(f"unknown dedup step {step!r}; valid: request, serve, finish")


def _as_row(value: Any, columns: tuple[str, ...], index: int) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    parts = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(parts) != len(columns):
        raise ValueError(f"record {index}: key {value!r} has {len(parts)} parts; dedup key {list(columns)} needs {len(columns)}")
    return dict(zip(columns, parts, strict=True))


def _peers(message: Mapping[str, Any], prefix: str) -> list[int]:
    peers = []
    for name in message:
        if name.startswith(prefix):
            suffix = name[len(prefix):]
            if not suffix.isdigit():
                raise DedupProtocolError(f"dedup message field {name!r}: expected {prefix}<rank>")
            peers.append(int(suffix))
    return sorted(peers)
