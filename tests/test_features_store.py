"""Feature store: idempotent chunks, JSON export/import, and durability under SIGKILL."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from graftfl.core.autoencoder import train_classifier
from graftfl.core.data import load_dataset
from graftfl.core.train import evaluate
from graftfl.strategies.features.store import Chunk, FeatureStore

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "features_ingest_worker.py"


def digits_chunks(num_sites: int = 3, chunk_size: int = 40) -> list[Chunk]:
    """Real digits images (flattened, standardised) as the sites' vectors, cut into chunks."""
    data = load_dataset("digits")
    x, y = data.train_x.flatten(1).numpy(), data.train_y.numpy()
    chunks = []
    for site, rows in enumerate(np.array_split(np.arange(len(y)), num_sites)):
        for number, start in enumerate(range(0, len(rows), chunk_size)):
            part = rows[start : start + chunk_size]
            chunks.append(Chunk(f"site-{site}", f"chunk-{number:05d}", start, y[part], x[part], message_id=f"msg-{site}-{number}"))
    return chunks


def key_of(chunk: Chunk) -> str:
    return f"{chunk.client_id}/{chunk.upload_id}"


# ------------------------------------------------------------ idempotency ---


def test_resent_chunk_adds_nothing(tmp_path):
    chunk = digits_chunks()[0]
    with FeatureStore(tmp_path / "features.db") as store:
        assert store.ingest_chunk(chunk) == len(chunk.labels)
        assert store.ingest_chunk(chunk) == 0
        resent = Chunk(chunk.client_id, chunk.upload_id, chunk.first_row, chunk.labels, chunk.vectors, message_id="another-message")
        assert store.ingest_chunk(resent) == 0
        assert store.count() == len(chunk.labels)
        other_site = Chunk("site-9", chunk.upload_id, chunk.first_row, chunk.labels, chunk.vectors)
        assert store.ingest_chunk(other_site) == len(chunk.labels)  # the key includes the client
        vectors, labels = store.load()
    assert vectors.shape == (2 * len(chunk.labels), chunk.vectors.shape[1])
    np.testing.assert_array_equal(vectors[: len(chunk.labels)], chunk.vectors)
    np.testing.assert_array_equal(labels[: len(chunk.labels)], chunk.labels)


def test_bad_chunks_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        Chunk("site-0", "chunk-0", 0, [1], np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="do not match"):
        Chunk("site-0", "chunk-0", 0, [1, 2], np.zeros((3, 4)))


# ------------------------------------------------------ JSON export/import ---


def test_export_import_round_trip(tmp_path):
    chunks = digits_chunks()[:3]
    source = FeatureStore(tmp_path / "a.db")
    for chunk in chunks:
        source.ingest_chunk(chunk)
    exported = tmp_path / "export.jsonl"
    assert source.export_json(exported) == source.count()
    first = json.loads(exported.read_text().splitlines()[0])
    assert set(first["message"]) == {"clientID", "label", "value", "mode", "timestamp"}
    assert first["message"]["mode"] == "learning" and len(first["message"]["value"]) == 64

    target = FeatureStore(tmp_path / "b.db")
    assert target.import_json(exported) == source.count()
    assert target.import_json(exported) == 0  # importing twice adds nothing
    assert source.import_json(exported) == 0  # nor does importing into the store it came from
    for (xa, ya), (xb, yb) in [(source.load(), target.load())]:
        np.testing.assert_array_equal(xa, xb)  # float32 survives the JSON trip exactly
        np.testing.assert_array_equal(ya, yb)

    plain = tmp_path / "paper.jsonl"  # the paper's schema alone, no graftfl key
    plain.write_text("\n".join(json.dumps({"message": json.loads(line)["message"]}) for line in exported.read_text().splitlines()[:5]) + "\n")
    fresh = FeatureStore(tmp_path / "c.db")
    assert fresh.import_json(plain) == 5
    assert fresh.import_json(plain) == 0

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"message": {"clientID": "site-0", "label": 1, "mode": "learning", "timestamp": "t"}}\n')
    with pytest.raises(ValueError, match="broken.jsonl:1"):
        fresh.import_json(broken)
    for store in (source, target, fresh):
        store.close()


