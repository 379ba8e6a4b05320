"""Helpers every protocol shares: FLOP count, metrics row, round seed, model/optimizer from config, stages."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from graftfl.clients.split_turns import flops_per_sample as role_flops_per_sample
from graftfl.config import compose_config
from graftfl.core import meter
from graftfl.core.local_round import train_round
from graftfl.core.meter import count_train_flops, metrics_row, train_flops_per_sample
from graftfl.core.models import build_model, model_from_config
from graftfl.core.split import (
    MiddleStage,
    ServerStage,
    TopStage,
    UShapedClient,
    activation_shape,
    model_parts,
    split_at_cut,
)
from graftfl.core.train import optimizer_from_config, round_seed, seed_torch

CE = nn.functional.cross_entropy


@pytest.fixture(autouse=True)
def empty_flop_cache(monkeypatch):
    """Every test counts afresh (the cache is per process)."""
    monkeypatch.setattr(meter, "_FLOPS_PER_SAMPLE", {})


def batch_norm_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_flop_count_is_per_sample_and_leaves_the_module_as_it_was():
    torch.manual_seed(0)
    net = batch_norm_net().eval()
    net[4].train()  # a mix of modes must come back as it was
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = copy.deepcopy(net.state_dict())
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    rng = torch.get_rng_state()

    flops = train_flops_per_sample(net, x, CE, y)

    assert flops > 0
    assert flops == count_train_flops(copy.deepcopy(net), x[:2], CE, y[:2]) / 2
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # batch-norm statistics untouched
    assert [m.training for m in net.modules()] == [False, False, False, False, False, True]  # the Sequential first
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in net.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_flop_count_is_cached_per_architecture_and_input_shape(monkeypatch):
    calls = []
    real = meter.count_train_flops
    monkeypatch.setattr(meter, "count_train_flops", lambda *args: calls.append(1) or real(*args))
    small, large = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 16, 16)
    first = train_flops_per_sample(nn.Sequential(nn.Conv2d(1, 4, 3)), small)
    # another instance of the same architecture: no second count
    assert train_flops_per_sample(nn.Sequential(nn.Conv2d(1, 4, 3)), small) == first
    assert len(calls) == 1
    assert train_flops_per_sample(nn.Sequential(nn.Conv2d(1, 4, 3)), large) > first  # a larger input costs more
    assert train_flops_per_sample(nn.Sequential(nn.Conv2d(1, 8, 3)), small) > first  # so does a wider layer
    assert len(calls) == 3


def test_flop_count_feeds_the_example_to_the_device_of_the_module():
    """A module on another device (``meta`` stands in for a GPU) is counted there, not fed CPU tensors."""
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    on_cpu = train_flops_per_sample(build_model("lenet", (1, 28, 28), 10), x, CE, y)
    elsewhere = build_model("lenet", (1, 28, 28), 10).to("meta")
    with pytest.raises(RuntimeError):  # what feeding it CPU tensors does
        count_train_flops(elsewhere, x[:2], CE, y[:2])
    meter._FLOPS_PER_SAMPLE.clear()
    assert train_flops_per_sample(elsewhere, x, CE, y) == on_cpu


def test_split_role_flops_on_a_device_match_the_whole_model_on_the_cpu():
    """The U-shaped client's bottom + head on a device: their count plus the middle's is the whole model's."""
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    whole = train_flops_per_sample(build_model("lenet", (1, 28, 28), 10), x, CE, y)
    bottom, middle, head = model_parts(build_model("lenet", (1, 28, 28), 10), None, 1)
    act_shape = activation_shape(bottom, (1, 28, 28))
    middle_flops = train_flops_per_sample(middle, torch.zeros(2, *act_shape))
    role = UShapedClient(bottom, head, device="meta")
    role.act_shape = activation_shape(role.bottom, (1, 28, 28))  # probed on the role's device
    role.middle_shape = activation_shape(middle, act_shape)
    client = role_flops_per_sample(role, x, y)
    assert 0 < client < whole
    # the bottom is counted without its input gradient (nothing upstream needs it): parts <= whole
    assert client + middle_flops <= whole


def test_metrics_row_has_the_common_fields_per_client_lists_and_privacy():
    clients = [{"partition-id": 0, "train_loss": 0.5}, {"train_loss": 0.7}]
    row = metrics_row(3, accuracy=0.9, loss=0.2, bytes_up=10, bytes_down=20, client_flops=5.0, wall_s=1.5,
                      client_rows=clients, client_columns={"client_train_loss": "train_loss"},
                      client_epsilon=[1.0, 2.5], extra="x")
    assert {k: row[k] for k in ("round", "accuracy", "loss", "bytes_up", "bytes_down", "client_flops", "wall_s")} == {
        "round": 3, "accuracy": 0.9, "loss": 0.2, "bytes_up": 10, "bytes_down": 20, "client_flops": 5.0, "wall_s": 1.5}
    assert row["clients"] == [0, -1] and row["client_train_loss"] == [0.5, 0.7] and row["extra"] == "x"
    assert row["epsilon"] == 2.5 and row["client_epsilon"] == [1.0, 2.5]

    single = metrics_row(1, accuracy=None, loss=None, bytes_up=0, bytes_down=0, client_flops=0, wall_s=0.0, epsilon=4.0)
    assert single["epsilon"] == 4.0 and "client_epsilon" not in single and "clients" not in single
    off = metrics_row(1, accuracy=None, loss=None, bytes_up=0, bytes_down=0, client_flops=0, wall_s=0.0,
                      client_epsilon=[])
    assert "epsilon" not in off and "client_epsilon" not in off


