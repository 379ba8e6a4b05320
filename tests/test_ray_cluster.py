"""`graftfl sim` attached to an existing Ray cluster (how Flower simulation spans several machines)."""

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from graftfl import ray_cluster
from graftfl.cli import main
from graftfl.deploy.local import free_loopback_ports
from graftfl.deploy.supervise import ProcessGroup, marked_pids, tail
from tests.conftest import read_metrics, run_dir_from, run_graftfl

RAY = Path(sys.executable).parent / "ray"


def test_the_address_comes_from_the_flag_then_the_config_else_none():
    cfg = OmegaConf.create({"sim": {"ray_address": "10.0.0.5:6379"}})
    assert ray_cluster.ray_address_of(cfg) == "10.0.0.5:6379"
    assert ray_cluster.ray_address_of(cfg, "auto") == "auto"
    assert ray_cluster.ray_address_of(OmegaConf.create({"sim": {"ray_address": None}})) is None
    assert ray_cluster.ray_address_of(OmegaConf.create({})) is None


def test_backend_config_names_the_cluster_only_when_attaching():
    cfg = OmegaConf.create({"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    assert "address" not in ray_cluster.backend_config(cfg)["init_args"]
    attached = ray_cluster.backend_config(cfg, "10.0.0.5:6379")
    assert attached["init_args"]["address"] == "10.0.0.5:6379"
    assert attached["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}


def test_workers_get_this_checkout_first_and_every_graftfl_variable_but_nothing_else():
    env = ray_cluster.worker_env({"GRAFTFL_SPLIT_KEY": "k" * 64, "GRAFTFL_DATA_DIR": "/d", "HOME": "/home/x",
                                  "PYTHONPATH": "/extra"})
    assert env["GRAFTFL_SPLIT_KEY"] == "k" * 64 and env["GRAFTFL_DATA_DIR"] == "/d"
    assert "HOME" not in env
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert paths[-1] == "/extra"
    assert str(Path(ray_cluster.__file__).parents[1]) in paths  # the checkout graftfl is imported from


def test_a_local_ray_start_that_timed_out_is_retried_and_other_errors_are_not(monkeypatch):
    import ray

    calls, shutdowns = [], []

    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_0")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # start_local sets it, as Flower's backend does
    ray_cluster.start_local({"init_args": {"include_dashboard": False, "log_to_driver": True}})
    assert len(calls) == 2 and shutdowns == [1]
    assert calls[1]["runtime_env"]["env_vars"]["PYTHONPATH"].startswith(os.pathsep.join(sys.path)) and calls[1]["log_to_driver"]

    calls.clear()
    shutdowns.clear()

    def node_timeout(**kwargs):  # the other start timeout, raised by Ray as a bare Exception
        calls.append(kwargs)
        if len(calls) < 3:
            raise Exception("The current node timed out during startup. This could happen because some of the raylet failed")

    monkeypatch.setattr(ray, "init", node_timeout)
    ray_cluster.start_local({"init_args": {}})
    assert len(calls) == 3 and shutdowns == [1, 1]
    calls.clear()
    monkeypatch.setattr(ray, "init", lambda **kwargs: (_ for _ in ()).throw(Exception("The current node timed out during startup")))
    with pytest.raises(Exception, match="timed out during startup"):  # the last attempt's error is raised
        ray_cluster.start_local({"init_args": {}})

    monkeypatch.setattr(ray, "init", lambda **kwargs: (_ for _ in ()).throw(RuntimeError("no permission")))
    with pytest.raises(RuntimeError, match="no permission"):
        ray_cluster.start_local({"init_args": {}})


def test_an_address_where_no_cluster_listens_is_a_config_error_at_once(tmp_path, monkeypatch, capsys):
    (port,) = free_loopback_ports(1)  # nothing listens there
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    code = main(["sim", "--ray-address", f"127.0.0.1:{port}", "protocol=fedavg", "dataset=digits", "num_clients=2",
                 "rounds=1", "progress=false"])
    assert code == 2
    assert f"sim.ray_address='127.0.0.1:{port}'" in capsys.readouterr().err
    assert time.monotonic() - started < 60  # Ray alone would retry for minutes


@pytest.fixture
def ray_head():
    """A one-node Ray cluster (`ray start --head`) of this test only, stopped by its own pids afterwards.

    Every process of the cluster carries this group's marker in its environment, so stopping it
    signals exactly those processes and never another Ray instance on the machine (`ray stop`
    would stop every cluster of the user). The temporary dir is short: Ray's Unix sockets live in it.
    """
    if not RAY.exists():
        pytest.skip(f"no ray CLI beside {sys.executable}")
    temp_dir = Path(tempfile.mkdtemp(prefix="gr", dir="/tmp"))
    port, client_port, agent_port, agent_grpc, runtime_env_port, metrics_port, node_port, object_port = free_loopback_ports(8)
    group = ProcessGroup(temp_dir / "logs", temp_dir)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    args = [str(RAY), "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
            "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", str(temp_dir / "ray"), "--include-dashboard", "false",
            "--disable-usage-stats", "--ray-client-server-port", str(client_port),
            "--dashboard-agent-listen-port", str(agent_port), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env_port), "--metrics-export-port", str(metrics_port),
            "--node-manager-port", str(node_port), "--object-manager-port", str(object_port)]
    head = group.start("ray-head", args, env)
    try:
        group.wait_until("the Ray head", lambda: "Ray runtime started" in tail(head.log, 200), [head], 120)
        yield {"address": f"127.0.0.1:{port}", "temp_dir": temp_dir / "ray"}
    finally:
        survivors = group.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors and not marked_pids(group.marker), f"Ray processes left running: {survivors}"


@pytest.mark.slow
def test_sim_runs_on_an_existing_ray_cluster(ray_head, workdir):
    proc = run_graftfl("sim", "--ray-address", ray_head["address"], "protocol=fedavg", "dataset=digits", "num_clients=2",
                       "rounds=1", "progress=false", cwd=workdir, timeout=400)
    run_dir = run_dir_from(proc, workdir)
    assert [row["round"] for row in read_metrics(run_dir)] == [1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["num_clients"] == 2
    # The run used this cluster: its driver connected there (Ray writes a driver log into the
    # session of the cluster a driver joins) and the ClientApp actors ran on its workers.
    logs = ray_head["temp_dir"] / "session_latest" / "logs"
    assert list(logs.glob("python-core-driver-*.log")), sorted(p.name for p in logs.iterdir())
    worker_logs = [path for path in logs.glob("worker-*.err") if "ClientAppActor" in path.read_text(errors="replace")]
    assert worker_logs or any("ClientAppActor" in path.read_text(errors="replace") for path in logs.glob("worker-*.out")), \
        "no ClientApp actor ran on the cluster"
    assert "attached to the Ray cluster" in proc.stderr + proc.stdout
