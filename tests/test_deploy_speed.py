"""The pieces that make a deploy-local round cheaper (issue 15), checked without starting a deployment."""

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from graftfl.clients.app import LazyHandler, build_client_app, message_types
from graftfl.clients.guard import SiteError
from graftfl.deploy import isolation, warm_superexec
from graftfl.protocols import client_handlers, load_client_protocol
from graftfl.server_app.prompt_grid import PromptGrid
from tests.conftest import ROOT, flower_task_identity


# -- the ClientApp imports a protocol only when its message arrives ---------------------------------
def test_importing_the_client_app_imports_no_protocol_torchvision_or_hydra():
    code = ("import sys, graftfl.clients.app as a; "
            "print(sorted(m for m in sys.modules if m.startswith('graftfl.clients.') or m.split('.')[0] in "
            "('torchvision', 'hydra', 'opacus', 'sklearn', 'datasets')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    loaded = done.stdout.strip()
    assert "graftfl.clients.fedavg" not in loaded and "graftfl.clients.split" not in loaded
    for heavy in ("torchvision", "hydra", "opacus", "sklearn", "'datasets"):
        assert heavy not in loaded, loaded


def test_every_registered_handler_has_a_lazy_route_that_resolves_to_it():
    routes = message_types()
    handlers = client_handlers()
    assert set(handlers) <= set(routes)
    for message_type, handler in handlers.items():
        route = routes[message_type]
        declaration = route.load(route.name)
        assert declaration.handlers()[message_type] is handler


def test_a_message_type_the_protocol_does_not_handle_fails_with_flowers_words():
    assert "query" not in {category.split(".")[0] for category in load_client_protocol("fedavg").handlers()}
    app = build_client_app()
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(),
                      run_config={})
    with flower_task_identity():
        message = Message(RecordDict(), dst_node_id=1, message_type="query.fedavg")
        with pytest.raises(SiteError, match="No query function registered with name 'fedavg'"):
            app(message, context)


def test_a_lazy_handler_whose_protocol_has_no_client_side_says_so():
    handler = LazyHandler("train", "centralized", lambda name: None)
    with pytest.raises(ValueError, match="No train function registered with name 'centralized'"):
        handler(None, None)


# -- the ServerApp's prompt reply pulls -------------------------------------------------------------
class ScriptedGrid:
    """Replies to message ``i`` become available at the ``arrive[i]``-th pull."""

    def __init__(self, arrive: list[int]):
        self.arrive, self.pulls, self.pushed = arrive, 0, []
        self.closed = False

    def push_messages(self, messages):
        self.pushed = list(messages)
        return [f"id-{i}" for i in range(len(self.pushed))]

    def pull_messages(self, message_ids):
        self.pulls += 1
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"id-{i}"))
                for i, at in enumerate(self.arrive) if at == self.pulls and f"id-{i}" in set(message_ids)]

    def get_node_ids(self):
        return [7, 8]

    def close(self):
        self.closed = True


def test_prompt_grid_collects_every_reply_and_pulls_at_its_interval():
    inner = ScriptedGrid(arrive=[1, 3])
    grid = PromptGrid(inner, interval=0.05)
    started = time.monotonic()
    replies = list(grid.send_and_receive(["a", "b"], timeout=30))
    elapsed = time.monotonic() - started
    assert sorted(reply.metadata.reply_to_message_id for reply in replies) == ["id-0", "id-1"]
    assert inner.pulls == 3 and inner.pushed == ["a", "b"]
    assert 0.09 <= elapsed < 1.5  # two waits of 0.05 s, not Flower's 2 x 3 s


def test_prompt_grid_returns_what_arrived_when_the_timeout_passes():
    inner = ScriptedGrid(arrive=[1, 10_000])
    replies = list(PromptGrid(inner, interval=0.02).send_and_receive(["a", "b"], timeout=0.3))
    assert [reply.metadata.reply_to_message_id for reply in replies] == ["id-0"]


def test_prompt_grid_delegates_the_rest_of_the_grid():
    inner = ScriptedGrid(arrive=[])
    grid = PromptGrid(inner)
    assert list(grid.get_node_ids()) == [7, 8]
    grid.close()
    assert inner.closed


# -- isolation modes ----------------------------------------------------------------------------------
def test_isolation_modes_and_their_commands():
    with pytest.raises(ValueError, match="'warm', 'process', 'subprocess'"):
        isolation.check_isolation("thread")
    assert isolation.supernode_isolation_args("subprocess") == []
    assert isolation.superexec_args("subprocess", 9000) is None
    assert isolation.supernode_isolation_args("warm") == ["--isolation", "process"]
    warm = isolation.superexec_args("warm", 9000)
    assert warm[:3] == [sys.executable, "-m", "graftfl.deploy.warm_superexec"]
    assert warm[-2:] == ["--runtime-api-address", "127.0.0.1:9000"]
    assert isolation.superexec_args("process", 9000)[0].endswith("flower-superexec")


def test_deployment_processes_poll_for_tasks_quickly_unless_the_caller_chose(tmp_path, monkeypatch):
    from graftfl.deploy.local import LocalDeployment

    monkeypatch.delenv(isolation.TASK_POLL_ENV, raising=False)
    assert LocalDeployment(tmp_path / "a", num_nodes=1).env()[isolation.TASK_POLL_ENV] == isolation.TASK_POLL_S
    monkeypatch.setenv(isolation.TASK_POLL_ENV, "2.5")
    assert LocalDeployment(tmp_path / "b", num_nodes=1).env()[isolation.TASK_POLL_ENV] == "2.5"
    with pytest.raises(ValueError, match="isolation"):
        LocalDeployment(tmp_path / "c", num_nodes=1, isolation="threads")


# -- the warm SuperExec ---------------------------------------------------------------------------------
def test_warm_up_leaves_torchs_random_state_and_thread_count_as_a_fresh_process_has_them():
    threads = torch.get_num_threads()
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    warm_superexec.warm_up_torch()
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == 1 and warm_superexec._RESTORE["threads"] == threads
    torch.set_num_threads(threads)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_executor_runs_clientapp_tasks_in_children_and_passes_the_rest_on(tmp_path, monkeypatch):
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

    marker = tmp_path / "child-ran"

    def fake_task(spec):  # what the child runs instead of Flower's run_clientapp
        marker.write_text(f"{spec.token} {os.getpid()}")
        os._exit(0)

    monkeypatch.setattr(warm_superexec, "run_task_in_child", fake_task)
    fallback = SimpleNamespace(launched=[], launch=lambda spec: fallback.launched.append(spec) or LaunchResult.accepted(),
                               close=lambda: None)
    executor = warm_superexec.ForkExecutor(fallback)

    def spec(task_type):
        return ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:1", token="tok", insecure=True,
                             root_certificates_path=None, runtime_dependency_install=False, parent_pid=None,
                             suppress_output=False, task_id=1)

    assert executor.launch(spec(TaskType.CLIENT_APP)).status == "accepted"
    deadline = time.monotonic() + 30
    while executor.children:
        executor.reconcile()
        assert time.monotonic() < deadline, "the forked child was never reaped"
        time.sleep(0.02)
    token, pid = marker.read_text().split()
    assert token == "tok" and int(pid) != os.getpid()
    executor.launch(spec(TaskType.SERVER_APP))
    assert [launched.task_type for launched in fallback.launched] == [TaskType.SERVER_APP]
