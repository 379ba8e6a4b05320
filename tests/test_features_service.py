"""The prediction service over real loopback HTTP, and the online retrain loop."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
import torch

from graftfl.commands.feature_service import BackgroundServer, create_app
from graftfl.core.autoencoder import train_classifier
from graftfl.strategies.features.classifier import OnlineTrainer, ServedClassifier
from graftfl.strategies.features.store import Chunk, FeatureStore

LATENT = 16


def clustered(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separable generated latents: class c lies around a point of its own."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(4, LATENT))
    labels = rng.integers(0, 4, size=n)
    return (centres[labels] + rng.normal(0, 0.5, size=(n, LATENT))).astype(np.float32), labels


@pytest.fixture(scope="module")
def service():
    x, y = clustered(400)
    model, _ = train_classifier(torch.from_numpy(x), torch.from_numpy(y), 4, epochs=5)
    with BackgroundServer(create_app(ServedClassifier(model), LATENT, max_body_bytes=4096)) as server:
        yield server, model


def service_message(value, **changes) -> dict:
    message = {"clientID": "site-0", "value": value, "mode": "service", "timestamp": "2026-11-22T05:00:00Z", **changes}
    return {"message": {k: v for k, v in message.items() if v is not None}}


def test_predict_answers_with_the_paper_schema(service):
    server, model = service
    x, _ = clustered(8, seed=1)
    expected = model(torch.from_numpy(x)).argmax(dim=1).tolist()
    with httpx.Client(base_url=server.url) as client:
        answers = [client.post("/predict", json=service_message(v.tolist())) for v in x]
    assert all(a.status_code == 200 for a in answers)
    assert [a.json()["message"]["label"] for a in answers] == expected
    assert answers[0].json() == {"message": {"clientID": "site-0", "label": expected[0], "timestamp": "2026-11-22T05:00:00Z"}}


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (service_message([0.5] * (LATENT - 1)), 422, f"length {LATENT}"),
        (service_message([0.5] * (LATENT + 3)), 422, f"length {LATENT}"),
        (service_message(["0.5"] * LATENT), 422, "message.value.0: Input should be a valid number"),
        (service_message([0.5] * (LATENT - 1) + [True]), 422, "message.value"),
        (service_message([0.5] * LATENT, clientID=None), 422, "message.clientID: Field required"),
        ({"message": {"clientID": "site-0", "mode": "service"}}, 422, "message.value: Field required"),
        (service_message([0.5] * LATENT, mode=None), 422, "message.mode: Field required"),
        (service_message([0.5] * LATENT, mode="learning"), 422, "'service'"),
        ({"clientID": "site-0", "value": [0.5] * LATENT, "mode": "service"}, 422, "message: Field required"),
        (service_message([0.5] * 2000), 413, "over 4096 bytes"),
    ],
    ids=["short", "long", "strings", "bool", "no-client", "no-value", "no-mode", "learning-mode", "no-envelope", "too-large"],
)
def test_bad_requests_are_refused_and_the_service_stays_up(service, body, status, says):
    server, _ = service
    with httpx.Client(base_url=server.url) as client:
        answer = client.post("/predict", json=body)
        assert answer.status_code == status, answer.text
        assert says in answer.json()["detail"]
        assert client.post("/predict", json=service_message([0.1] * LATENT)).status_code == 200


def test_non_json_nan_and_chunked_oversize(service):
    server, _ = service
    with httpx.Client(base_url=server.url) as client:
        garbled = client.post("/predict", content=b'{"message": {"clientID": ', headers={"content-type": "application/json"})
        assert garbled.status_code == 422 and "not valid JSON" in garbled.json()["detail"]
        nan = b'{"message": {"clientID": "a", "mode": "service", "value": [NaN' + b", 0.1" * (LATENT - 1) + b"]}}"
        answer = client.post("/predict", content=nan, headers={"content-type": "application/json"})
        assert answer.status_code == 422 and "finite" in answer.json()["detail"]

        def streamed():  # no content-length: the limit is enforced while reading
            for _ in range(100):
                yield b" " * 100

        answer = client.post("/predict", content=streamed(), headers={"content-type": "application/json"})
        assert answer.status_code == 413
        assert client.get("/health").json()["ready"] is True


def test_online_retraining_swaps_the_served_model_while_predicting(tmp_path):
    x, y = clustered(1200, seed=2)
    store = FeatureStore(tmp_path / "features.db", synchronous="NORMAL")
    served = ServedClassifier()
    trainer = OnlineTrainer(store, served, retrain_every=300, num_classes=4, train_kwargs={"epochs": 2, "seed": 0}, poll_s=0.05)
    trainer.start()
    versions_seen, errors, stop = set(), [], threading.Event()

    def keep_predicting():
        while not stop.wait(0.005):
            if served.ready:
                try:
                    version = served.version
                    assert served.predict(x[:32]).shape == (32,)
                    versions_seen.add(version)
                except Exception as err:  # any failure during a swap fails the test
                    errors.append(err)

    predictor = threading.Thread(target=keep_predicting)
    predictor.start()
    for number, start in enumerate(range(0, len(y), 100)):
        store.ingest_chunk(Chunk("site-0", f"chunk-{number}", start, y[start : start + 100], x[start : start + 100]))
        threading.Event().wait(0.1)
    trainer.finish()
    stop.set()
    predictor.join()
    rows = trainer.drain_rows()
    assert not errors
    assert len(rows) >= 2 and rows[-1]["records"] == len(y) == trainer.trained_on
    assert [r["classifier_version"] for r in rows] == sorted({r["classifier_version"] for r in rows})
    assert served.version == rows[-1]["classifier_version"]
    assert len(versions_seen) >= 2  # predictions went on across swaps
    assert (served.predict(x) == y).mean() > 0.9
    store.close()
