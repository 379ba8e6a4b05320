"""Issue 14's defences inside the protocols, each measured by the audit library's attacks.

Every measurement runs the real client roles (:mod:`graftfl.core.split_roles`) against the
real server stage (:class:`graftfl.core.split.TopStage`) in this process, on scikit-learn's
8x8 ``digits`` (standardised), and records what the server received, as the honest-but-curious
server of docs/audit.md would. The undefended run is the baseline of every comparison; the
thresholds are that baseline plus a margin. The wiring through the ServerApp and the ClientApp
handlers (``defence`` block and ``privacy=dpsgd`` over the real data plane) is tested with the
in-process grid of tests/test_split_runs.py (no Flower simulation).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from graftfl.audit import membership, metrics, split_inversion
from graftfl.config import ConfigError, compose_config
from graftfl.core.defences import DefenceConfig, SiteDefences, randomized_response, rr_keep_probability
from graftfl.core.models import cut_model, mlp, small_cnn
from graftfl.core.privacy import DpSgdConfig
from graftfl.core.split import BottomClient, SemisupClient, TopStage, activation_shape, build_decoder
from graftfl.core.split_private import PrivateRole

MARGIN = 0.1  # a defence must move its attack's figure by at least this much against the undefended run


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # this fixture and `digits`: tests/conftest.py


def split_run(digits, defences: DefenceConfig, *, epochs: int = 4, lr: float = 0.01, seed: int = 5) -> dict:
    """Train ``small_cnn(channels=4)`` cut after ``conv1`` by split learning on the site records; record the server's view.

    Returns the trained bottom and top, held-out accuracy, and ``frames``: for every training
    batch, the site indices, the activations and the labels the server received.
    """
    x, y, site, held = digits["x"], digits["y"], digits["site"], digits["held"]
    torch.manual_seed(1)
    bottom, top = cut_model(small_cnn((1, 8, 8), 10, channels=4), ["conv1"])
    stage = TopStage(top, torch.optim.Adam(top.parameters(), lr), activation_shape(bottom, (1, 8, 8)), 10)
    role = BottomClient(bottom, torch.optim.Adam(bottom.parameters(), lr), defences=SiteDefences(defences, 10, torch.Generator().manual_seed(seed)))
    frames, current = [], {}

    def exchange(kind, tensors):
        if kind == "train":
            frames.append((current["indices"], tensors["activations"], tensors["labels"]))
        _, reply, meta = stage.handle(kind, tensors, {})
        return reply, meta

    order = torch.Generator().manual_seed(2)
    for _ in range(epochs):
        for batch in torch.randperm(len(site), generator=order).split(32):
            current["indices"] = site[batch]
            role.train_step(x[site[batch]], y[site[batch]], exchange)
    stage.complete_step()
    bottom.eval(), top.eval()
    with torch.no_grad():
        accuracy = float((top(bottom(x[held])).argmax(1) == y[held]).float().mean())
    return {"bottom": bottom, "top": top, "accuracy": accuracy, "frames": frames}


@pytest.fixture(scope="module")
def undefended(digits):
    return split_run(digits, DefenceConfig())


def last_frames(run: dict, count: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(site indices, received activations, received labels) of the last ``count`` training frames."""
    frames = run["frames"][-count:]
    return tuple(torch.cat([frame[part] for frame in frames]) for part in range(3))


def query_inversion_ssim(digits, run: dict, noise_std: float = 0.0) -> float:
    """Tier (a): a decoder trained on auxiliary data through the trained bottom (adaptive: with the site's noise),
    applied to the activations the server received in the last two training frames."""
    x = digits["x"]
    indices, received, _ = last_frames(run)
    decoder = split_inversion.train_query_decoder(run["bottom"], x[digits["aux"]], epochs=10, activation_noise=noise_std)
    return metrics.mean_ssim(split_inversion.reconstruct(decoder, received), x[indices], data_range=digits["range"])


# ------------------------------------------------------------- defaults: unchanged ---


def _reference_step(bottom, optimizer, x, y, exchange):
    """The split client's training step as it was before the defences existed (graftfl 14003a0)."""
    bottom.train()
    optimizer.zero_grad(set_to_none=True)
    activations = bottom(x)
    reply, _ = exchange("train", {"activations": activations.detach().cpu(), "labels": y})
    activations.backward(reply["gradient"].to(activations.dtype))
    optimizer.step()