# -------------------------------------------------------------- durability ---


class Worker:
    """The store-owning server process (tests/features_ingest_worker.py)."""

    def __init__(self, store: Path, die_inside: str | None = None):
        args = [sys.executable, str(WORKER), str(store)] + (["--die-inside", die_inside] if die_inside else [])
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert self.proc.stdout.readline().strip() == b"ready"

    def send(self, chunk: Chunk) -> None:
        pickle.dump(chunk, self.proc.stdin)
        self.proc.stdin.flush()

    def ack(self) -> str:
        line = self.proc.stdout.readline().decode().split()
        assert line and line[0] == "ack", f"expected an ack, got {line}"
        return line[1]

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


def classifier_accuracy(store: FeatureStore) -> float:
    x, y = store.load()
    model, _ = train_classifier(torch.from_numpy(x), torch.from_numpy(y), 10, epochs=15, seed=0)
    test = load_dataset("digits")
    return evaluate(model, test.test_x.flatten(1), test.test_y, device=torch.device("cpu"))["accuracy"]


@pytest.mark.slow  # kills an ingest subprocess mid-upload
def test_sigkill_while_uploading_loses_no_acknowledged_chunk(tmp_path):
    chunks = digits_chunks()
    size_of = {key_of(c): len(c.labels) for c in chunks}
    path = tmp_path / "features.db"

    # 1. The server dies with chunks in flight: 12 acknowledged, 2 more sent, then SIGKILL.
    worker = Worker(path)
    acknowledged = []
    for chunk in chunks[:12]:
        worker.send(chunk)
        acknowledged.append(worker.ack())
    worker.send(chunks[12])
    worker.send(chunks[13])
    worker.kill()
    assert worker.proc.returncode == -signal.SIGKILL

    # 2. The server dies inside a chunk's transaction (rows written, no COMMIT).
    poisoned = chunks[14]
    worker = Worker(path, die_inside=key_of(poisoned))
    worker.send(poisoned)
    assert worker.proc.wait(timeout=60) == -signal.SIGKILL

    with FeatureStore(path) as store:
        stored = {f"{client}/{upload}": n for (client, upload), n in store.upload_sizes().items()}
        keys = store.keys()
    for key in acknowledged:
        assert stored.get(key) == size_of[key], f"acknowledged chunk {key} is not whole in the store"
    assert all(n == size_of[key] for key, n in stored.items()), "a chunk is in the store only in part"
    assert key_of(poisoned) not in stored, "an uncommitted chunk survived the crash"
    assert len(keys) == len(set(keys))

    # 3. Restart; the sites re-send what was not acknowledged (and, here, everything else too).
    worker = Worker(path)
    for chunk in chunks:
        worker.send(chunk)
    replies = [worker.ack() for _ in chunks]
    worker.close()
    assert replies == [key_of(c) for c in chunks]
    with FeatureStore(path) as store:
        assert store.count() == sum(size_of.values())
        assert {f"{c}/{u}": n for (c, u), n in store.upload_sizes().items()} == size_of
        keys = store.keys()
        assert len(keys) == len(set(keys)) == sum(size_of.values())
        recovered_accuracy = classifier_accuracy(store)

    # 4. The classifier trained from the recovered store matches one trained without a crash.
    with FeatureStore(tmp_path / "reference.db") as reference:
        for chunk in chunks:
            reference.ingest_chunk(chunk)
        reference_accuracy = classifier_accuracy(reference)
    assert reference_accuracy > 0.8  # it learned something real from the stored vectors
    assert abs(recovered_accuracy - reference_accuracy) <= 0.02
