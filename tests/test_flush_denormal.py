"""``flush_denormal``: denormal floats as zero, in every thread that trains for the run.

The flag is per thread (x86's MXCSR), so each place that computes for a run sets it: the
server's process (``run_protocol``), a site before it trains (``training_device``) and the split
data plane's handler threads (tests/test_split_plane.py). Off is set as actively as on: simulated
sites of several runs share threads.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict

from graftfl.clients.utils import training_device
from graftfl.config import ConfigError, compose_config
from graftfl.core.denormals import flush_denormals

DENORMAL = 1e-39  # below float32's smallest normal number, 1.18e-38


def flushes() -> bool:
    """Whether this thread's CPU arithmetic turns a denormal float32 into zero."""
    return (torch.tensor([DENORMAL]) * 1.0).item() == 0.0


@pytest.fixture(autouse=True)
def restore_flag():
    yield
    flush_denormals(False)


def site_context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(), run_config={})


def test_denormals_are_kept_unless_a_run_asks():
    assert compose_config([]).flush_denormal is False
    assert not flushes()
    assert flush_denormals(True) and flushes()


def test_the_flag_reaches_the_openmp_threads_torch_already_started():
    # x86 keeps the flag per thread, and torch splits a large op over its OpenMP team; setting it in
    # this thread alone flushed half of this product's denormals
    process_threads = torch.get_num_threads()
    many = torch.full((1 << 22,), DENORMAL)
    try:
        torch.set_num_threads(2)
        assert bool((many * 1.0).all())  # the team exists now, with denormals kept
        flush_denormals(True)
        assert int((many * 1.0).count_nonzero()) == 0
        flush_denormals(False)
        assert bool((many * 1.0).all())
    finally:
        torch.set_num_threads(process_threads)


def test_a_thread_computing_with_one_torch_thread_gets_no_openmp_pool():
    # a data-plane handler thread computes with 1 thread: a team of more would start a pool of its own
    # (a second pool beyond the cores slowed every later step in the process about twofold)
    import os
    import threading

    started = []

    def handler():
        torch.set_num_threads(1)
        before = set(os.listdir("/proc/self/task"))
        flush_denormals(True)
        flush_denormals(False)
        started.append(set(os.listdir("/proc/self/task")) - before)  # threads of earlier tests may end meanwhile, none start

    worker = threading.Thread(target=handler)
    worker.start()
    worker.join()
    assert started == [set()]


def test_a_task_runs_once_in_each_thread_of_the_team_and_its_error_comes_back():
    import threading

    from graftfl.core.denormals import in_team

    seen = []
    assert in_team(lambda: seen.append(threading.get_native_id()), 2)  # no more threads than a 2-core machine has
    assert len(seen) == 2 and len(set(seen)) == 2 and threading.get_native_id() in seen

    def fail():
        raise RuntimeError("in a team thread")

    with pytest.raises(RuntimeError, match="in a team thread"):
        in_team(fail, 2)


@pytest.mark.parametrize("value", ["yes", "1", "'false'"])
def test_the_flag_must_be_a_boolean(value):
    with pytest.raises(ConfigError, match="flush_denormal must be true or false"):
        compose_config([f"flush_denormal={value}"])


def test_a_site_sets_the_runs_flag_before_it_trains_and_clears_one_left_by_another_run():
    training_device(compose_config(["flush_denormal=true", "device=cpu"]), site_context())
    assert flushes()
    training_device(compose_config(["device=cpu"]), site_context())
    assert not flushes()


@pytest.mark.slow
def test_a_run_sets_the_flag_in_the_servers_process_and_a_later_run_clears_it(tmp_path):
    from graftfl import cli
    from graftfl.config import resolve_job_config

    seen = []
    for flag in ("true", "false"):
        overrides = ["protocol=centralized", "dataset=digits", "model=mlp", "rounds=1", "sim.backend=inprocess",
                     f"flush_denormal={flag}", f"output_dir={tmp_path}", "progress=false"]
        cli.simulate(resolve_job_config(overrides))
        seen.append(flushes())
    assert seen == [True, False]