def served_by(stage):
    """The exchange callable of a client talking to ``stage`` directly (no transport)."""
    return lambda kind, tensors: stage.handle(kind, tensors, {})[1:]


def test_defaults_compute_exactly_the_undefended_split_and_touch_no_random_state(digits):
    from graftfl.clients.features import released_latents
    from graftfl.clients.split_defences import site_defences

    cfg = compose_config(["protocol=split", "dataset=digits"])
    assert DefenceConfig.from_config(cfg) == DefenceConfig() and DefenceConfig().enabled() == []
    defences = site_defences(cfg, 10)
    assert defences.generator is None  # no CSPRNG draw, no generator: nothing random is added
    x, y = digits["x"][digits["site"][:96]], digits["y"][digits["site"][:96]]
    weights = []
    for reference in (True, False):
        torch.manual_seed(3)
        bottom, top = cut_model(small_cnn((1, 8, 8), 10), ["conv1"])
        stage = TopStage(top, torch.optim.SGD(top.parameters(), 0.05, momentum=0.9), activation_shape(bottom, (1, 8, 8)), 10)
        optimizer = torch.optim.SGD(bottom.parameters(), 0.05, momentum=0.9)
        role = BottomClient(bottom, optimizer, defences=defences)
        exchange = served_by(stage)
        rng_before = torch.get_rng_state()
        for batch in torch.arange(96).split(32):
            _reference_step(bottom, optimizer, x[batch], y[batch], exchange) if reference else role.train_step(x[batch], y[batch], exchange)
        stage.complete_step()
        assert torch.equal(torch.get_rng_state(), rng_before)
        weights.append({**bottom.state_dict(), **top.state_dict()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    latents = torch.randn(5, 8)
    assert torch.equal(released_latents(cfg, latents), latents)


# ---------------------------------------------------------------------- NoPeek ---


def test_nopeek_lowers_distance_correlation_and_query_decoder_inversion(digits, undefended):
    defended = split_run(digits, DefenceConfig(nopeek=10.0))
    x = digits["x"]
    dcor = {name: metrics.distance_correlation(x[last_frames(run)[0]], last_frames(run)[1]) for name, run in (("clean", undefended), ("nopeek", defended))}
    ssim = {name: query_inversion_ssim(digits, run) for name, run in (("clean", undefended), ("nopeek", defended))}
    guess = metrics.random_guess_ssim(x[digits["aux"]], x[last_frames(undefended)[0]], data_range=digits["range"])
    print(f"nopeek=10: dCor {dcor}, query-decoder SSIM {ssim}, guess {guess:.3f}, accuracy {undefended['accuracy']:.3f} -> {defended['accuracy']:.3f}")
    assert ssim["clean"] > guess + 0.2  # the attack is strong on the undefended run (issue 14's honesty rule)
    assert dcor["nopeek"] < dcor["clean"] - 0.05, dcor
    assert ssim["nopeek"] < ssim["clean"] - MARGIN, ssim
    assert defended["accuracy"] > 0.8  # still learns (chance is 0.1)


# ------------------------------------------------------------- activation noise ---


def test_activation_noise_lowers_inversion_of_what_the_server_received(digits, undefended):
    defended = split_run(digits, DefenceConfig(noise_std=1.0))
    clean, noisy = query_inversion_ssim(digits, undefended), query_inversion_ssim(digits, defended, noise_std=1.0)
    print(f"noise_std=1.0: query-decoder SSIM {clean:.3f} -> {noisy:.3f} (adaptive decoder), accuracy {undefended['accuracy']:.3f} -> {defended['accuracy']:.3f}")
    assert noisy < clean - MARGIN, (noisy, clean)
    assert defended["accuracy"] > 0.8
    # The mechanism itself: the released tensor is the activation plus N(0, std^2), from the site's generator.
    activations = torch.zeros(4000)
    released = SiteDefences(DefenceConfig(noise_std=0.7), 10).activations_out(activations)
    assert abs(float(released.std()) - 0.7) < 0.03 and abs(float(released.mean())) < 0.03
    again = SiteDefences(DefenceConfig(noise_std=0.7), 10).activations_out(activations)
    assert not torch.equal(released, again)  # from the OS CSPRNG: not replayable from the run seed


def test_latent_noise_in_features_uploads():
    from graftfl.clients.features import released_latents

    cfg = compose_config(["protocol=features", "dataset=digits", "defence.noise_std=0.5"])
    latents = torch.randn(2000, 16)
    released = released_latents(cfg, latents)
    assert released.shape == latents.shape and abs(float((released - latents).std()) - 0.5) < 0.02


# ----------------------------------------------------------- label randomized response ---


def test_label_randomized_response_lowers_the_servers_label_accuracy(digits, undefended):
    epsilon = 1.0
    defended = split_run(digits, DefenceConfig(label_rr_epsilon=epsilon), epochs=2)
    y = digits["y"]
    true = torch.cat([y[frame[0]] for frame in defended["frames"]])
    received = torch.cat([frame[2] for frame in defended["frames"]])
    clean_accuracy = float(torch.cat([frame[2] == y[frame[0]] for frame in undefended["frames"]]).float().mean())
    server_accuracy = float((received == true).float().mean())
    keep = rr_keep_probability(epsilon, 10)
    print(f"label_rr_epsilon={epsilon}: server's label accuracy {clean_accuracy:.3f} -> {server_accuracy:.3f} (keep probability {keep:.3f})")
    assert clean_accuracy == 1.0 and server_accuracy < clean_accuracy - MARGIN
    assert abs(server_accuracy - keep) < 0.05  # 1200 labels: the binomial std is 0.012
    # A flipped label is uniform over the other 9 classes.
    flipped = received[received != true]
    offsets = torch.bincount((flipped - true[received != true]) % 10, minlength=10)[1:].float()
    assert offsets.min() > 0.6 * offsets.mean(), offsets
    # With a moderate epsilon the model still learns: the flips are symmetric noise.
    learning = split_run(digits, DefenceConfig(label_rr_epsilon=3.0))
    assert learning["accuracy"] > 0.5, learning["accuracy"]


def test_randomized_response_keep_rate_matches_epsilon():
    labels = torch.randint(0, 4, (20000,), generator=torch.Generator().manual_seed(0))
    for epsilon in (0.5, 2.0):
        kept = float((randomized_response(labels, epsilon, 4, torch.Generator().manual_seed(1)) == labels).float().mean())
        assert abs(kept - math.exp(epsilon) / (math.exp(epsilon) + 3)) < 0.01


# ---------------------------------------------------------------------- DP-SGD ---


def _canary_scores(digits, private: bool, trials: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Scores of an auditor holding the bottom before and after a short split turn, with and without a canary record.

    The canary is an out-of-distribution image (±4 per pixel) with a fixed label; the score
    is how far the bottom's update moved along the canary's own descent direction at the
    (public) initial weights. Each trial has fresh batch draws and noise.
    """
    x, y = digits["x"][digits["site"][:100]], digits["y"][digits["site"][:100]]
    canary_x = 4 * torch.sign(torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(7)))
    canary_y = torch.tensor([3])

    def parts():
        torch.manual_seed(1)
        return cut_model(mlp((1, 8, 8), 10, hidden=(32,)), ["fc1"])

    bottom, top = parts()
    loss = torch.nn.functional.cross_entropy(top(bottom(canary_x)), canary_y)
    direction = torch.autograd.grad(loss, list(bottom.parameters()))

    def trial(with_canary: bool, seed: int) -> float:
        bottom, top = parts()
        start = [p.detach().clone() for p in bottom.parameters()]
        stage = TopStage(top, torch.optim.SGD(top.parameters(), 0.1), activation_shape(bottom, (1, 8, 8)), 10)
        role = BottomClient(bottom, torch.optim.SGD(bottom.parameters(), 0.1))
        records_x, records_y = (torch.cat([x, canary_x]), torch.cat([y, canary_y])) if with_canary else (x, y)
        count = len(records_y)
        private_role = PrivateRole(role, DpSgdConfig(1.0, 1e-5, noise_multiplier=sigma), count, 20, None,
                                   torch.Generator().manual_seed(1000 + seed), torch.Generator().manual_seed(2000 + seed)) if private else None
        draws = torch.Generator().manual_seed(3000 + seed)
        for _ in range(10):  # Poisson batches either way, so the only difference is DP-SGD
            batch = private_role.poisson_batch() if private else (torch.rand(count, generator=draws) < 20 / count).nonzero().flatten()
            if len(batch) == 0:
                if private_role is not None:
                    private_role.empty_step()
                continue
            role.train_step(records_x[batch], records_y[batch], served_by(stage))
        if private_role is not None:
            private_role.close()
        return float(-sum(((p.detach() - p0) * g).sum() for p, p0, g in zip(role.bottom.parameters(), start, direction, strict=True)))

    members = np.array([trial(True, t) for t in range(trials)])
    others = np.array([trial(False, trials + t) for t in range(trials)])
    return members, others


def test_dpsgd_on_the_bottom_lowers_canary_membership_inference_on_its_weights(digits):
    sigma, trials = 4.0, 30
    plain = membership.membership_report(*_canary_scores(digits, False, trials, sigma))["auc"]
    private = membership.membership_report(*_canary_scores(digits, True, trials, sigma))["auc"]
    print(f"canary membership AUC on the bottom's update: {plain:.3f} without DP -> {private:.3f} with DP-SGD sigma={sigma}")
    assert plain > 0.8  # the audit sees the canary in an undefended bottom
    assert private < plain - 0.15, (private, plain)


def test_private_role_epsilon_is_the_accountants_over_all_turns(digits):
    from opacus.accountants import RDPAccountant

    x, y = digits["x"][digits["site"]], digits["y"][digits["site"]]
    torch.manual_seed(0)
    bottom, top = cut_model(small_cnn((1, 8, 8), 10, channels=4), ["conv1"])
    stage = TopStage(top, torch.optim.SGD(top.parameters(), 0.05), activation_shape(bottom, (1, 8, 8)), 10)
    role = SemisupClient(bottom, build_decoder(activation_shape(bottom, (1, 8, 8)), (1, 8, 8)))
    role.optimizer = torch.optim.SGD([*role.bottom.parameters(), *role.decoder.parameters()], 0.05)
    history, epsilons = None, []
    for turn in range(3):
        private = PrivateRole(role, DpSgdConfig(1.0, 1e-5, noise_multiplier=1.1), len(y), 32, history)
        for _ in range(5):
            batch = private.poisson_batch()
            if len(batch) == 0:
                private.empty_step()
            else:
                role.train_step(x[batch], y[batch], lambda kind, tensors: stage.handle(kind, tensors, {})[1:], labeled=batch % 2 == 0)
        private.close()
        history = private.history
        epsilons.append(private.epsilon())
        accountant = RDPAccountant()
        accountant.history = [(1.1, 32 / len(y), 5 * (turn + 1))]
        assert private.epsilon() == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert all(math.isfinite(e) for e in epsilons) and epsilons[0] < epsilons[1] < epsilons[2]
    assert type(role.bottom).__name__ == "StagedModel" and set(role.modules()) == {"bottom", "decoder"}  # unwrapped after each turn


def test_target_epsilon_is_spread_over_every_turn_of_the_run():
    from opacus.accountants import RDPAccountant

    from graftfl.clients.split_defences import split_dpsgd_config

    cfg = compose_config(["protocol=split", "dataset=digits", "privacy=dpsgd", "privacy.target_epsilon=3", "rounds=4"])
    sample_rate, steps = 32 / 640, 25
    sigma = split_dpsgd_config(cfg, steps, sample_rate).resolve_noise_multiplier(sample_rate)
    accountant = RDPAccountant()
    accountant.history = [(sigma, sample_rate, 4 * steps)]
    assert accountant.get_epsilon(float(cfg.privacy.delta)) == pytest.approx(3.0, abs=0.05)


# ---------------------------------------------- through the ServerApp and the ClientApp ---


def _run_in_process(tmp_path, overrides, num_nodes=2):
    from tests.test_split_runs import run_in_process

    return run_in_process(tmp_path, ["rounds=2", *overrides], num_nodes=num_nodes)


def test_dpsgd_split_run_trains_and_reports_each_sites_cumulative_epsilon(tmp_path):
    from opacus.accountants import RDPAccountant

    from graftfl.clients.site_data import site_rows
    from graftfl.clients.split_defences import PRIVACY_STATE_KEY

    with _identity():
        grid, run_dir, rows, summary = _run_in_process(tmp_path, ["protocol=split", "privacy=dpsgd", "privacy.noise_multiplier=1.0",
                                                                  "protocol.turn_batches=20", "train.lr=0.05"])
    cfg = OmegaConf.load(run_dir / "config.yaml")  # the run's own config: the sites' rows are those it trained on
    assert summary["failed_turns"] == [] and [r["round"] for r in rows] == [1, 2]
    print("DP-SGD split:", [(r["round"], r["accuracy"], r["client_epsilon"]) for r in rows])
    assert rows[-1]["accuracy"] > 0.3, rows[-1]  # chance is 0.1
    for index, node in enumerate(grid.nodes):
        context = grid.contexts[node]
        records = len(site_rows(cfg, context)[0])
        history = json.loads(context.state[PRIVACY_STATE_KEY]["history"])
        assert history == [[1.0, 32 / records, 40]]  # 2 turns x 20 Poisson batches at q = batch_size / records
        for round_index, row in enumerate(rows):
            accountant = RDPAccountant()
            accountant.history = [(1.0, 32 / records, 20 * (round_index + 1))]
            assert row["clients"][index] == index
            assert row["client_epsilon"][index] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        assert rows[0]["client_epsilon"][index] < rows[1]["client_epsilon"][index] < math.inf
    assert rows[-1]["epsilon"] == max(rows[-1]["client_epsilon"])


@pytest.mark.parametrize(
    "overrides",
    [
        ["protocol=ushaped", "privacy=dpsgd", "defence.noise_std=0.3", "defence.nopeek=0.0"],
        ["protocol=semisup", "privacy=dpsgd", "defence.label_rr_epsilon=3", "protocol.handoff=average"],
        ["protocol=split", "defence.nopeek=1.0", "defence.noise_std=0.1", "defence.label_rr_epsilon=3", "protocol.handoff=local"],
    ],
    ids=["ushaped-dpsgd-noise", "semisup-dpsgd-rr-average", "split-all-three"],
)
def test_defended_protocol_variants_run(tmp_path, overrides):
    with _identity():
        _, _, rows, summary = _run_in_process(tmp_path, [*overrides, "protocol.turn_batches=10"])
    print(overrides, [r["accuracy"] for r in rows])
    assert summary["failed_turns"] == [] and len(rows) == 2 and rows[-1]["accuracy"] > 0.3, rows[-1]  # chance is 0.1
    assert ("client_epsilon" in rows[-1]) == ("privacy=dpsgd" in overrides)


def _identity():
    from tests.conftest import flower_task_identity

    return flower_task_identity(run_id=7)


# ------------------------------------------------------------- misconfiguration ---


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["protocol=fedavg", "defence.nopeek=0.5"], "defence.nopeek applies to protocols ['split', 'ushaped', 'semisup'], not protocol 'fedavg'"),
        (["protocol=ushaped", "defence.label_rr_epsilon=1"], "defence.label_rr_epsilon applies to protocols ['split', 'semisup'], not protocol 'ushaped' (with ushaped the labels never leave the site)"),
        (["protocol=dssgd", "defence.noise_std=0.1"], "defence.noise_std applies to protocols ['split', 'ushaped', 'semisup', 'features'], not protocol 'dssgd'"),
        (["protocol=split", "defence.noise_std=-1"], "defence.noise_std must be a finite number >= 0"),
        (["protocol=split", "defence.label_rr_epsilon=0"], "defence.label_rr_epsilon must be a finite number > 0 or null"),
        (["protocol=split", "privacy=dpsgd", "defence.nopeek=0.5"], "defence.nopeek cannot be combined with privacy=dpsgd"),
        (["protocol=split", "privacy=dpsgd", "train.batch_size=64", "eval.batch_size=64"], "raise eval.batch_size"),
    ],
)
def test_misconfigured_defences_name_what_is_valid(overrides, message):
    with pytest.raises(ConfigError) as error:
        compose_config(["dataset=digits", *overrides])
    assert message in str(error.value)


def test_the_audit_sampling_seed_is_the_sites_own_setting_and_a_whole_number(monkeypatch):
    from graftfl.clients.split_defences import AUDIT_SAMPLING_ENV, audit_sampling_seed
    from graftfl.core.split_private import audit_sampling_generator, poisson_indices

    monkeypatch.delenv(AUDIT_SAMPLING_ENV, raising=False)
    assert audit_sampling_seed({}) is None and audit_sampling_seed({"audit-sampling-seed": " "}) is None  # unset: the OS CSPRNG
    assert audit_sampling_seed({"audit-sampling-seed": "12"}) == 12
    monkeypatch.setenv(AUDIT_SAMPLING_ENV, "34")
    assert audit_sampling_seed({}) == 34 and audit_sampling_seed({"audit-sampling-seed": "12"}) == 12  # node config first
    with pytest.raises(ValueError, match="audit-sampling-seed .* whole number"):
        audit_sampling_seed({"audit-sampling-seed": "seed"})
    draws = lambda turn: poisson_indices(500, 0.1, audit_sampling_generator(12, 0, turn))  # noqa: E731
    assert torch.equal(draws(1), draws(1)) and not torch.equal(draws(1), draws(2))  # replayable, and fresh every turn
