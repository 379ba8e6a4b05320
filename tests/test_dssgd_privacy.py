"""DSSGD privacy: the sparse-vector upload of Shokri & Shmatikov, its ε ledger, and the server's bounds.

The attacks are those of a curious server (it reads which coordinates were uploaded and
knows the run seed) and of a malicious participant (it uploads values outside ±γ).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from functools import partial

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message

from graftfl.config import ConfigError, compose_config
from graftfl.core.codec import flatten_parameters
from graftfl.core.selective import SparseVectorScales, coordinate_budget, decode_sparse, make_upload
from graftfl.core.models import model_from_config
from graftfl.strategies.checkpoint import load_checkpoint
from graftfl.strategies.utils import ServerRun
from tests.conftest import read_metrics as rows_of
from tests.dssgd_helpers import LocalGrid, server_identity
from tests.dssgd_helpers import run_local as run_dssgd_locally

BASE = ["protocol=dssgd", "dataset=digits", "progress=false", "train.local_steps=3"]
PRIVATE = ["protocol.selection=sparse_vector", "protocol.threshold=0.001", "protocol.clip=0.05", "protocol.upload_epsilon=0.5"]

run_local = partial(run_dssgd_locally, base=BASE)


# ------------------------------------------------------------- the mechanism ---


def outcomes(delta: torch.Tensor, draws: int, epsilon: float, seed: int) -> Counter:
    """How often each (selected coordinate, sign of its released value) comes out of one private upload."""
    generator = torch.Generator().manual_seed(seed)
    counts: Counter = Counter()
    for _ in range(draws):
        upload = make_upload(delta, theta_upload=0.25, selection="sparse_vector", threshold=0.5, clip=1.0, upload_epsilon=epsilon, generator=generator)
        if len(upload.indices) == 0:
            counts[("none", 0)] += 1
        else:
            counts[(int(upload.indices[0]), int(upload.values[0] > 0))] += 1
    return counts


def test_selection_of_neighbouring_updates_is_within_the_epsilon_ratio():
    """Two neighbouring updates (every query moves by γ <= Δf) select each coordinate with probabilities within e^ε1.

    With selection=largest (today's main) the ratio is infinite: coordinate 0 is always chosen
    for one update and never for the other.
    """
    epsilon, draws = 2.0, 12_000
    epsilon_selection = 8 / 9 * epsilon
    first, second = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])
    counts = [outcomes(first, draws, epsilon, seed=1), outcomes(second, draws, epsilon, seed=2)]
    coordinates = {key[0] for c in counts for key in c}
    assert {0, 1, 2, 3} <= coordinates  # every coordinate can be chosen for either update: selection is random
    for coordinate in coordinates:
        p = [sum(n for (index, _), n in c.items() if index == coordinate) / draws for c in counts]
        assert min(p) > 0.02, (coordinate, p)  # enough draws for the ratio to be estimated
        ratio = max(p) / min(p)
        assert ratio <= math.exp(epsilon_selection) * 1.15, (coordinate, p, ratio)
    for key in set(counts[0]) | set(counts[1]):  # selection and released value together: within e^ε
        p = [c[key] / draws for c in counts]
        if min(p) > 0.02:
            assert max(p) / min(p) <= math.exp(epsilon) * 1.15, (key, p)
    # and the mechanism is not blind: the larger coordinates are chosen more often
    assert counts[0][(0, 1)] + counts[0][(0, 0)] > counts[1][(0, 1)] + counts[1][(0, 0)]


def reference_selection(delta: np.ndarray, tau: float, scales: SparseVectorScales, draws: int, seed: int) -> np.ndarray:
    """An independent, vectorised simulation of the paper's selection of one coordinate (c = 1).

    Per draw: a random order; threshold τ + Lap(threshold); the first coordinate in that order
    with |bound(Δ)| + Lap(query) >= the threshold is selected (index n: none).
    """
    rng = np.random.default_rng(seed)
    n = len(delta)
    orders = np.argsort(rng.random((draws, n)), axis=1)
    queries = np.abs(delta)[orders] + rng.laplace(0, scales.query, (draws, n))
    above = queries >= tau + rng.laplace(0, scales.threshold, (draws, 1))
    first = np.where(above.any(axis=1), above.argmax(axis=1), n)
    chosen = np.where(first < n, orders[np.arange(draws), np.minimum(first, n - 1)], n)
    return np.bincount(chosen, minlength=n + 1) / draws


def test_selection_frequencies_match_the_papers_algorithm_with_the_documented_scales():
    """The implementation selects like an independent simulation with threshold 2cΔf/ε1 and query 4cΔf/ε1 noise.

    Halving both scales moves these frequencies by more than the tolerance, so this checks the calibration
    that the ε bound rests on (the e^ε1 ratio test above has slack: |Δ| moves by γ, Δf is 2γ).
    """
    epsilon, draws = 2.0, 12_000
    delta = np.array([1.0, 0.6, 0.0, 0.0])
    counts = outcomes(torch.tensor(delta, dtype=torch.float32), draws, epsilon, seed=3)
    observed = np.array([sum(n for (index, _), n in counts.items() if index == j) for j in (0, 1, 2, 3, "none")]) / draws
    scales = SparseVectorScales.of(epsilon, 1.0, 1)
    expected = reference_selection(delta, 0.5, scales, 400_000, seed=4)
    tolerance = 4 * np.sqrt(expected * (1 - expected) / draws) + 0.002
    assert (np.abs(observed - expected) <= tolerance).all(), (observed, expected)
    halved = reference_selection(delta, 0.5, SparseVectorScales(scales.threshold / 2, scales.query / 2, scales.value), 400_000, seed=5)
    assert (np.abs(halved - expected) > tolerance).any()  # the test would notice a mis-calibration


def test_largest_selection_is_deterministic_which_is_why_it_carries_no_epsilon():
    """The negative control: the non-private selection separates the same neighbours perfectly."""
    first = make_upload(torch.tensor([1.0, 1.0, 0.0, 0.0]), theta_upload=0.25, selection="largest", clip=1.0)
    second = make_upload(torch.tensor([0.0, 0.0, 1.0, 1.0]), theta_upload=0.25, selection="largest", clip=1.0)
    assert set(first.indices.tolist()).isdisjoint(second.indices.tolist())


def test_noise_scales_follow_the_papers_budget_split():
    """ε1 = 8/9 ε (threshold 2cΔf/ε1, query 4cΔf/ε1), values 2cΔf/ε2 with ε2 = 2/9 ε, Δf = 2γ."""
    epsilon, gamma, count = 1.5, 0.01, 1000
    scales = SparseVectorScales.of(epsilon, gamma, count)
    sensitivity = 2 * gamma
    assert scales.threshold == pytest.approx(2 * count * sensitivity / (8 / 9 * epsilon))
    assert scales.query == pytest.approx(4 * count * sensitivity / (8 / 9 * epsilon))
    assert scales.value == pytest.approx(2 * count * sensitivity / (2 / 9 * epsilon))
    # the values' share: c releases of scale 2cΔf/ε2 cost c·Δf/scale = ε/9; with the selection's 8/9: ε
    assert count * sensitivity / scales.value + 8 / 9 * epsilon == pytest.approx(epsilon)


def test_released_values_are_noised_with_the_value_scale_and_clipped():
    gamma, epsilon = 1.0, 2000.0  # a large ε, so the value noise is small against γ and measurable
    scale = SparseVectorScales.of(epsilon, gamma, 1).value
    generator = torch.Generator().manual_seed(5)
    released = []
    for _ in range(4000):
        upload = make_upload(torch.tensor([0.3, 5.0]), theta_upload=0.5, selection="sparse_vector", threshold=0.0, clip=gamma, upload_epsilon=epsilon, generator=generator)
        released += [(int(i), float(v)) for i, v in zip(upload.indices, upload.values, strict=True)]
    noise = np.array([v - 0.3 for i, v in released if i == 0])
    assert len(noise) > 500
    assert np.mean(np.abs(noise)) == pytest.approx(scale, rel=0.1)  # E|Lap(b)| = b
    clipped = np.array([v for i, v in released if i == 1])  # Δ = 5 is bounded to γ before the noise, and after
    assert (np.abs(clipped) <= gamma).all() and (clipped == np.float32(gamma)).mean() > 0.4
    wide = make_upload(torch.randn(5000), theta_upload=0.1, selection="sparse_vector", threshold=0.0, clip=0.01, upload_epsilon=1.0, generator=generator)
    assert len(wide.indices) <= 500 and (wide.values.abs() <= np.float32(0.01)).all()
    assert len(torch.unique(wide.indices)) == len(wide.indices)


def test_private_noise_does_not_come_from_the_run_seed():
    """The server knows the run seed: two sites with the same config and data must not produce the same noise."""
    from flwr.app import Context, RecordDict

    from graftfl.clients import dssgd as dssgd_client
    from tests.test_dssgd_protocol import _train_message

    def upload_of(overrides):
        cfg = compose_config([*BASE, "num_clients=2", *overrides])
        context = Context(run_id=1, node_id=101, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
        torch.manual_seed(cfg.seed)
        params = flatten_parameters(model_from_config(cfg, (1, 8, 8), 10))
        with server_identity():
            reply = dssgd_client.train(_train_message(cfg, 1, None, params, params.numel()), context)
        return decode_sparse({k: a.numpy() for k, a in reply.content["upload"].items()})

    seeded = [upload_of([]) for _ in range(2)]
    assert torch.equal(seeded[0][0], seeded[1][0])  # control: the non-private upload is reproducible
    private = [upload_of(PRIVATE) for _ in range(2)]
    assert not torch.equal(private[0][0], private[1][0]) or not torch.equal(private[0][1], private[1][1])


# ------------------------------------------------------- ledger and server ---


def test_cumulative_upload_epsilon_counts_each_participants_uploads(tmp_path):
    """Sequential composition per participant: ε per upload × uploads sent (round robin: 101 twice, the others once)."""
    sent_metrics: set = set()

    def record(node: int, reply: Message) -> Message:
        sent_metrics.update(reply.content["metrics"].keys())
        return reply

    grid = LocalGrid(3, tamper=record)
    run_dir = run_local(tmp_path, ["num_clients=3", "rounds=4", "protocol.order=round_robin", "protocol.fraction_train=0.3", *PRIVATE], grid)
    rows = rows_of(run_dir)
    # nothing computed from the site's data outside the mechanism leaves it
    assert not sent_metrics & {"train_loss", "local_accuracy", "local_loss"} and "uploaded" in sent_metrics
    assert all(row["accuracy"] is None and row["global_accuracy"] is not None for row in rows)
    assert grid.delivered == [(101, 1), (102, 2), (103, 3), (101, 4)]
    assert [row["client_upload_epsilon_spent"] for row in rows] == [[0.5], [0.5, 0.5], [0.5, 0.5, 0.5], [1.0, 0.5, 0.5]]
    assert [row["upload_epsilon_spent"] for row in rows] == [0.5, 0.5, 0.5, 1.0]
    assert json.loads((run_dir / "summary.json").read_text())["upload_epsilon_spent"] == 1.0
    assert all(not row["rejected"] for row in rows)  # honest private uploads stay within ±γ and the budget


@pytest.mark.parametrize("private", [False, True])
def test_a_participant_uploading_1e30_is_refused_and_counted(tmp_path, private):
    """A malicious reply with values far outside ±γ never reaches the global model."""
    gamma = 0.05
    overrides = ["num_clients=2", "rounds=2", f"protocol.clip={gamma}", *(PRIVATE if private else [])]
    honest: list = []

    def tamper(node: int, reply: Message) -> Message:
        indices, values = decode_sparse({k: a.numpy() for k, a in reply.content["upload"].items()})
        if node == 102:
            values = values.clone()
            values[0] = 1e30
            reply.content["upload"] = ArrayRecord({"indices": Array(indices.numpy().astype(np.int32)), "values": Array(values.numpy())})
        else:
            honest.append((indices, values))
        return reply

    cfg = compose_config([*BASE, *overrides])
    initial = flatten_parameters(ServerRun(cfg, tmp_path / "probe").new_model())
    run_dir = run_local(tmp_path, overrides, LocalGrid(2, tamper=tamper))
    rows = rows_of(run_dir)
    assert [[r["node"] for r in row["rejected"]] for row in rows] == [[102], [102]]
    assert all("outside the declared range" in r["reason"] for row in rows for r in row["rejected"])
    assert json.loads((run_dir / "summary.json").read_text())["rejected_uploads"] == 2
    expected = initial.clone()
    for indices, values in honest:
        expected.index_add_(0, indices, values)
    got = torch.cat([tensor.reshape(-1) for tensor in load_checkpoint(run_dir)["model"].values()])
    assert torch.allclose(got, expected, atol=1e-6) and float(got.abs().max()) < 10
    if private:  # a refused upload was still released by its participant: it spends ε
        assert rows[-1]["client_upload_epsilon_spent"] == [1.0, 1.0]


def test_an_upload_beyond_the_budget_or_malformed_is_refused_without_stopping_the_run(tmp_path):
    cfg = compose_config([*BASE, "num_clients=2"])
    budget = coordinate_budget(0.1, flatten_parameters(ServerRun(cfg, tmp_path / "probe").new_model()).numel())

    def tamper(node: int, reply: Message) -> Message:
        if node == 101:
            reply.content["upload"] = ArrayRecord({"indices": Array(np.arange(budget + 1, dtype=np.int32)), "values": Array(np.zeros(budget + 1, np.float32))})
        else:
            reply.content["metrics"]["partition-id"] = float("nan")  # untrusted metrics do not crash the server
        return reply

    run_dir = run_local(tmp_path, ["num_clients=2", "rounds=1", "protocol.clip=0.05"], LocalGrid(2, tamper=tamper))
    (row,) = rows_of(run_dir)
    assert [r["node"] for r in row["rejected"]] == [101] and "exceed" in row["rejected"][0]["reason"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["protocol.clip=0.1", "protocol.upload_epsilon=1.0"], "sparse_vector"),  # ε on values alone: refused
        (["protocol.selection=sparse_vector", "protocol.threshold=0", "protocol.upload_epsilon=1.0"], "clip"),
        (["protocol.selection=sparse_vector", "protocol.threshold=0", "protocol.clip=0.1"], "upload_epsilon"),
        (["protocol.selection=sparse_vector", "protocol.clip=0.1", "protocol.upload_epsilon=1.0"], "threshold"),
        (["resume=runs/earlier", *PRIVATE], "cannot resume"),  # a restarted ledger would under-report ε
    ],
)
def test_private_upload_config_is_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(["protocol=dssgd", *overrides])
