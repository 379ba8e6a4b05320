"""A curious or malicious server against the split protocols (issue 11, items 1, 2 and 7).

The runs here are real split runs in process (``InProcessGrid`` of
tests/test_split_runs.py: the ServerApp pipeline, the real client handlers, the
real gRPC data plane on 127.0.0.1), with a spy on the data plane that records
every tensor the server receives. The attacker then works only from what the
server holds: those tensors, the Flower replies, its own test set and its seed.
"""

from __future__ import annotations

import json
import logging
from unittest import mock

import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

from graftfl.clients.split_turns import flops_per_sample, relay_init_seed
from graftfl.clients.utils import ServerConfigRefused, config_of
from graftfl.config import ConfigError, compose_config
from graftfl.core.data import dataset_from_config
from graftfl.core.handoff import decrypt_state, parse_key
from graftfl.core.models import build_model
from graftfl.core.split import model_parts
from graftfl.core.split import test_subset as server_test_subset
from graftfl.core.train import seed_everything
from graftfl.server_app.app import run_protocol
from graftfl.strategies.split_turns import AllTurnsFailed
from graftfl.transport.frames import decode_tensors, parse_header
from graftfl.transport.server import DataPlaneServer
from tests.conftest import flower_task_identity
from tests.helpers import FakeGrid
from tests.test_split_runs import SPLIT_KEY, InProcessGrid

RUN = ["dataset=digits", "model=lenet", "num_clients=2", "rounds=2", "progress=false", "protocol=split", "protocol.turn_batches=4", "dataset.test_size=256"]


@pytest.fixture(autouse=True)
def task_identity():
    with flower_task_identity(run_id=7):
        yield


def record_data_plane(monkeypatch) -> list[tuple[str, str, dict]]:
    """Every frame the data plane accepts, as ``(turn label, kind, tensors)``: what a curious server keeps."""
    received, serve = [], DataPlaneServer._serve_frame

    def spy(self, raw, turn):
        turn, reply = serve(self, raw, turn)
        header, offset = parse_header(raw)
        received.append((turn.label, header["kind"], decode_tensors(header, raw, offset) if header["kind"] != "end" else {}))
        return turn, reply

    monkeypatch.setattr(DataPlaneServer, "_serve_frame", spy)
    return received


def fit_first_stage(inputs: torch.Tensor, activations: torch.Tensor, template: torch.nn.Module, steps: int = 600) -> torch.Tensor:
    """The attack: fit a fresh first conv stage to (input, activation) pairs; returns the fitted conv weight."""
    torch.manual_seed(1234)
    fitted = type(template)(*[type(m)(**_ctor_args(m)) for m in template])  # same architecture, new weights
    optimizer = torch.optim.Adam(fitted.parameters(), lr=0.02)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(fitted(inputs), activations).backward()
        optimizer.step()
    return fitted[0].weight.detach()


def _ctor_args(module: torch.nn.Module) -> dict:
    if isinstance(module, torch.nn.Conv2d):
        return {"in_channels": module.in_channels, "out_channels": module.out_channels, "kernel_size": module.kernel_size, "padding": module.padding}
    if isinstance(module, torch.nn.MaxPool2d):
        return {"kernel_size": module.kernel_size}
    return {}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def attacker_best_cosine(cfg, received, true_weight: torch.Tensor) -> dict[str, float]:
    """Every estimate of the bottom's conv1 the server can make, scored against the truth (best case for the attacker)."""
    data = dataset_from_config(cfg.dataset)
    seed_everything(cfg.seed)  # the server's seed: what it can build itself
    server_bottom = model_parts(build_model(cfg.model.name, data.input_shape, data.num_classes), cfg.protocol.cut_stage)[0]
    scores = {"bottom from the server's seed": cosine(server_bottom.conv1[0].weight.detach(), true_weight)}
    test_x, _ = server_test_subset(data.test_x, data.test_y, cfg.dataset.get("test_size"), cfg.seed)
    evaluations = sorted({label for label, kind, _ in received if label.startswith("evaluate")})
    for label in evaluations[-2:]:  # the last round's evaluation traffic, turn by turn (the bottom is final there)
        activations = torch.cat([t["activations"] for lab, kind, t in received if lab == label and "activations" in t])
        count = min(len(activations), len(test_x))  # pair them with the inputs the server chose, in order
        fitted = fit_first_stage(test_x[:count], activations[:count], server_bottom.conv1)
        scores[f"fit to {label}"] = cosine(fitted, true_weight)
    training = torch.cat([t["activations"] for lab, kind, t in received if kind == "train"])
    count = min(len(training), len(test_x))  # the attacker has no inputs for them: its own test images are its best guess
    scores["fit to training activations"] = cosine(fit_first_stage(test_x[:count], training[:count], server_bottom.conv1), true_weight)
    return scores


