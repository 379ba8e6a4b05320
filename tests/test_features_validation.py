"""The features server refuses bad site replies (uploads and service mode) and goes on with the others.

Drives :class:`FeatureRun` directly through a scripted grid: no Flower simulation.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import Metadata

from graftfl.config import compose_config
from graftfl.strategies.features import UPLOAD_ATTEMPTS, FeatureRun, client_id_of
from graftfl.strategies.features.classifier import ServedClassifier
from graftfl.strategies.features.store import Chunk, ChunkRules, FeatureStore, InvalidChunk
from graftfl.strategies.utils import ServerRun
from tests.conftest import flower_task_identity
from tests.helpers import FakeGrid

LATENT, CHUNK_SIZE, NUM_CLASSES, ROWS_PER_SITE = 8, 4, 10, 8  # digits: 10 classes
HONEST = 11


def site_rows(node: int) -> tuple[np.ndarray, np.ndarray]:
    """A site's whole labelled latent matrix (deterministic per node)."""
    rng = np.random.default_rng(node)
    return rng.normal(size=(ROWS_PER_SITE, LATENT)).astype(np.float32), rng.integers(0, NUM_CLASSES, ROWS_PER_SITE)


def honest_upload(message: Message) -> dict:
    """What a well-behaved site sends for one upload request (the parts a tamperer may change)."""
    config = message.content["config"]
    first = int(config["chunk"]) * int(config["chunk_size"])
    latents, labels = site_rows(message.metadata.dst_node_id)
    return {
        "latents": latents[first : first + CHUNK_SIZE],
        "labels": labels[first : first + CHUNK_SIZE],
        "upload": {"client_id": str(config["client_id"]), "upload_id": str(config["upload_id"]), "first_row": first, "num_chunks": ROWS_PER_SITE // CHUNK_SIZE},
    }


def nan_latents(parts):
    parts["latents"] = parts["latents"].copy()
    parts["latents"][1, 2] = np.nan


def wrong_length(parts):
    parts["latents"] = parts["latents"][:, :-1]


def label_out_of_range(parts):
    parts["labels"] = parts["labels"].copy()
    parts["labels"][0] = NUM_CLASSES


def row_mismatch(parts):
    parts["labels"] = parts["labels"][:-1]


def spoofed_client_id(parts):
    parts["upload"]["client_id"] = client_id_of(HONEST)  # writes (or pre-claims) the honest site's rows


def float_labels(parts):
    parts["labels"] = parts["labels"].astype(np.float32) + 0.5


def other_chunk(parts):
    parts["upload"]["first_row"] += CHUNK_SIZE  # claims rows the server did not ask for


def no_upload_record(parts):
    del parts["upload"]


TAMPERED = {  # node -> (how its replies are broken, what the rejection must say)
    21: (nan_latents, "1 non-finite latent values"),
    22: (wrong_length, f"latent length {LATENT - 1}, expected latent_dim={LATENT}"),
    23: (label_out_of_range, f"outside [0, {NUM_CLASSES})"),
    24: (row_mismatch, f"{CHUNK_SIZE} latent rows do not match labels of shape ({CHUNK_SIZE - 1},)"),
    25: (spoofed_client_id, f"claims client_id='{client_id_of(HONEST)}', the server expects '{client_id_of(25)}'"),
    26: (float_labels, "labels of dtype float32, expected integers"),
    27: (other_chunk, "claims first_row=4, the server expects 0"),
    28: (no_upload_record, "reply carries no 'upload' config record"),
}


@pytest.fixture(autouse=True)
def server_task_identity():
    """Instruction messages need a run and task id (set by Flower inside a real ServerApp)."""
    with flower_task_identity():
        yield


def reply_to(message: Message, content: RecordDict, message_id: str) -> Message:
    node = message.metadata.dst_node_id
    metadata = Metadata(run_id=1, message_id=message_id, src_node_id=node, dst_node_id=0, reply_to_message_id="", group_id="",
                        created_at=time.time(), ttl=60.0, message_type=message.metadata.message_type)
    return Message(content, metadata=metadata)


def upload_content(message: Message) -> RecordDict:
    parts = honest_upload(message)
    tamper = TAMPERED.get(message.metadata.dst_node_id, (lambda parts: None, None))[0]
    tamper(parts)
    content = RecordDict({"arrays": ArrayRecord({"latents": torch.from_numpy(parts["latents"]), "labels": torch.from_numpy(parts["labels"])})})
    if "upload" in parts:
        content["upload"] = ConfigRecord(parts["upload"])
    return content


def ScriptedGrid(nodes: list[int], respond) -> FakeGrid:
    """The shared grid answering every message at once with ``respond(message)``; replies of bad sites come first."""
    return FakeGrid(nodes=nodes, respond=respond, reply_order=lambda reply: reply.metadata.src_node_id == HONEST)


def feature_run(tmp_path, grid: FakeGrid) -> FeatureRun:
    cfg = compose_config(["protocol=features", "dataset=digits", f"num_clients={len(grid.nodes)}", f"protocol.latent_dim={LATENT}", f"protocol.chunk_size={CHUNK_SIZE}", "protocol.store_synchronous=OFF"])
    return FeatureRun(grid, ServerRun(cfg, tmp_path / "run"))


# ----------------------------------------------------------------- uploads ---


def test_bad_chunks_are_rejected_and_the_honest_site_is_stored(tmp_path):
    features = feature_run(tmp_path, ScriptedGrid([HONEST, *TAMPERED], upload_content))
    assert features.upload_all(None, None) == ROWS_PER_SITE

    vectors, labels = features.store.load()  # only the honest site's rows, exactly, under its server-given name
    expected_vectors, expected_labels = site_rows(HONEST)
    np.testing.assert_array_equal(vectors, expected_vectors)
    np.testing.assert_array_equal(labels, expected_labels)
    assert features.store.upload_sizes() == {(client_id_of(HONEST), "chunk-00000"): 4, (client_id_of(HONEST), "chunk-00001"): 4}

    for node, (_, reason) in TAMPERED.items():
        refused = [entry for entry in features.rejections if entry["node"] == node]
        assert len(refused) == UPLOAD_ATTEMPTS, node  # asked again, then left out
        assert all(entry["phase"] == "upload" and entry["chunk"] == 0 and reason in entry["reason"] for entry in refused), refused
        assert features.acknowledged[node] == []  # never acknowledged
    assert not [entry for entry in features.rejections if entry["node"] == HONEST]
    assert features.acknowledged[HONEST] == [f"{client_id_of(HONEST)}/chunk-00001"]

    rows = [row for row in features.run.recorder.rows if row["phase"] == "upload"]
    assert sum(len(row["rejected"]) for row in rows) == len(TAMPERED) * UPLOAD_ATTEMPTS
    assert features.rejection_counts()["rejected_chunks"] == len(TAMPERED) * UPLOAD_ATTEMPTS
    assert all(str(m.content["config"]["client_id"]) == client_id_of(m.metadata.dst_node_id) for m in features.grid.sent)


def test_a_resent_chunk_keeps_its_key_and_adds_nothing(tmp_path):
    features = feature_run(tmp_path, ScriptedGrid([HONEST], upload_content))
    request = features.upload_message(HONEST, 1, None)
    first = reply_to(request, upload_content(request), "msg-a")
    again = reply_to(request, upload_content(request), "msg-b")  # the same chunk in another message
    chunk, num_chunks = features.chunk_from(first, 1)
    assert (chunk.client_id, chunk.upload_id, chunk.first_row, num_chunks) == (client_id_of(HONEST), "chunk-00001", CHUNK_SIZE, 2)
    assert features.store.ingest_chunk(chunk) == CHUNK_SIZE
    assert features.store.ingest_chunk(features.chunk_from(again, 1)[0]) == 0
    with pytest.raises(InvalidChunk, match="upload_id='chunk-00001', the server expects 'chunk-00000'"):
        features.chunk_from(again, 0)  # an answer to another request


@pytest.mark.parametrize(
    ("vectors", "labels", "reason"),
    [
        (np.full((2, LATENT), np.inf, dtype=np.float32), [0, 1], "16 non-finite latent values"),
        (np.full((2, LATENT), 1e300), [0, 1], "non-finite"),  # float64 beyond float32
        (np.zeros((2, LATENT), dtype=np.int64), [0, 1], "latents of dtype int64"),
        (np.zeros((CHUNK_SIZE + 1, LATENT), dtype=np.float32), [0] * (CHUNK_SIZE + 1), f"more than chunk_size={CHUNK_SIZE}"),
        (np.zeros((2, LATENT), dtype=np.float32), [0, -1], "outside [0, 10)"),
        (np.zeros(LATENT, dtype=np.float32), [0], "expected (rows, latent_dim)"),
    ],
)
def test_chunk_rules_give_the_reason(vectors, labels, reason):
    assert reason in ChunkRules(latent_dim=LATENT, num_classes=NUM_CLASSES, max_rows=CHUNK_SIZE).problem(vectors, np.asarray(labels))


def test_a_store_with_rules_refuses_a_bad_chunk_and_writes_nothing(tmp_path):
    with FeatureStore(tmp_path / "features.db", rules=ChunkRules(latent_dim=LATENT, num_classes=3)) as store:
        with pytest.raises(InvalidChunk, match="site-0/chunk-0: 1 labels outside"):
            store.ingest_chunk(Chunk("site-0", "chunk-0", 0, [0, 3], np.zeros((2, LATENT))))
        with pytest.raises(InvalidChunk, match="latent length 4"):
            store.ingest_chunk(Chunk("site-0", "chunk-1", 0, [0, 1], np.zeros((2, 4))))
        assert store.count() == 0
        assert store.ingest_chunk(Chunk("site-0", "chunk-2", 0, [0, 2], np.zeros((2, LATENT)))) == 2


# ------------------------------------------------------------ service mode ---

TEST_IMAGES = 5


def service_content(message: Message) -> RecordDict:
    node, kind = message.metadata.dst_node_id, message.metadata.message_type
    if kind.startswith("query."):
        latents = np.random.default_rng(node).normal(size=(TEST_IMAGES, LATENT)).astype(np.float32)
        claimed = str(message.content["config"]["client_id"])
        if node == 31:
            latents[0, 0] = np.nan
        if node == 32:
            latents = latents[:, :3]
        if node == 33:
            claimed = client_id_of(HONEST)
        return RecordDict({"arrays": ArrayRecord({"latents": torch.from_numpy(latents)}), "upload": ConfigRecord({"client_id": claimed, "mode": "service"})})
    answered = len(message.content["arrays"]["predictions"].numpy())
    count = [answered] + [0] * (NUM_CLASSES - 1)
    metrics = {"correct_by_class": count, "count_by_class": count, "error_sum_by_class": [1.0] * NUM_CLASSES, "error_count_by_class": [1] * NUM_CLASSES}
    if node == 34:
        metrics["count_by_class"] = [answered + 100] + [0] * (NUM_CLASSES - 1)
    if node == 35:
        metrics["error_sum_by_class"] = [1.0] * 3
    return RecordDict({"metrics": MetricRecord(metrics), "files": ConfigRecord({"figure": f"/sites/{node}.png"})})


def test_bad_service_replies_are_rejected_and_the_others_scored(tmp_path):
    grid = ScriptedGrid([HONEST, 31, 32, 33, 34, 35], service_content)
    features = feature_run(tmp_path, grid)
    features.served = ServedClassifier(torch.nn.Linear(LATENT, NUM_CLASSES))
    tables = features.service_round()

    assert tables["test_samples"] == TEST_IMAGES and tables["figures"] == [f"/sites/{HONEST}.png"]
    reasons = {entry["node"]: entry["reason"] for entry in features.rejections}
    assert set(reasons) == {31, 32, 33, 34, 35}
    assert reasons[31] == "1 non-finite latent values"
    assert reasons[32] == f"latent length 3, expected latent_dim={LATENT}"
    assert reasons[33].startswith(f"claims client_id='{client_id_of(HONEST)}'")
    assert reasons[34] == f"scored {TEST_IMAGES + 100} test images, the server answered {TEST_IMAGES}"
    assert reasons[35] == f"error_sum_by_class is not a list of {NUM_CLASSES} numbers"
    evaluated = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type.startswith("evaluate.")}
    assert evaluated == {HONEST, 34, 35}  # refused latents get no answer
    row = features.run.recorder.rows[-1]
    assert row["phase"] == "service" and row["served_samples"] == 3 * TEST_IMAGES and len(row["rejected"]) == 5
    assert features.rejection_counts()["rejected_service_replies"] == 5


