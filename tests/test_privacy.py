import math

import torch
from opacus.accountants import RDPAccountant

from graftfl.core.data import per_row_loader
from graftfl.core.privacy import (
    DpSgdConfig,
    PrivateTraining,
    add_laplace_noise,
    epsilon_of,
    history_from_json,
    history_to_json,
    laplace_scale,
)
from graftfl.core.train import make_optimizer, train


def one_round(history_json: str, config: DpSgdConfig, seed: int) -> str:
    """One round of DP-SGD as a client runs it: restore the history, train, persist it."""
    torch.manual_seed(seed)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    model = torch.nn.Linear(5, 3)
    loader = per_row_loader(x, y, batch_size=8, shuffle=True, seed=seed)
    private = PrivateTraining(config, history_from_json(history_json))
    dp_model, dp_optimizer, dp_loader = private.attach(model, make_optimizer("sgd", model.parameters(), 0.1), loader)
    train(dp_model, dp_loader, dp_optimizer, device=torch.device("cpu"))
    return history_to_json(private.history)


def test_cumulative_epsilon_equals_the_accountant_over_all_steps_at_once():
    config = DpSgdConfig(max_grad_norm=1.0, delta=1e-5, noise_multiplier=1.1)
    history = ""
    per_round = []
    for round_number in range(4):
        history = one_round(history, config, seed=round_number)
        per_round.append(epsilon_of(history_from_json(history), config.delta))

    steps = sum(step[2] for step in history_from_json(history))
    assert steps == 4 * 8  # 64 samples, batch 8 -> sample rate 1/8, 8 steps per round
    one_go = RDPAccountant()
    for _ in range(steps):
        one_go.step(noise_multiplier=1.1, sample_rate=1 / 8)
    assert math.isclose(per_round[-1], one_go.get_epsilon(1e-5), rel_tol=1e-9)
    assert per_round == sorted(per_round) and per_round[-1] > 1.5 * per_round[0]  # cumulative, not per round


def test_target_epsilon_is_reached_over_the_planned_epochs():
    config = DpSgdConfig(max_grad_norm=1.0, delta=1e-5, target_epsilon=3.0, planned_epochs=3)
    history = ""
    for round_number in range(3):
        history = one_round(history, config, seed=round_number)
    assert 2.5 < epsilon_of(history_from_json(history), 1e-5) <= 3.05


def test_laplace_noise_scale_matches_epsilon_and_sensitivity():
    assert laplace_scale(epsilon=0.5, sensitivity=0.02) == 0.04
    generator = torch.Generator().manual_seed(0)
    noisy = add_laplace_noise(torch.zeros(200_000), epsilon=0.5, sensitivity=0.02, generator=generator)
    # Laplace(0, b): mean |X| = b, variance 2 b^2
    assert math.isclose(float(noisy.abs().mean()), 0.04, rel_tol=0.02)
    assert math.isclose(float(noisy.var()), 2 * 0.04**2, rel_tol=0.03)


def _private_setup(seed: int, samples: int = 4):
    """A 4-sample DP-SGD setup at batch size 1: Poisson sample rate 1/4, so empty batches are common."""
    torch.manual_seed(seed)
    x, y = torch.randn(samples, 5), torch.randint(0, 3, (samples,))
    model = torch.nn.Linear(5, 3)
    private = PrivateTraining(DpSgdConfig(max_grad_norm=1.0, delta=1e-5, noise_multiplier=1.0))
    dp_model, dp_optimizer, dp_loader = private.attach(model, make_optimizer("sgd", model.parameters(), 0.1), per_row_loader(x, y, 1, shuffle=True, seed=seed))
    return private, dp_model, dp_optimizer, dp_loader


def test_an_empty_poisson_batch_takes_a_noisy_step_and_is_accounted():
    """As in Opacus: an empty batch adds noise to a zero gradient sum and counts as a step for the accountant."""
    private, dp_model, dp_optimizer, _ = _private_setup(seed=0)
    before = [p.detach().clone() for p in dp_model.parameters()]
    empty_batch = (torch.empty(0, 5), torch.empty(0, dtype=torch.long))
    result = train(dp_model, [empty_batch], dp_optimizer, device=torch.device("cpu"))
    assert result["steps"] == 1 and result["samples"] == 0 and result["loss"] == 0.0
    assert sum(steps for _, _, steps in private.history) == 1
    after = list(dp_model.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))  # the noise moved the model
    assert all(torch.isfinite(a).all() for a in after)


def test_accountant_steps_equal_batches_drawn_including_empty_ones():
    for seed in range(20):  # find a draw with an empty batch (probability (3/4)^4 per batch)
        private, dp_model, dp_optimizer, dp_loader = _private_setup(seed)
        sizes: list[int] = []

        def recording(loader, sizes: list[int]):
            for x, y in loader:
                sizes.append(len(y))
                yield x, y

        result = train(dp_model, recording(dp_loader, sizes), dp_optimizer, device=torch.device("cpu"))
        if 0 in sizes:
            break
    assert 0 in sizes, "no empty Poisson batch in 20 seeds"
    assert result["steps"] == len(sizes) == sum(steps for _, _, steps in private.history)
    assert result["samples"] == sum(sizes)
    assert math.isfinite(result["loss"])
