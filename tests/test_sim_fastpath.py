"""The in-process simulation backend (``sim.backend=inprocess``, graftfl/sim/).

Fast tests drive :class:`graftfl.sim.InProcessGrid` with small ClientApps and check Flower's
message rules (contexts, copies, error replies, refused messages, timeouts). The slow test
runs every protocol on both backends and asserts that the final weights are identical.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from graftfl.config import ConfigError, compose_config
from graftfl.sim import InProcessGrid, inprocess_threads, run_inprocess, sim_backend
from tests.conftest import flower_task_identity


@contextmanager
def serving(app, num_nodes, **kwargs):
    """An InProcessGrid, with the task identity a ServerApp has while it runs (run id, SuperLink as source)."""
    grid = InProcessGrid(app, num_nodes, **kwargs)
    with flower_task_identity(grid.run.run_id):
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.node_id = SUPERLINK_NODE_ID
        try:
            yield grid
        finally:
            grid.close()


def counting_app() -> ClientApp:
    """Counts its messages in ``context.state``; ``fail`` raises after changing the state; ``mutate`` edits what it got."""
    app = ClientApp()

    @app.train("count")
    def count(message: Message, context) -> Message:
        record = context.state.get("seen", ConfigRecord({"count": 0}))
        record["count"] = int(record["count"]) + 1
        context.state["seen"] = record
        return Message(RecordDict({"metrics": MetricRecord({
            "count": record["count"],
            "partition-id": int(context.node_config["partition-id"]),
            "num-partitions": int(context.node_config["num-partitions"]),
        })}), reply_to=message)

    @app.train("fail")
    def fail(message: Message, context) -> Message:
        context.state["seen"] = ConfigRecord({"count": 1000})
        raise RuntimeError("site broke")

    @app.train("mutate")
    def mutate(message: Message, context) -> Message:
        message.content["config"]["value"] = "changed by the client"
        message.content["arrays"]["w"] = Array(np.zeros(3, dtype=np.float32))
        context.state["kept"] = ArrayRecord({"w": Array(np.full(3, 7.0, dtype=np.float32))})
        return Message(RecordDict({"arrays": context.state["kept"]}), reply_to=message)

    @app.train("sleep")
    def sleep(message: Message, context) -> Message:
        time.sleep(float(message.content["config"]["seconds"]))
        return Message(RecordDict(), reply_to=message)

    return app


@pytest.fixture
def grid():
    with serving(counting_app(), 3) as grid:
        yield grid


def send(grid, node, kind, timeout=30, **content):
    return list(grid.send_and_receive([Message(RecordDict(content), dst_node_id=node, message_type=f"train.{kind}")], timeout=timeout))


def test_nodes_have_partition_ids_in_id_order_and_state_that_persists(grid):
    nodes = list(grid.get_node_ids())
    assert len(set(nodes)) == 3 and nodes == sorted(nodes) and all(node > 1 for node in nodes)
    for partition, node in enumerate(nodes):
        for expected in (1, 2):
            (reply,) = send(grid, node, "count")
            metrics = reply.content["metrics"]
            assert (metrics["count"], metrics["partition-id"], metrics["num-partitions"]) == (expected, partition, 3)
            assert reply.metadata.src_node_id == node and reply.metadata.dst_node_id == 1
            assert reply.metadata.reply_to_message_id and reply.metadata.message_id and reply.metadata.delivered_at


def test_a_failing_client_is_an_error_reply_and_its_state_is_not_kept(grid):
    node = list(grid.get_node_ids())[0]
    send(grid, node, "count")
    (reply,) = send(grid, node, "fail")
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "site broke" in reply.error.reason
    (reply,) = send(grid, node, "count")  # the failed message's state change was dropped, as with a Ray actor
    assert reply.content["metrics"]["count"] == 2


def test_client_and_server_cannot_change_each_others_records(grid):
    node = list(grid.get_node_ids())[1]
    arrays = ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))})
    config = ConfigRecord({"value": "sent"})
    message = Message(RecordDict({"config": config, "arrays": arrays}), dst_node_id=node, message_type="train.mutate")
    (reply,) = grid.send_and_receive([message], timeout=30)
    assert message.content["config"]["value"] == "sent" and config["value"] == "sent"
    assert np.array_equal(message.content["arrays"]["w"].numpy(), np.arange(3, dtype=np.float32))
    reply.content["arrays"]["w"] = Array(np.zeros(3, dtype=np.float32))  # the server edits the reply
    kept = grid.contexts[node].state["kept"]["w"].numpy()
    assert np.array_equal(kept, np.full(3, 7.0, dtype=np.float32))


def test_a_message_to_an_unknown_node_gets_no_reply(grid):
    started = time.monotonic()
    assert send(grid, 12345, "count", timeout=0.5) == []
    assert time.monotonic() - started < 5


def test_send_and_receive_returns_what_arrived_within_the_timeout(grid):
    first, second = list(grid.get_node_ids())[:2]
    slow = Message(RecordDict({"config": ConfigRecord({"seconds": 1.5})}), dst_node_id=first, message_type="train.sleep")
    fast = Message(RecordDict(), dst_node_id=second, message_type="train.count")
    replies = list(grid.send_and_receive([fast, slow], timeout=0.7))
    assert [reply.metadata.src_node_id for reply in replies] == [second]
    ids = list(grid.push_messages([Message(RecordDict(), dst_node_id=second, message_type="train.count")]))
    deadline = time.monotonic() + 10
    pulled = []
    while not pulled and time.monotonic() < deadline:
        pulled = list(grid.pull_messages(ids))
        time.sleep(0.05)
    assert pulled and pulled[0].content["metrics"]["count"] == 2
    assert list(grid.pull_messages(ids)) == []  # a reply is delivered once


def test_backend_and_thread_keys_are_checked():
    from omegaconf import OmegaConf

    defaults = compose_config([])
    assert sim_backend(defaults) == "ray" and defaults.sim.client_threads is None  # the documented defaults
    assert sim_backend(OmegaConf.create({"sim": {"backend": "inprocess"}})) == "inprocess"
    with pytest.raises(ConfigError, match=r"sim.backend must be one of \['ray', 'inprocess'\]"):
        sim_backend(OmegaConf.create({"sim": {"backend": "threads"}}))
    assert inprocess_threads(OmegaConf.create({"client_resources": {"num_cpus": 2}, "sim": {"client_threads": None}})) == 2
    assert inprocess_threads(OmegaConf.create({"client_resources": {"num_cpus": 2}, "sim": {"client_threads": 1}})) == 1
    with pytest.raises(ConfigError, match="whole number"):
        inprocess_threads(OmegaConf.create({"sim": {"client_threads": 0}}))


def threads_app() -> ClientApp:
    """Replies to ``query.threads`` with the torch thread count its client ran with."""
    app = ClientApp()

    @app.query("threads")
    def threads(message, context):
        return Message(RecordDict({"metrics": MetricRecord({"threads": torch.get_num_threads()})}), reply_to=message)

    return app


def test_clients_run_with_client_threads_and_the_rest_of_the_process_keeps_its_own():
    import threading

    before = torch.get_num_threads()
    seen = []
    with serving(threads_app(), 1, client_threads=before + 1) as grid:
        (reply,) = grid.send_and_receive([Message(RecordDict(), dst_node_id=grid.node_ids[0], message_type="query.threads")], timeout=30)
        # a thread started meanwhile (the split data plane's gRPC handlers) has the process's count, as in Flower's driver
        other = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        other.start()
        other.join()
    assert reply.content["metrics"]["threads"] == before + 1
    assert torch.get_num_threads() == before and seen == [before]


def test_clients_run_in_the_thread_that_asks_for_replies():
    # A second torch thread would give the process a second OpenMP pool, which on a machine with few
    # cores made every SGD step 2.5x slower (docs/benchmarks.md): clients must run in the asking thread.
    import threading

    app, asking = ClientApp(), {}

    @app.query("thread")
    def thread(message, context):
        return Message(RecordDict({"metrics": MetricRecord({"same": int(threading.get_ident() == asking["id"])})}), reply_to=message)

    def ask(grid) -> list[int]:
        asking["id"] = threading.get_ident()
        messages = [Message(RecordDict(), dst_node_id=node, message_type="query.thread") for node in grid.node_ids]
        return [reply.content["metrics"]["same"] for reply in grid.send_and_receive(messages, timeout=30)]

    with serving(app, 2) as grid:
        assert ask(grid) == [1, 1]
        elsewhere: list[int] = []
        other = threading.Thread(target=lambda: elsewhere.extend(ask(grid)))
        other.start()
        other.join()
        assert elsewhere == [1, 1]


def test_run_inprocess_raises_what_the_server_app_raises():
    from flwr.serverapp import ServerApp

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        replies = list(grid.send_and_receive([Message(RecordDict(), dst_node_id=node, message_type="train.count") for node in grid.get_node_ids()], timeout=30))
        assert len(replies) == 2
        raise ValueError("server gave up")

    with pytest.raises(ValueError, match="server gave up"):
        run_inprocess(server_app, counting_app(), 2)


def test_cached_partitions_and_model_shapes_equal_fresh_ones(monkeypatch):
    from omegaconf import OmegaConf

    from graftfl.core import models, partition as data

    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 10, 2_000))
    cfg = OmegaConf.create({"name": "dirichlet", "alpha": 0.5, "samples_per_client": 300})
    cached = [data.partition_indices(labels, cfg, 5, pid, seed=4) for pid in range(5)]
    cached[0][:] = -1  # a caller that edits its copy changes nothing for the next one
    monkeypatch.setattr(data, "_PARTITIONS", {})
    monkeypatch.setattr(data, "_PARTITIONERS", {})
    fresh = [data.partition_indices(labels, cfg, 5, pid, seed=4) for pid in range(5)]
    assert [p.tolist() for p in cached[1:]] == [p.tolist() for p in fresh[1:]] and (fresh[0] >= 0).all()
    assert data.partition_indices(labels, cfg, 5, 0, seed=4).tolist() == fresh[0].tolist()
    other = labels.clone()
    other[:1000] = (other[:1000] + 1) % 10  # same length and seed, other labels: another partitioning
    assert data.partition_indices(other, cfg, 5, 0, seed=4).tolist() != fresh[0].tolist()
    labels[:1000] = other[:1000]  # the same tensor changed in place: its cached digest must not be reused
    assert data.partition_indices(labels, cfg, 5, 0, seed=4).tolist() == data.partition_indices(other, cfg, 5, 0, seed=4).tolist()
    for shape in ((1, 28, 28), (3, 32, 32), (1, 28, 28)):
        built = models.build_model("lenet", shape, 10)
        assert built(torch.zeros(2, *shape)).shape == (2, 10)


def test_a_reused_model_trains_to_the_same_weights_as_a_fresh_one_and_keeps_no_gradient():
    from graftfl.clients.utils import model_holding
    from graftfl.core.local_round import train_round
    from graftfl.core.models import model_from_config

    cfg = compose_config(["model=lenet", "train.batch_size=10"])
    shape, x, y = (1, 28, 28), torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    states = [model_from_config(cfg, shape, 10).state_dict() for _ in range(2)]
    first = model_holding(cfg, shape, 10, states[0])
    train_round(first, x, y, cfg, seed=3, device=torch.device("cpu"))
    assert any(p.grad is not None for p in first.parameters())
    again = model_holding(cfg, shape, 10, states[1])  # the next site's message in this thread
    assert again is first and all(p.grad is None for p in again.parameters())
    assert all(torch.equal(again.state_dict()[k], v) for k, v in states[1].items())
    fresh = model_from_config(cfg, shape, 10)
    fresh.load_state_dict(states[1])
    for model in (again, fresh):
        train_round(model, x, y, cfg, seed=5, device=torch.device("cpu"))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in fresh.state_dict().items())
    assert model_holding(compose_config(["model=cnn"]), (3, 32, 32), 10,
                         model_from_config(compose_config(["model=cnn"]), (3, 32, 32), 10).state_dict()) is not again
    private = compose_config(["model=lenet", "privacy=dpsgd"])  # Opacus attaches to the module: never shared
    assert model_holding(private, shape, 10, states[0]) is not model_holding(private, shape, 10, states[0])
    with pytest.raises(RuntimeError, match="Missing key"):  # a state that does not cover the model is refused
        model_holding(cfg, shape, 10, dict(list(states[0].items())[1:]))


def test_a_site_parses_a_config_text_once_read_only_and_still_refuses_interpolations():
    from graftfl.clients.utils import ServerConfigRefused, config_of
    from graftfl.core.frozen_config import ReadOnlyConfig
    from graftfl.core.wire import CONFIG_KEY, CONFIG_RECORD

    def message(data):
        return Message(RecordDict({CONFIG_RECORD: ConfigRecord({CONFIG_KEY: json.dumps(data)})}), dst_node_id=5, message_type="train.x")

    with flower_task_identity():
        first, second = config_of(message({"seed": 1, "train": {"lr": 0.1}})), config_of(message({"seed": 1, "train": {"lr": 0.1}}))
        assert first is second and first.train.lr == 0.1
        with pytest.raises(ReadOnlyConfig):
            first.train.lr = 1.0  # a handler cannot change what the next message of the run reads
        assert config_of(message({"seed": 2, "train": {"lr": 0.1}})).seed == 2
        for _ in range(2):
            with pytest.raises(ServerConfigRefused):
                config_of(message({"seed": "${oc.env:HOME}"}))


# ------------------------------------------------------------------ both backends, same weights (slow)
COMMON = ["dataset=digits", "num_clients=2", "rounds=2", "progress=false", "seed=3"]
PROTOCOL_ARGS = {
    "fedavg": [],
    "split": [],
    "ushaped": [],
    "semisup": [],
    "dssgd": ["protocol.order=round_robin"],
    "features": ["partition.samples_per_client=200", "dataset.test_size=200", "protocol.latent_dim=16", "protocol.autoencoder.epochs=2",
                 "protocol.chunk_size=100", "protocol.classifier.epochs=3", "rounds=1"],
}


def weights_of(run_dir) -> dict[str, torch.Tensor]:
    """Every weight a run leaves: the checkpoint's model, or features' classifier and the sites' autoencoders."""
    found = {}
    if (run_dir / "checkpoint.pt").exists():
        found.update({f"model.{k}": v for k, v in torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"].items()})
    if (run_dir / "classifier.pt").exists():
        found.update({f"classifier.{k}": v for k, v in torch.load(run_dir / "classifier.pt", weights_only=False)["state"].items()})
    for path in sorted((run_dir / "sites").glob("site-*/autoencoder.pt")):
        state = torch.load(path, weights_only=False)
        state = state.get("state", state) if isinstance(state, dict) else state
        found.update({f"{path.parent.name}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return found


def trained_rows(run_dir) -> list[dict]:
    """Per-round figures that depend on what was computed (not on timing or message ids)."""
    keep = ("round", "accuracy", "loss", "client_train_loss", "client_steps", "server_steps", "global_accuracy", "local_accuracy_all")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: row[k] for k in keep if k in row} for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", list(PROTOCOL_ARGS))
def test_inprocess_and_ray_end_with_the_same_weights(protocol, tmp_path, monkeypatch):
    """Node ids follow the partitions on both backends (graftfl.sim.node_ids): split's turns and DSSGD's order match."""
    from graftfl import cli
    from graftfl.config import resolve_job_config

    monkeypatch.chdir(tmp_path)
    # handoff=relay seeds a site's first bottom from the sites' key: one key for both runs (a fresh one per run otherwise)
    monkeypatch.setenv("GRAFTFL_SPLIT_KEY", "5a" * 32)
    for name in ("PYTHONPATH", "RAY_DEDUP_LOGS"):  # simulate() sets these for Ray workers: restore them afterwards
        monkeypatch.setenv(name, os.environ.get(name, ""))
    from graftfl.transport.server import DataPlaneServer

    served_in_memory, serve_direct = [], DataPlaneServer.serve_direct_frame  # split frames of in-process sites (sim.split_plane=direct)
    monkeypatch.setattr(DataPlaneServer, "serve_direct_frame", lambda self, *args: served_in_memory.append(1) or serve_direct(self, *args))
    runs, frames_in_memory = {}, {}
    for backend in ("inprocess", "ray"):
        overrides = [f"protocol={protocol}", *COMMON, *PROTOCOL_ARGS[protocol], f"sim.backend={backend}", f"output_dir={tmp_path / backend}"]
        runs[backend] = cli.simulate(resolve_job_config(overrides))
        frames_in_memory[backend] = len(served_in_memory)
        served_in_memory.clear()
    # the split protocols' in-process sites reached the data plane in memory, Ray's workers over gRPC
    assert frames_in_memory["ray"] == 0 and (frames_in_memory["inprocess"] > 0) == (protocol in ("split", "ushaped", "semisup"))
    fast, ray = weights_of(runs["inprocess"]), weights_of(runs["ray"])
    assert fast and sorted(fast) == sorted(ray)
    different = [key for key in fast if not torch.equal(fast[key], ray[key])]
    assert different == [], f"{protocol}: weights differ between backends: {different}"
    assert trained_rows(runs["inprocess"]) == trained_rows(runs["ray"])


def test_simulated_node_ids_ascend_in_partition_order_and_repeat_with_the_seed():
    import flwr.server.superlink.linkstate.in_memory_linkstate as link_state

    from graftfl.sim.grid import InProcessGrid
    from graftfl.sim.node_ids import partition_ordered_node_ids, seeded_ids

    random_draw = link_state.generate_rand_int_from_bytes
    drawn = {}
    for seed in (3, 3, 4):
        with partition_ordered_node_ids(seed):
            first = link_state.generate_rand_int_from_bytes(8, exclude={0, 1})
            ids = [first] + [link_state.generate_rand_int_from_bytes(8, exclude={first + 1}) for _ in range(3)]
        drawn.setdefault(seed, []).append(ids)
        assert ids == sorted(ids) and len(set(ids)) == 4 and first + 1 not in ids  # ascending, distinct, exclusions kept
    assert drawn[3][0] == drawn[3][1] and drawn[3][0] != drawn[4][0]
    assert link_state.generate_rand_int_from_bytes is random_draw  # Flower's own draw is back
    grid = InProcessGrid(lambda message, context: None, 3, seed=3)
    start = next(seeded_ids(3))
    assert grid.node_ids == [start, start + 1, start + 2]
    assert [grid.contexts[node].node_config["partition-id"] for node in grid.node_ids] == [0, 1, 2]


@pytest.mark.slow
def test_two_seeded_split_runs_on_ray_take_their_turns_in_the_same_order(tmp_path, monkeypatch):
    """Flower draws node ids at random and split walks the nodes in id order: without seeded ids the turn
    order, and so the weights, changed from run to run (two runs of 4 sites: the same order by chance once in 24)."""
    from graftfl import cli
    from graftfl.config import resolve_job_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRAFTFL_SPLIT_KEY", "5a" * 32)
    for name in ("PYTHONPATH", "RAY_DEDUP_LOGS"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    runs = [cli.simulate(resolve_job_config(["protocol=split", "dataset=digits", "num_clients=4", "rounds=1", "progress=false", "seed=3",
                                             "sim.backend=ray", f"output_dir={tmp_path / str(i)}"])) for i in range(2)]
    first, second = weights_of(runs[0]), weights_of(runs[1])
    assert first and all(torch.equal(first[key], second[key]) for key in first)


REUSING = {  # protocol -> (its client module, the overrides of a run whose later messages reuse a module, messages that reuse)
    "dssgd": ("graftfl.clients.dssgd", ["rounds=3", "protocol.order=random"], 4),  # rounds 2 and 3, two sites: the stored model
    "features": ("graftfl.clients.features", [*PROTOCOL_ARGS["features"], "protocol.autoencoder.training=federated",
                                              "protocol.autoencoder.rounds=3"], 6),  # every federated autoencoder round
}


@pytest.mark.slow
@pytest.mark.parametrize("protocol", list(REUSING))
def test_sites_reusing_their_module_end_with_the_weights_of_fresh_modules(protocol, tmp_path, monkeypatch):
    """A site whose message overwrites every weight loads them into this thread's module; fresh modules give the same run."""
    import importlib

    from graftfl import cli
    from graftfl.clients import utils as client_utils
    from graftfl.config import resolve_job_config

    module_name, extra, reusing = REUSING[protocol]
    client = importlib.import_module(module_name)
    reused, holding = [], client_utils.module_holding
    monkeypatch.setattr(client_utils, "module_holding", lambda *args, **kwargs: reused.append(1) or holding(*args, **kwargs))
    if hasattr(client, "module_holding"):
        monkeypatch.setattr(client, "module_holding", client_utils.module_holding)
    overrides = [f"protocol={protocol}", *COMMON, *extra, "sim.backend=inprocess"]
    run_reused = cli.simulate(resolve_job_config([*overrides, f"output_dir={tmp_path / 'reused'}"]))
    assert len(reused) == reusing

    def fresh(key, build, state, reusable=True):
        module = build()
        module.load_state_dict(state, strict=True)
        return module

    monkeypatch.setattr(client_utils, "module_holding", fresh)
    if hasattr(client, "module_holding"):
        monkeypatch.setattr(client, "module_holding", fresh)
    run_fresh = cli.simulate(resolve_job_config([*overrides, f"output_dir={tmp_path / 'fresh'}"]))
    reused_weights, fresh_weights = weights_of(run_reused), weights_of(run_fresh)
    assert reused_weights and sorted(reused_weights) == sorted(fresh_weights)
    assert [k for k in fresh_weights if not torch.equal(reused_weights[k], fresh_weights[k])] == []
    assert trained_rows(run_reused) == trained_rows(run_fresh)
