"""Cross-site de-duplication with pairwise PSI (graftfl.core.dedup): exactness, leakage, failures."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json

import numpy as np
import pytest

from graftfl.core.dedup import (
    BandScheme,
    DedupConfig,
    DedupCoordinator,
    DedupKeyError,
    DedupProtocolError,
    DedupSite,
    KeySpec,
    SaltedKeys,
    Transcript,
    hamming,
    image_phash,
    near_duplicate_pairs,
    record_keys,
    resolve_salt,
    run_pairwise_dedup,
)
from tests.helpers.leaks import identifier_needles

SALT = "test-federation-salt-0123456789abcdef"


def make_sites(seed: int = 0):
    """Three sites with known overlaps: pairwise (0,1), (0,2), (1,2), three-way, and unique patients.

    Every patient has 1-3 records; each record is (identifier as written at that site, part)
    where part is 'train' or 'heldout'. Sites write the same identifier differently.
    """
    rng = np.random.default_rng(seed)
    holders = {}
    for n in range(30):
        holders[f"MRN-U{n:04d}"] = [n % 3]
    for n, pair in enumerate([(0, 1)] * 5 + [(0, 2)] * 4 + [(1, 2)] * 6):
        holders[f"MRN-P{n:04d}"] = list(pair)
    for n in range(3):
        holders[f"MRN-T{n:04d}"] = [0, 1, 2]
    spellings = [lambda s: s, lambda s: f"  {s.lower()} ", lambda s: s.upper().replace("-", "-")]
    records = {rank: [] for rank in range(3)}
    for patient, sites in holders.items():
        for rank in sites:
            for _ in range(int(rng.integers(1, 4))):
                part = "heldout" if rng.random() < 0.25 else "train"
                records[rank].append((spellings[rank](patient), part, patient))
    for rank, rows in records.items():
        records[rank] = [rows[i] for i in rng.permutation(len(rows))]
    return holders, records


@pytest.mark.parametrize("structure", ["raw", "gcs"])
def test_three_sites_no_patient_twice_and_no_false_removal(structure):
    holders, records = make_sites()
    config = DedupConfig(data_structure=structure)
    sites = [DedupSite([written for written, _, _ in records[rank]], SALT, config) for rank in range(3)]
    report = run_pairwise_dedup(sites)
    kept = {rank: {truth for index, (_, _, truth) in enumerate(records[rank]) if index not in set(sites[rank].dropped_records())} for rank in range(3)}
    for patient, holding in holders.items():
        keepers = [rank for rank in range(3) if patient in kept[rank]]
        assert keepers == [min(holding)], (patient, holding, keepers)
    for rank in range(3):
        dropped = set(sites[rank].dropped_records())
        for index, (_, part, truth) in enumerate(records[rank]):
            # all records of a duplicate patient go (training and held-out alike), no others
            assert (index in dropped) == (min(holders[truth]) < rank), (rank, truth, part)
    overlaps = {tuple(p["pair"]): p["overlap_patients"] for p in report["pairs"]}
    truth = {(i, j): sum(1 for h in holders.values() if i in h and j in h) for i, j in itertools.combinations(range(3), 2)}
    assert overlaps == truth == {(0, 1): 8, (0, 2): 7, (1, 2): 9}
    assert report["not_checked"] == [] and report["totals"]["pairs_checked"] == 3
    assert report["totals"]["dropped_records"] == sum(len(s.dropped_records()) for s in sites) > 0
    assert all(p["bytes_relayed"] > 0 and p["seconds"] >= 0 for p in report["pairs"])
    json.dumps(report)  # ready for runs/<id>/dedup.json


def test_transcript_holds_no_identifier_nor_unsalted_hash():
    holders, records = make_sites(seed=1)
    sites = [DedupSite([written for written, _, _ in records[rank]], SALT) for rank in range(3)]
    transcript = Transcript()
    run_pairwise_dedup(sites, transcript)
    blob = b"\n".join(transcript.blobs())
    assert len(transcript.entries) >= 3 + 2 + 2 + 2  # requests/replies of the three steps, both ways
    spec, salted = KeySpec(), SaltedKeys.from_salt(SALT)
    needles = []
    for patient in holders:
        needles += [*identifier_needles(patient, spec, salted), patient.split("-")[1].encode()]
    found = [needle for needle in needles if needle in blob]
    assert not found, f"transcript leaks {found[:3]}"
    assert SALT.encode() not in blob and salted.mac_key not in blob and salted.element_key not in blob


def test_key_normalization_and_composite_keys():
    spec = KeySpec()
    assert spec.key({"patient_id": " Alice "}) == spec.key({"patient_id": "alice"}) == spec.key({"patient_id": "ALICE"})
    assert spec.key({"patient_id": "ＡＢ１２"}) == spec.key({"patient_id": "ab12"})  # full-width forms (NFKC)
    assert spec.key({"patient_id": "Straße"}) == spec.key({"patient_id": "STRASSE"})  # case-folding, not lower()
    assert spec.key({"patient_id": "a  b"}) == spec.key({"patient_id": "a b"})
    composite = KeySpec(columns="name|birth_date|sex")
    assert composite.columns == ("name", "birth_date", "sex")
    row = {"name": " Alice  Smith", "birth_date": "1990-01-02", "sex": "F"}
    assert composite.key(row) == composite.key({"name": "alice smith", "birth_date": "1990-01-02 ", "sex": "f"})
    assert composite.key(row) != composite.key({**row, "birth_date": "1990-01-03"})
    # the separator cannot be forged by a value that contains it
    two = KeySpec(columns=("a", "b"))
    assert two.key({"a": "x|1:y", "b": "z"}) != two.key({"a": "x", "b": "y|1:z"})
    assert two.key({"a": "x|y", "b": "z"}) != two.key({"a": "x", "b": "y|z"})
    with pytest.raises(DedupKeyError, match="empty 'sex'"):
        composite.key({**row, "sex": "  "})
    with pytest.raises(DedupKeyError, match="no column 'birth_date'"):
        composite.key({"name": "x", "sex": "f"})
    assert record_keys([{"patient_id": "A"}, {"patient_id": "a "}], spec) == ["1:a", "1:a"]

    config = DedupConfig(key="name|birth_date|sex")
    site_a = DedupSite([("Alice Smith", "1990-01-02", "F"), ("Bob", "1980-05-05", "M")], SALT, config)
    site_b = DedupSite([(" alice smith", "1990-01-02", "f"), ("Bob", "1980-05-06", "M"), {"name": "BOB", "birth_date": "1980-05-05", "sex": "m"}], SALT, config)
    report = run_pairwise_dedup([site_a, site_b])
    assert report["pairs"][0]["overlap_patients"] == 2 and site_b.dropped_records() == [0, 2]
    with pytest.raises(ValueError, match="needs 3"):
        DedupSite([("Alice", "1990-01-02")], SALT, config)


def test_different_salt_gives_other_elements_and_no_match():
    spec = KeySpec()
    key = spec.key({"patient_id": "MRN-1"})
    one, other = SaltedKeys.from_salt(SALT), SaltedKeys.from_salt(SALT + "-other")
    assert one.element("patient", spec.domain, key) != other.element("patient", spec.domain, key)
    assert one.element("patient", spec.domain, key) == SaltedKeys.from_salt(SALT).element("patient", spec.domain, key)
    # two sites with different salts: nothing matches, and the mismatch is reported, not silent
    sites = [DedupSite(["MRN-1", "MRN-2"], SALT), DedupSite(["MRN-1"], SALT + "-other")]
    report = run_pairwise_dedup(sites)
    assert sites[1].dropped_records() == [] and report["not_checked"] == [[0, 1]]
    assert "authentication failed" in report["pairs"][0]["reason"]


def test_salt_comes_from_node_config_or_environment():
    assert resolve_salt({"dedup-salt": SALT}, {}) == SALT.encode()
    assert resolve_salt({}, {"GRAFTFL_DEDUP_SALT": SALT}) == SALT.encode()
    with pytest.raises(DedupKeyError, match="dedup-salt"):
        resolve_salt({}, {})
    with pytest.raises(DedupKeyError, match="at least 16"):
        resolve_salt({"dedup-salt": "short"}, {})


class FailingSite:
    """A site that raises (or is treated as timed out) at one step."""

    def __init__(self, site: DedupSite, step: str, timeout: bool = False):
        self.site, self.step, self.timeout = site, step, timeout

    def handle(self, message):
        if message["step"] == self.step:
            raise TimeoutError("no reply within the phase timeout") if self.timeout else RuntimeError("disk unreadable")
        return self.site.handle(message)


@pytest.mark.parametrize("failing,step,unchecked", [
    (0, "serve", [[0, 1], [0, 2]]),
    (1, "request", [[0, 1], [1, 2]]),
    (2, "finish", [[0, 2], [1, 2]]),
])
def test_failing_site_is_reported_and_other_pairs_apply(failing, step, unchecked):
    _, records = make_sites(seed=2)
    sites = [DedupSite([written for written, _, _ in records[rank]], SALT) for rank in range(3)]
    endpoints = list(sites)
    endpoints[failing] = FailingSite(sites[failing], step, timeout=failing == 1)
    report = run_pairwise_dedup(endpoints)
    assert report["not_checked"] == unchecked
    assert report["sites"][failing]["status"] == "failed" and report["sites"][failing]["error"].startswith(step)
    (checked,) = [tuple(p["pair"]) for p in report["pairs"] if p["status"] == "ok"]
    server, client = checked
    overlap = {truth for _, _, truth in records[server]} & {truth for _, _, truth in records[client]}
    dropped = set(sites[client].dropped_records())
    if client != failing:
        assert {records[client][i][2] for i in dropped} == overlap and overlap
    for pair in report["pairs"]:
        if pair["status"] != "ok":
            assert f"site {failing} failed" in pair["reason"]


class PermutingRelay(Transcript):
    """A malicious server: reorders the elements of one PSI response so the client drops the wrong records."""

    def relay(self, step, direction, rank, message):
        if step == "finish" and direction == "down" and rank == 1:
            from private_set_intersection.python import Response

            message = dict(message)
            frame = message["response.0"]
            start = frame.index(b"}") + 1
            parsed = Response()
            parsed.ParseFromString(frame[start:-32])
            elements = list(parsed.encrypted_elements)
            del parsed.encrypted_elements[:]
            parsed.encrypted_elements.extend(elements[1:] + elements[:1])
            message["response.0"] = frame[:start] + parsed.SerializeToString() + frame[-32:]
        return super().relay(step, direction, rank, message)


class ReaddressingRelay(Transcript):
    """A malicious server: hands site 2 the response computed for site 1."""

    def __init__(self):
        super().__init__()
        self.saved = None

    def relay(self, step, direction, rank, message):
        if step == "serve" and direction == "up" and rank == 0:
            self.saved = message["response.1"]
        if step == "finish" and direction == "down" and rank == 2:
            message = {**message, "response.0": self.saved}
        return super().relay(step, direction, rank, message)


@pytest.mark.parametrize("relay_cls", [PermutingRelay, ReaddressingRelay])
def test_relay_cannot_alter_psi_messages(relay_cls):
    patients = [f"MRN-{n}" for n in range(6)]
    sites = [DedupSite(patients[:4], SALT), DedupSite(patients[2:], SALT), DedupSite(patients[1:5], SALT)]
    report = run_pairwise_dedup(sites, relay_cls())
    victim = 1 if relay_cls is PermutingRelay else 2
    reason = {tuple(p["pair"]): p.get("reason", "") for p in report["pairs"]}[(0, victim)]
    assert f"site {victim} refused the messages of site 0" in reason
    assert ("authentication failed" if relay_cls is PermutingRelay else "receiver=1, expected 2") in reason
    # nothing dropped on the strength of a forged message; the honest pairs still apply
    assert report["not_checked"] == [[0, victim]] and all(site["status"] == "ok" for site in report["sites"])
    if victim == 1:
        assert sites[1].dropped_records() == [] and sites[2].dropped_records() == [0, 1, 2, 3]
    else:  # site 2 still drops what it shares with site 1 (MRN-2..4), not MRN-1 (shared with site 0 only)
        assert sites[2].dropped_records() == [1, 2, 3]


def test_open_envelope_refuses_forgery_and_oversize():
    site = DedupSite(["a-patient"], SALT)
    reply = site.begin("s1", 1, 2)
    other = DedupSite(["a-patient"], SALT)
    other.begin("s1", 0, 2)
    assert other.server_response(1, reply["request"])
    with pytest.raises(DedupProtocolError, match="authentication failed"):
        other.server_response(1, reply["request"][:-1] + bytes([reply["request"][-1] ^ 1]))
    with pytest.raises(DedupProtocolError, match="session"):
        fresh = DedupSite(["a-patient"], SALT)
        fresh.begin("s2", 0, 2)
        fresh.server_response(1, reply["request"])  # replayed from another session
    with pytest.raises(DedupProtocolError, match="higher-ranked"):
        other.server_response(0, reply["request"])
    # a well-tagged frame whose header is garbage (only a salt holder could make one) is refused, not a crash
    import struct

    from graftfl.core.dedup.wire import MAGIC

    body = MAGIC + struct.pack(">I", 3) + b"[1]" + b"payload"
    forged = body + hmac.new(SaltedKeys.from_salt(SALT).mac_key, body, hashlib.sha256).digest()
    with pytest.raises(DedupProtocolError, match="not a JSON object"):
        other.server_response(1, forged)
    for body, reason in ((MAGIC + struct.pack(">I", 999) + b"{}", r"from site 1: header length 999 is invalid"),
                         (MAGIC + struct.pack(">I", 3) + b"{x}", r"from site 1: header is not JSON")):
        tagged = body + hmac.new(SaltedKeys.from_salt(SALT).mac_key, body, hashlib.sha256).digest()
        with pytest.raises(DedupProtocolError, match=reason):
            other.server_response(1, tagged)
    small = DedupSite(["a-patient"], SALT, DedupConfig(max_message_bytes=1024))
    small.begin("s1", 0, 2)
    with pytest.raises(DedupProtocolError, match="exceeds the limit"):
        small.server_response(1, reply["request"] + b"\0" * 2048)


def test_oversized_request_is_refused_by_the_serving_site():
    config = DedupConfig(max_peer_items=3)
    sites = [DedupSite(["a", "b"], SALT, config), DedupSite(["a", "b", "c", "d"], SALT, config)]
    report = run_pairwise_dedup(sites)
    assert report["not_checked"] == [[0, 1]] and "max_peer_items" in report["pairs"][0]["reason"]
    assert sites[1].dropped_records() == []


def test_out_of_range_indices_from_the_library_are_discarded(monkeypatch):
    import private_set_intersection.python as psi

    real = psi.client.GetIntersection
    monkeypatch.setattr(psi.client, "GetIntersection", lambda self, setup, response: list(real(self, setup, response)) + [-1, 3, 10**6])
    sites = [DedupSite(["a", "b"], SALT), DedupSite(["b", "c", "x"], SALT)]
    report = run_pairwise_dedup(sites)
    assert sites[1].dropped_records() == [0] and report["pairs"][0]["overlap_patients"] == 1


@pytest.mark.parametrize("structure", ["raw", "gcs"])
def test_fresh_site_object_per_step_from_secret_state(structure):
    """Deployment starts a fresh process per message: a site rebuilt from its secret state gives the same result."""
    config = DedupConfig(data_structure=structure)
    data = [["p1", "p2", "p3"], ["p3", "p4", "p1", "p1"]]
    state = {0: None, 1: None}

    class Rebuilt:
        def __init__(self, rank):
            self.rank = rank

        def handle(self, message):
            site = DedupSite(data[self.rank], SALT, config, secret_state=state[self.rank])
            reply = site.handle(message)
            state[self.rank] = site.secret_state()
            return reply

    report = run_pairwise_dedup([Rebuilt(0), Rebuilt(1)])
    assert report["pairs"][0]["overlap_patients"] == 2
    final = DedupSite(data[1], SALT, config, secret_state=state[1])
    assert final.dropped_records() == [0, 2, 3]
    assert b"p1" not in state[1]["dedup.state"]
    with pytest.raises(DedupProtocolError, match="changed between steps"):
        DedupSite(["p9"], SALT, config, secret_state=state[1])


def test_config_refuses_weak_or_unknown_settings():
    with pytest.raises(ValueError, match="fpr"):
        DedupConfig(fpr=1e-6)
    with pytest.raises(ValueError, match="valid"):
        DedupConfig.from_mapping({"fpr": 1e-10, "salt": "from-the-server"})
    with pytest.raises(ValueError, match="images"):
        DedupConfig(images="sift")
    with pytest.raises(ValueError, match="at most"):
        DedupConfig(images="phash", image_bands=20, image_max_distance=6)
    assert DedupConfig.from_mapping({"key": "name|birth_date|sex", "images": "phash"}).band_scheme().elements_per_image == 56


def test_single_site_and_bad_replies_do_not_break_the_coordinator():
    assert run_pairwise_dedup([DedupSite(["a"], SALT)])["pairs"] == []
    coordinator = DedupCoordinator(2, session="s")
    sent = coordinator.outbound("request")
    coordinator.accept("request", sent, {0: {"elements": -5}, 1: "garbage"})
    assert set(coordinator.failed) == {0, 1} and coordinator.outbound("serve") == {}
    assert coordinator.report()["not_checked"] == [[0, 1]]


WHOLE_RESULT = ('{"pairs": {"0": {"overlap_patients": 0, "matched_images": 0, "dropped_records": 0, "seconds": 0}}, '
                '"records": 1, "patients": 1, "dropped_records": 0}')


@pytest.mark.parametrize("report", ["[]", '{"pairs": {"0": 5}}', WHOLE_RESULT])
def test_a_finish_report_of_the_wrong_shape_fails_its_site_not_the_server(report):
    """A report that is not an object, a pair result that is not one, a pair whose response the site was not sent
    (a lower-ranked site failed honestly): each raised in the server (AttributeError, KeyError in the phase report)."""
    coordinator = DedupCoordinator(2, session="s")
    coordinator.accept("finish", {1: {}}, {1: {"report": report}})
    assert set(coordinator.failed) == {1} and "bad reply" in coordinator.failed[1]
    assert coordinator.report()["not_checked"] == [[0, 1]]


def test_a_report_nested_past_the_json_parser_fails_its_site_not_the_server():
    coordinator = DedupCoordinator(2, session="s")
    deep = "[" * 200_000 + "]" * 200_000  # under the report's 1 MiB limit
    coordinator.accept("finish", {1: {}}, {1: {"report": deep}})
    assert set(coordinator.failed) == {1} and "RecursionError" in coordinator.failed[1]


# ----------------------------------------------------------------- images ---

def _blocks_image(seed: int, size: int = 128) -> np.ndarray:
    """A synthetic grey image (8 x 8 random blocks); numpy only, so `make test` needs no image package."""
    return np.kron(np.random.default_rng(seed).random((8, 8)), np.ones((size // 8, size // 8)))


def test_band_scheme_catches_every_pair_within_the_distance():
    rng = np.random.default_rng(3)
    for bands, distance in [(4, 3), (8, 3), (6, 2)]:
        scheme = BandScheme(bands, distance)
        for _ in range(200):
            base = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
            flipped = base
            for bit in rng.choice(64, size=int(rng.integers(0, distance + 1)), replace=False):
                flipped ^= 1 << int(bit)
            assert set(scheme.values(base)) & set(scheme.values(flipped))
    # and unrelated hashes rarely share an element with the default scheme
    scheme = BandScheme()
    randoms = [int(v) for v in rng.integers(0, 2**62, size=300)]
    assert len(near_duplicate_pairs(randoms[:150], randoms[150:], scheme)) == 0
    assert scheme.random_pair_match_probability() < 1e-10 < BandScheme(4, 3).random_pair_match_probability()


def test_phash_bands_find_a_lightly_noised_image():
    rng = np.random.default_rng(0)
    original = _blocks_image(1)
    noisy = np.clip(original + rng.normal(0, 0.1, original.shape), 0, 1)
    hashes_a = [image_phash(original), image_phash(_blocks_image(2)), image_phash((_blocks_image(3) * 255).astype(np.uint8))]
    hashes_b = [image_phash(_blocks_image(4)), image_phash(noisy)]
    assert 0 < hamming(hashes_a[0], hashes_b[1]) <= 3, "the copy should be near, not identical"
    assert min(hamming(a, b) for a in hashes_a for b in hashes_b if (a, b) != (hashes_a[0], hashes_b[1])) > 10
    config = DedupConfig(images="phash")
    # different patient ids: only the image links the two records
    site_a = DedupSite(["p-1", "p-2", "p-3"], SALT, config, image_hashes=hashes_a)
    site_b = DedupSite(["q-1", "q-2"], SALT, config, image_hashes=hashes_b)
    report = run_pairwise_dedup([site_a, site_b])
    pair = report["pairs"][0]
    assert pair["matched_images"] == 1 and pair["overlap_patients"] == 0 and report["totals"]["matched_images"] == 1
    assert site_b.dropped_records() == [1]
    assert near_duplicate_pairs(hashes_a, hashes_b, config.band_scheme()) == {(0, 1)}


def test_gcs_setup_the_library_cannot_build_falls_back_to_exact_raw(monkeypatch, caplog):
    import private_set_intersection.python as psi

    real = psi.server.CreateSetupMessage

    def refuse_gcs(self, fpr, num_client_inputs, inputs, ds=psi.DataStructure.GCS):
        if ds == psi.DataStructure.GCS:
            raise ValueError("basic_string::_M_replace_aux")  # what openmined-psi 2.0.6 raises for small sets vs large requests
        return real(self, fpr, num_client_inputs, inputs, ds)

    monkeypatch.setattr(psi.server, "CreateSetupMessage", refuse_gcs)
    config = DedupConfig(data_structure="gcs")
    sites = [DedupSite(["a", "b", "c"], SALT, config), DedupSite(["c", "d", "a"], SALT, config)]
    report = run_pairwise_dedup(sites)
    assert report["pairs"][0]["overlap_patients"] == 2 and sites[1].dropped_records() == [0, 2]
    assert "RAW setup instead" in caplog.text