def relay_run(tmp_path, monkeypatch, overrides, allow_server_eval=False):
    received = record_data_plane(monkeypatch)
    cfg = compose_config([*RUN, f"output_dir={tmp_path}", *overrides])
    grid = InProcessGrid(2)
    if allow_server_eval:
        for context in grid.contexts.values():
            context.node_config["allow-server-eval"] = "true"
    run_dir = run_protocol(grid, cfg)
    trains = [reply for message, reply in grid.log if message.metadata.message_type == "train.split"]
    final = decrypt_state(parse_key(SPLIT_KEY), bytes(trains[-1].content["handoff"]["relay-ciphertext"]))["modules"]["bottom"]
    return cfg, received, final["conv1.0.weight"], [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_server_cannot_fit_the_relayed_bottom(tmp_path, monkeypatch):
    cfg, received, true_weight, rows = relay_run(tmp_path, monkeypatch, [])
    assert {kind for _, kind, _ in received} >= {"train", "eval_forward"}  # the server did see training and evaluation traffic
    assert not any("labels" in t for label, _, t in received if label.startswith("evaluate")), "held-out labels reached the server"
    scores = attacker_best_cosine(cfg, received, true_weight)
    logging.getLogger(__name__).info("attacker's cosine similarities with the relayed bottom: %s", scores)
    assert max(scores.values()) < 0.5, scores
    # evaluation still happened, at both sites, on their own held-out rows
    assert rows[-1]["eval_where"] == "site" and sorted(rows[-1]["eval_clients"]) == [0, 1] and all(c > 0 for c in rows[-1]["eval_client_count"])
    assert rows[-1]["accuracy"] == sum(a * c for a, c in zip(rows[-1]["eval_client_accuracy"], rows[-1]["eval_client_count"], strict=True)) / sum(rows[-1]["eval_client_count"])


def test_negative_control_old_evaluation_path_reveals_the_bottom(tmp_path, monkeypatch):
    """The same attacker on the server-side evaluation path (server-chosen inputs and their activations) recovers conv1."""
    cfg, received, true_weight, _ = relay_run(tmp_path, monkeypatch, ["eval.where=server", "eval.server_reveals_bottom=true"], allow_server_eval=True)
    scores = attacker_best_cosine(cfg, received, true_weight)
    logging.getLogger(__name__).info("negative control, cosine similarities: %s", scores)
    assert max(scores.values()) > 0.99, scores


def test_relay_bottom_does_not_start_from_the_servers_seed():
    cfg = compose_config([*RUN])
    key = parse_key(SPLIT_KEY)
    from graftfl.clients.split import build_role
    from graftfl.clients.split_turns import prepare_role

    context = Context(run_id=7, node_id=1, node_config={"partition-id": 0, "num-partitions": 2, "split-key": SPLIT_KEY}, state=RecordDict(), run_config={})
    message = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train.split")
    role = prepare_role(cfg, message, context, build_role, (1, 8, 8), 10)
    seed_everything(cfg.seed)
    server_bottom = model_parts(build_model("lenet", (1, 8, 8), 10), None)[0]
    assert abs(cosine(role.bottom.conv1[0].weight.detach(), server_bottom.conv1[0].weight.detach())) < 0.5
    # every site derives the same start from the shared key; another key gives another start
    again = prepare_role(cfg, message, context, build_role, (1, 8, 8), 10)
    assert torch.equal(again.bottom.conv1[0].weight, role.bottom.conv1[0].weight)
    assert relay_init_seed(key, cfg) != relay_init_seed(bytes(32), cfg)


def test_server_evaluation_with_relay_needs_acknowledgement_and_site_consent(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="eval.server_reveals_bottom"):
        compose_config([*RUN, "eval.where=server"])
    with pytest.raises(ConfigError, match="eval.site_fraction"):
        compose_config([*RUN, "eval.site_fraction=1.0"])
    # the server acknowledges, the sites did not consent: every evaluation is refused at the sites
    monkeypatch.delenv("GRAFTFL_ALLOW_SERVER_EVAL", raising=False)
    cfg = compose_config([*RUN, "rounds=1", f"output_dir={tmp_path}", "eval.where=server", "eval.server_reveals_bottom=true"])
    received = record_data_plane(monkeypatch)
    grid = InProcessGrid(2)
    rows = [json.loads(line) for line in (run_protocol(grid, cfg) / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["accuracy"] is None and rows[-1]["eval_clients"] == []
    assert not any(label.startswith("evaluate") for label, _, _ in received)  # refused before any activation left
    refusals = [reply for message, reply in grid.log if message.metadata.message_type == "evaluate.split"]
    assert refusals and all(r.has_error() and "allow-server-eval" in r.error.reason for r in refusals)


# ----------------------------------------------------- server-sent config ---


class ClientAppGrid(FakeGrid):
    """Delivers every message through the real ClientApp (as a SuperNode does) after a malicious server edits its config."""

    def __init__(self, num_nodes: int, tamper):
        super().__init__(num_nodes, run_id=7, node_config={"split-key": SPLIT_KEY})
        for context in self.contexts.values():
            del context.node_config["split-key"]  # the key is in the site's environment only
        self.tamper = tamper

    def send_and_receive(self, messages, timeout=None):
        from graftfl.clients.app import app

        replies = []
        for message in messages:
            config = json.loads(message.content["config"]["graftfl-config"])
            self.tamper(config)
            message.content["config"]["graftfl-config"] = json.dumps(config)
            try:
                reply = app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as ex:  # Flower's own conversion (flwr/supernode/runtime/run_clientapp.py)
                logging.getLogger("flwr").error("ClientApp raised an exception", exc_info=ex)
                reply = Message(Error(code=2, reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=message)
            replies.append(reply)
            self.log.append((message, reply))
        return replies


@pytest.mark.parametrize("where", ["model.name", "dataset.root", "train.optimizer"])
def test_server_cannot_read_a_sites_environment_through_config(tmp_path, monkeypatch, caplog, where):
    secret = "5a" * 32
    monkeypatch.setenv("GRAFTFL_SPLIT_KEY", secret)
    section, name = where.split(".")

    def tamper(config):
        config[section][name] = "x${oc.env:GRAFTFL_SPLIT_KEY}"

    caplog.set_level(logging.DEBUG)
    received = record_data_plane(monkeypatch)
    cfg = compose_config([*RUN, "rounds=1", f"output_dir={tmp_path}"])
    grid = ClientAppGrid(2, tamper)
    with pytest.raises(AllTurnsFailed) as stopped:
        run_protocol(grid, cfg)
    assert received == []  # refused before any data-plane traffic
    reasons = [reply.error.reason for _, reply in grid.log]
    assert reasons and all("interpolation" in reason and where in reason for reason in reasons)
    everything = " ".join([*reasons, str(stopped.value), json.dumps(stopped.value.failed_turns), caplog.text])
    for form in (secret, secret.upper(), bytes.fromhex(secret).hex()):
        assert form not in everything


def test_site_errors_are_scrubbed_of_secrets(tmp_path, monkeypatch, caplog):
    """Whatever fails at a site, the reply's reason names none of its secrets (relay key, key files)."""
    secret = "c3" * 32
    key_file = tmp_path / "tls.key"
    key_file.write_text("-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n")
    monkeypatch.setenv("GRAFTFL_SPLIT_KEY", secret)
    caplog.set_level(logging.DEBUG)

    def leaky(*args, **kwargs):  # e.g. a library that puts what it read into its error
        raise ValueError(f"bad value {secret} near {key_file.read_text()} from {key_file}")

    with mock.patch("graftfl.clients.split_turns.site_rows", leaky):
        cfg = compose_config([*RUN, "rounds=1", f"output_dir={tmp_path}"])
        grid = ClientAppGrid(2, lambda config: None)
        for context in grid.contexts.values():
            context.node_config["tls-key"] = str(key_file)
        with pytest.raises(AllTurnsFailed) as stopped:
            run_protocol(grid, cfg)
    everything = " ".join([*(r.error.reason for _, r in grid.log), str(stopped.value), caplog.text])
    assert "bad value <redacted>" in everything and "ValueError" in everything
    for form in (secret, "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg", str(key_file)):
        assert form not in everything


def test_config_of_refuses_every_interpolation():
    def message_with(config) -> Message:
        return Message(RecordDict({"config": ConfigRecord({"graftfl-config": json.dumps(config)})}), dst_node_id=1, message_type="train.split")

    for config in ({"a": {"b": ["ok", {"c": "${oc.env:HOME}"}]}}, {"${x}": 1}, {"a": "\\${escaped}"}, {"a": "${now:}"}):
        with pytest.raises(ServerConfigRefused, match="never evaluates"):
            config_of(message_with(config))
    assert config_of(message_with({"a": {"b": "$HOME {x}"}})).a.b == "$HOME {x}"  # plain data stays data


# ---------------------------------------------------- device and failures ---


def roles_on(device: str) -> dict:
    """The three client roles of a digits LeNet, their modules on ``device`` (as ``client_device`` puts them)."""
    from graftfl.clients import semisup, split, ushaped

    roles = {}
    for module in (split, ushaped, semisup):
        cfg = compose_config(["dataset=digits", f"protocol={module.PROTOCOL}"])
        torch.manual_seed(0)
        roles[module.PROTOCOL] = module.build_role(cfg, build_model("lenet", (1, 8, 8), 10), (1, 8, 8), 10, torch.device(device))
    return roles


DEVICES = ["cpu", "meta", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_flops_per_sample_runs_on_the_roles_device(device):
    """The site's data is loaded on the CPU; the example must follow the role's modules (meta: a non-CPU device without a GPU)."""
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    expected = {name: flops_per_sample(role, x, y) for name, role in roles_on("cpu").items()}
    for name, role in roles_on(device).items():
        assert next(role.bottom.parameters()).device.type == torch.device(device).type
        assert flops_per_sample(role, x, y) == expected[name] > 0, name


def test_a_round_in_which_every_turn_failed_stops_the_run(tmp_path):
    def crash(message, context):
        raise RuntimeError("site disk full")

    cfg = compose_config([*RUN, f"output_dir={tmp_path}"])
    grid = InProcessGrid(2, faults={(1, 100): crash, (1, 101): crash})
    with pytest.raises(AllTurnsFailed, match="every turn failed.*site disk full") as stopped:
        run_protocol(grid, cfg)
    assert [f["node"] for f in stopped.value.failed_turns] == [100, 101]
    assert not list(tmp_path.rglob("summary.json"))  # no finished-looking run
    assert not any(m.metadata.message_type.startswith("evaluate") for m, _ in grid.log)  # no round 2, no evaluation