def test_round_seeds_differ_per_run_round_and_participant():
    seeds = {round_seed(seed, r, p) for seed in range(3) for r in range(1, 21) for p in range(50)}
    assert len(seeds) == 3 * 20 * 50
    assert round_seed(7, 2, 1) == round_seed(7, 2, 1)


def test_cpu_seeding_draws_as_torch_manual_seed_without_queueing_an_accelerator_seed(monkeypatch):
    torch.manual_seed(7)
    expected = torch.rand(5)
    queued = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: queued.append(seed))
    torch.manual_seed(123)  # torch's own seeding queues the CUDA seed ...
    assert queued == [123]
    seed_torch(7, torch.device("cpu"))  # ... the CPU path does not, and draws the same numbers
    assert queued == [123] and torch.equal(torch.rand(5), expected)
    seed_torch(8, None)  # device unknown: torch's full seeding
    assert queued == [123, 8]


def test_model_and_optimizer_come_from_the_config():
    cfg = compose_config(["dataset=digits", "model=mlp", "train.optimizer=adam", "train.lr=0.01",
                          "train.weight_decay=0.001"])
    model = model_from_config(cfg, (1, 8, 8), 10)
    assert model.stage_names == build_model("mlp", (1, 8, 8), 10).stage_names
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    optimizer = optimizer_from_config(cfg.train, model.parameters())
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["lr"] == 0.01 and optimizer.defaults["weight_decay"] == 0.001


def test_train_round_trains_a_model_left_in_eval_mode_with_dpsgd():
    """A baseline evaluates between rounds: round 2 of DP-SGD must still train (Opacus refuses eval mode)."""
    cfg = compose_config(["dataset=digits", "model=mlp", "privacy=dpsgd", "train.local_steps=2", "rounds=2"])
    torch.manual_seed(0)
    model = model_from_config(cfg, (1, 8, 8), 10)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    metrics, history = train_round(model, x, y, cfg, seed=1, device=torch.device("cpu"))
    model.eval()
    metrics2, history = train_round(model, x, y, cfg, seed=2, device=torch.device("cpu"), history=history)
    assert metrics2["epsilon"] > metrics["epsilon"] > 0
    assert sum(steps for _, _, steps in history) == 4  # both rounds' steps are in the accountant


def test_top_and_middle_stages_share_the_server_stage_base():
    model = build_model("lenet", (1, 28, 28), 10)
    bottom, top, act_shape = split_at_cut(model, None, (1, 28, 28))
    assert act_shape == activation_shape(bottom, (1, 28, 28))
    top_stage = TopStage(top, torch.optim.SGD(top.parameters(), lr=0.1), act_shape, 10)
    bottom2, middle, _head = model_parts(build_model("lenet", (1, 28, 28), 10), None, 1)
    mid_act = activation_shape(bottom2, (1, 28, 28))
    middle_optimizer = torch.optim.SGD(middle.parameters(), lr=0.1)
    middle_stage = MiddleStage(middle, middle_optimizer, mid_act, activation_shape(middle, mid_act))
    for stage, part in ((top_stage, top), (middle_stage, middle)):
        assert isinstance(stage, ServerStage) and stage.module is part
        stage.complete_step()  # nothing pending: no step
        assert stage.steps == 0
    before = [p.detach().clone() for p in top.parameters()]
    top_stage.handle("train", {"activations": torch.randn(3, *act_shape), "labels": torch.tensor([0, 1, 2])}, {})
    assert top_stage.steps == 0 and all(torch.equal(a, b) for a, b in zip(before, top.parameters(), strict=True))  # deferred
    top_stage.complete_step()
    assert top_stage.steps == 1 and not all(torch.equal(a, b) for a, b in zip(before, top.parameters(), strict=True))


@pytest.mark.parametrize("shuffle", [True, False])
def test_gathered_batches_are_the_per_row_loaders_and_train_the_same_weights(shuffle):
    """make_loader takes each batch with one gather: same rows, same order, same random draws as the
    row-by-row DataLoader (Opacus's), so a seeded run learns the same weights with either."""
    from graftfl.core.data import make_loader, per_row_loader
    from graftfl.core.train import train

    x, y = torch.randn(23, 4), torch.randint(0, 3, (23,))
    results = []
    for loader_of in (make_loader, per_row_loader):
        torch.manual_seed(5)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 3))  # dropout draws from the global generator
        loader = loader_of(x, y, 5, shuffle=shuffle, seed=11)
        batches = [(bx.clone(), by.clone()) for bx, by in loader] + [(bx.clone(), by.clone()) for bx, by in loader]
        metrics = train(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), device=torch.device("cpu"), epochs=3)
        results.append((batches, metrics, model.state_dict(), torch.random.get_rng_state(), len(loader)))
    (gathered, m1, w1, rng1, n1), (per_row, m2, w2, rng2, n2) = results
    assert n1 == n2 == 5
    assert [len(b) for b, _ in gathered] == [5, 5, 5, 5, 3] * 2
    for (a, la), (b, lb) in zip(gathered, per_row, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert shuffle != torch.equal(gathered[0][1], y[:5])  # shuffled, or in order
    assert m1 == m2 and torch.equal(rng1, rng2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_a_site_process_asks_torch_for_the_deterministic_kernels_of_its_run(monkeypatch):
    """The server sets deterministic kernels in its own process; a Ray actor or deployed ClientApp must do it too."""
    import os

    from flwr.app import Context, RecordDict
    from omegaconf import OmegaConf

    from graftfl.clients.utils import training_device

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    cfg = compose_config(["dataset=digits", "device=cpu"])
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        torch.use_deterministic_algorithms(False)
        assert training_device(OmegaConf.merge(cfg, {"deterministic": False}), context) == torch.device("cpu")
        assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        assert cfg.deterministic and training_device(cfg, context) == torch.device("cpu")
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
