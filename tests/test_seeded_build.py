"""A split site's part, built from the seed at every message, is reused only where a fresh build would be the same."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graftfl.clients import utils as client_utils
from graftfl.clients.utils import seeded_build


def _build() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def _as_dict(module: nn.Module) -> dict[str, nn.Module]:
    return {"net": module}


def _fresh_after(seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    module = _build()
    return module, torch.rand(5)  # a draw after the build: where the build left torch's random state


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.fixture(autouse=True)
def _no_held_build():
    client_utils._SEEDED.entry = None
    yield
    client_utils._SEEDED.entry = None


def test_reuse_gives_the_weights_and_later_draws_of_a_fresh_build():
    torch.manual_seed(7)
    first = seeded_build(("k",), _build, _as_dict)
    with torch.no_grad():  # the site trains it: weights, statistics and gradients move away from the build's
        first(torch.randn(6, 4)).sum()
        for parameter in first.parameters():
            parameter.add_(1.0)
    first[1].running_mean.add_(3.0)
    first[0].weight.grad = torch.ones_like(first[0].weight)
    first.eval()

    torch.manual_seed(7)
    again = seeded_build(("k",), _build, _as_dict)
    draw = torch.rand(5)
    fresh, fresh_draw = _fresh_after(7)
    assert again is first
    assert _same_weights(again, fresh)
    assert torch.equal(draw, fresh_draw)
    assert all(p.grad is None for p in again.parameters())
    assert all(m.training for m in again.modules())


def test_another_random_state_or_key_builds_anew():
    torch.manual_seed(1)
    first = seeded_build(("k",), _build, _as_dict)
    torch.manual_seed(2)
    other_seed = seeded_build(("k",), _build, _as_dict)
    assert other_seed is not first
    assert _same_weights(other_seed, _fresh_after(2)[0])
    torch.manual_seed(2)
    assert seeded_build(("other",), _build, _as_dict) is not other_seed


def test_not_reusable_or_not_resettable_builds_every_time():
    torch.manual_seed(1)
    first = seeded_build(("k",), _build, _as_dict, reusable=False)
    torch.manual_seed(1)
    assert seeded_build(("k",), _build, _as_dict, reusable=False) is not first

    def with_non_persistent_buffer() -> nn.Module:
        module = _build()
        module.register_buffer("scratch", torch.zeros(2), persistent=False)  # a load would not reset it
        return module

    torch.manual_seed(1)
    first = seeded_build(("np",), with_non_persistent_buffer, _as_dict)
    torch.manual_seed(1)
    assert seeded_build(("np",), with_non_persistent_buffer, _as_dict) is not first


REUSING_RUNS = {  # name -> (the client module that builds, overrides); every run: 2 sites, 2 rounds
    "split-relay": ("graftfl.clients.split_turns", ["protocol=split"]),
    "split-local": ("graftfl.clients.split_turns", ["protocol=split", "protocol.handoff=local"]),
    "ushaped": ("graftfl.clients.split_turns", ["protocol=ushaped"]),
    "semisup": ("graftfl.clients.split_turns", ["protocol=semisup"]),
    "dssgd": ("graftfl.clients.dssgd", ["protocol=dssgd", "protocol.order=round_robin", "protocol.theta_download=0.5"]),  # first-round models
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REUSING_RUNS))
def test_sites_reusing_their_seeded_part_end_as_with_fresh_builds(name, tmp_path, monkeypatch):
    """Every seeded build after a thread's first is a reuse; the run ends with the weights and figures of fresh builds."""
    import importlib

    from graftfl import cli
    from graftfl.config import resolve_job_config
    from tests.test_sim_fastpath import COMMON, trained_rows, weights_of

    module_name, extra = REUSING_RUNS[name]
    client = importlib.import_module(module_name)
    monkeypatch.setenv("GRAFTFL_SPLIT_KEY", "11" * 32)
    built, calls = [], []
    monkeypatch.setattr(client, "seeded_build", lambda key, build, *args, **kwargs: calls.append(1) or seeded_build(
        key, lambda: built.append(1) or build(), *args, **kwargs))
    overrides = [*extra, *COMMON, "sim.backend=inprocess", "eval.where=site"]
    run_reused = cli.simulate(resolve_job_config([*overrides, f"output_dir={tmp_path / 'reused'}"]))
    assert len(built) == 1 and len(calls) > 1  # one build in the run's thread, every later call a reuse

    monkeypatch.setattr(client, "seeded_build", lambda key, build, *args, **kwargs: build())
    run_fresh = cli.simulate(resolve_job_config([*overrides, f"output_dir={tmp_path / 'fresh'}"]))
    reused_weights, fresh_weights = weights_of(run_reused), weights_of(run_fresh)
    assert sorted(reused_weights) == sorted(fresh_weights)
    assert [k for k in fresh_weights if not torch.equal(reused_weights[k], fresh_weights[k])] == []
    rows = trained_rows(run_reused)
    assert rows == trained_rows(run_fresh) and all("client_train_loss" in row or "accuracy" in row for row in rows)
