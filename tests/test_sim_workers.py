"""Clients served side by side in the in-process simulation (``sim.client_workers``, graftfl/sim/workers.py).

Fast tests drive the grid with small ClientApps: Flower's message rules still hold on the
workers, clients overlap only inside their training loops (graftfl/core/overlap.py), and each
worker has the clients' torch thread count. The run tests check the promise that matters:
with workers, every protocol ends with the weights and per-round figures of one client at a time.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from graftfl.config import ConfigError
from graftfl.core.overlap import draws_global_randomness, exclusive, overlapping
from graftfl.sim import inprocess_workers
from tests.test_sim_fastpath import counting_app, serving, threads_app, trained_rows, weights_of


def messages_to(grid, nodes, kind, **config) -> list[Message]:
    return [Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=node, message_type=f"train.{kind}") for node in nodes]


def test_workers_keep_flowers_rules_and_reply_in_the_order_pushed():
    with serving(counting_app(), 3, client_workers=2) as grid:
        nodes = grid.node_ids
        # two messages to one node in one batch: served one after the other, in the order pushed
        replies = list(grid.send_and_receive(messages_to(grid, [nodes[0], nodes[1], nodes[0], nodes[2]], "count"), timeout=30))
        assert [r.metadata.src_node_id for r in replies] == [nodes[0], nodes[1], nodes[0], nodes[2]]
        assert [r.content["metrics"]["count"] for r in replies] == [1, 1, 2, 1]
        (failed,) = grid.send_and_receive(messages_to(grid, [nodes[1]], "fail"), timeout=30)
        assert failed.has_error() and "site broke" in failed.error.reason
        (after,) = grid.send_and_receive(messages_to(grid, [nodes[1]], "count"), timeout=30)
        assert after.content["metrics"]["count"] == 2  # the failed message's state change was not kept


def test_after_the_timeout_no_message_starts_and_late_replies_wait_for_a_pull():
    with serving(counting_app(), 3, client_workers=2) as grid:
        messages = messages_to(grid, grid.node_ids, "sleep", seconds=0.4)
        started = time.monotonic()
        assert list(grid.send_and_receive(messages, timeout=0.1)) == []  # two were running at the deadline, the third never started
        assert time.monotonic() - started >= 0.4  # the running clients were not interrupted
        assert grid.messages_handled == 2
        late = list(grid.pull_messages([m.metadata.message_id for m in messages]))
        assert len(late) == 3 and grid.messages_handled == 3  # the pull ran the third


def overlap_app(model_factory, inside: list[int], outside: list[int], meet: threading.Barrier) -> ClientApp:
    """Counts how many clients are in their training loop (``inside``) and outside it at once; ``meet`` waits for a second one."""
    app, now = ClientApp(), {"inside": 0, "outside": 0}
    guard = threading.Lock()

    def enter(where: str, peaks: list[int]) -> None:
        with guard:
            now[where] += 1
            peaks.append(now[where])

    def leave(where: str) -> None:
        with guard:
            now[where] -= 1

    @app.train("step")
    def step(message, context):
        enter("outside", outside)
        time.sleep(0.05)  # outside the loop: a second client must not be here too
        leave("outside")
        with overlapping(model_factory()):
            enter("inside", inside)
            met = 1
            try:
                meet.wait(timeout=2)
            except threading.BrokenBarrierError:
                met = 0
            leave("inside")
        return Message(RecordDict({"metrics": MetricRecord({"met": met})}), reply_to=message)

    return app


def test_only_training_loops_overlap():
    inside, outside = [], []
    app = overlap_app(lambda: torch.nn.Linear(2, 2), inside, outside, threading.Barrier(2))
    with serving(app, 2, client_workers=2) as grid:
        replies = list(grid.send_and_receive(messages_to(grid, grid.node_ids, "step"), timeout=30))
    assert [r.content["metrics"]["met"] for r in replies] == [1, 1]  # both clients were in their loops at once
    assert max(inside) == 2 and max(outside) == 1


def test_a_model_that_draws_from_the_global_generator_trains_alone():
    inside, outside = [], []
    app = overlap_app(lambda: torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)), inside, outside, threading.Barrier(2))
    with serving(app, 2, client_workers=2) as grid:
        replies = list(grid.send_and_receive(messages_to(grid, grid.node_ids, "step"), timeout=30))
    assert [r.content["metrics"]["met"] for r in replies] == [0, 0] and max(inside) == 1  # dropout: one loop at a time
    assert draws_global_randomness(torch.nn.Sequential(torch.nn.RReLU())) and not draws_global_randomness(torch.nn.Linear(1, 1))


def test_overlapping_gives_the_lock_back_even_when_the_loop_raises():
    lock = threading.Lock()
    with exclusive(lock):
        with pytest.raises(RuntimeError):
            with overlapping(torch.nn.Linear(1, 1)):
                assert not lock.locked()
                raise RuntimeError("diverged")
        assert lock.locked()
    assert not lock.locked()
    with exclusive(lock):
        with overlapping():  # converting this client's own data (a reply's weights): no model to check
            assert not lock.locked()
        with overlapping(torch.nn.Sequential(torch.nn.Dropout())):
            assert lock.locked()
    with overlapping(torch.nn.Linear(1, 1)):  # no simulation worker: nothing to release
        pass


def test_workers_have_the_client_threads_and_the_process_keeps_its_own():
    before = torch.get_num_threads()
    seen = []
    with serving(threads_app(), 3, client_threads=before + 1, client_workers=2) as grid:
        messages = [Message(RecordDict(), dst_node_id=node, message_type="query.threads") for node in grid.node_ids]
        replies = list(grid.send_and_receive(messages, timeout=30))
        other = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        other.start()
        other.join()
    assert [r.content["metrics"]["threads"] for r in replies] == [before + 1] * 3
    assert torch.get_num_threads() == before and seen == [before]  # threads started later get the process's count


def test_client_workers_key_is_checked():
    from omegaconf import OmegaConf

    from graftfl.config import compose_config

    assert inprocess_workers(compose_config([])) == 1  # the documented default: one client at a time
    assert inprocess_workers(OmegaConf.create({"sim": {"client_workers": 3}})) == 3
    for bad in (0, 2.5, True, "two"):
        with pytest.raises(ConfigError, match="sim.client_workers must be a whole number >= 1"):
            inprocess_workers(OmegaConf.create({"sim": {"client_workers": bad}}))


# ------------------------------------------------------------------ runs: the same weights with workers
COMMON = ["dataset=digits", "num_clients=4", "rounds=2", "progress=false", "seed=3", "sim.backend=inprocess", "client_resources.num_cpus=1"]
RUNS = {
    "fedavg": [],
    "fedavg-dpsgd": ["privacy=dpsgd"],  # Opacus draws from the global generator: its loop keeps the lock
    "dssgd": [],
    "dssgd-random-download": ["protocol.download=random", "protocol.theta_download=0.5", "protocol.selection=threshold",
                              "protocol.threshold=0.001"],
    "features": ["partition.samples_per_client=200", "dataset.test_size=200", "protocol.latent_dim=16", "protocol.autoencoder.epochs=2",
                 "protocol.chunk_size=100", "protocol.classifier.epochs=3", "rounds=1", "protocol.autoencoder.rounds=2"],
    "split": [],
}


@pytest.mark.parametrize("name", list(RUNS))
def test_runs_with_workers_end_with_the_weights_of_one_client_at_a_time(name, tmp_path, monkeypatch):
    from graftfl import cli
    from graftfl.config import resolve_job_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRAFTFL_SPLIT_KEY", "5a" * 32)  # split relay: one sites' key for both runs
    protocol = name.split("-")[0]
    runs = {}
    for workers in (1, 3):
        overrides = [f"protocol={protocol}", *COMMON, *RUNS[name], f"sim.client_workers={workers}", f"output_dir={tmp_path / str(workers)}"]
        runs[workers] = cli.simulate(resolve_job_config(overrides))
    alone, side_by_side = weights_of(runs[1]), weights_of(runs[3])
    assert alone and sorted(alone) == sorted(side_by_side)
    assert [key for key in alone if not torch.equal(alone[key], side_by_side[key])] == []
    assert trained_rows(runs[1]) == trained_rows(runs[3])