# ----------------------------------------------------------------- traffic ---


def test_bytes_are_every_serialized_message_both_ways_refused_replies_included(tmp_path):
    """Issue 11: bytes are the serialized Flower messages (config included), not the tensor payloads."""
    from graftfl.strategies.wire_bytes import message_nbytes

    grid = ScriptedGrid([HONEST, *TAMPERED], upload_content)
    features = feature_run(tmp_path, grid)
    features.upload_all(None, None)
    rows = [row for row in features.run.recorder.rows if row["phase"] == "upload"]
    assert sum(row["bytes_down"] for row in rows) == sum(message_nbytes(m) for m in grid.sent)
    assert sum(row["bytes_up"] for row in rows) == sum(message_nbytes(r) for r in grid.replies)  # the refused chunks travelled too
    payload_down = 0  # upload requests carry no tensors: the old count (tensor payloads) said 0 bytes went down
    assert all(row["bytes_down"] > payload_down for row in rows)
    first = rows[0]
    latents_and_labels = sum(a.numpy().nbytes for r in grid.replies[: len(grid.nodes)] for a in r.content["arrays"].values())
    assert first["bytes_up"] > latents_and_labels  # metadata and the upload record on top of the payload

    service_grid = ScriptedGrid([HONEST, 31, 32, 33, 34, 35], service_content)
    service = feature_run(tmp_path / "service", service_grid)
    service.served = ServedClassifier(torch.nn.Linear(LATENT, NUM_CLASSES))
    service.service_round()
    row = service.run.recorder.rows[-1]
    assert row["bytes_down"] == sum(message_nbytes(m) for m in service_grid.sent)  # queries and answers
    assert row["bytes_up"] == sum(message_nbytes(r) for r in service_grid.replies)  # latents and scores
