"""The protocol contract: loaded through one registry, checked at load time; pre-training phases plug in once.

A phase and a protocol defined here run through :func:`run_protocol` and the
shared :class:`~tests.helpers.FakeGrid`, which hands each message to the
handler the real ClientApp routes it to.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from graftfl import protocols
from graftfl.config import ConfigError, compose_config
from graftfl.protocols import (
    ClientPhase,
    ClientProtocol,
    ProtocolError,
    ServerPhase,
    ServerProtocol,
    load_client_protocol,
    load_protocol,
    phase_state_key,
    register_phase,
    register_protocol,
)
from graftfl.server_app.app import run_protocol
from tests.conftest import flower_task_identity
from tests.helpers import FakeGrid

GOOD_SERVER = """
from graftfl.protocols import ServerProtocol

def run(grid, run):
    return {}

def validate_config(cfg):
    pass

SERVER_PROTOCOL = ServerProtocol(name="fedavg", run=run, validate_config=validate_config)
"""


@pytest.fixture
def registry():
    """Restore the registry after a test that registers or replaces protocols and phases."""
    saved = (dict(protocols._PROTOCOLS), dict(protocols._PHASES))
    yield protocols
    protocols._PROTOCOLS.clear(), protocols._PROTOCOLS.update(saved[0])
    protocols._PHASES.clear(), protocols._PHASES.update(saved[1])


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """Write throwaway protocol modules importable as ``<name>``."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "source, says",
    [
        (GOOD_SERVER.replace("validate_config=validate_config", "validate_confg=validate_config"), "unexpected keyword argument 'validate_confg'"),
        (GOOD_SERVER.replace("def validate_config", "def validate_confg"), "name 'validate_config' is not defined"),
        (GOOD_SERVER.replace("run=run, ", ""), "missing 1 required positional argument: 'run'"),
        (GOOD_SERVER.replace("def run(grid, run)", "def run(grid)"), "'run' must accept 2 positional argument(s)"),
        (GOOD_SERVER.replace("SERVER_PROTOCOL =", "SERVER =") , "defines no SERVER_PROTOCOL = ServerProtocol(...)"),
        (GOOD_SERVER.replace('name="fedavg"', 'name="fedavgg"'), "declares name 'fedavgg' but is registered as 'fedavg'"),
        (GOOD_SERVER.replace("run=run", "run=None"), "'run' must be a callable"),
    ],
)
def test_a_broken_protocol_module_fails_at_load_with_a_clear_message(registry, module_dir, source, says):
    module = module_dir("broken_fedavg_server", source)
    registry.register_protocol("fedavg", server=module, client="graftfl.clients.fedavg")
    with pytest.raises(ProtocolError) as failure:
        load_protocol("fedavg")
    assert says in str(failure.value) and "protocol 'fedavg'" in str(failure.value)
    # config validation loads through the same registry: the broken module stops the run before it starts
    with pytest.raises(ProtocolError, match="protocol 'fedavg'"):
        compose_config(["protocol=fedavg", "dataset=digits"])


def test_the_good_module_loads_and_config_validation_calls_its_checks(registry, module_dir):
    module = module_dir("good_fedavg_server", GOOD_SERVER.replace("    pass", "    raise ValueError('protocol.x must be 1')"))
    registry.register_protocol("fedavg", server=module, client="graftfl.clients.fedavg")
    assert load_protocol("fedavg").federated is True
    with pytest.raises(ConfigError, match="protocol.x must be 1"):
        compose_config(["protocol=fedavg", "dataset=digits"])


def test_broken_client_side_and_registry_errors_are_loud(registry, module_dir):
    module = module_dir("broken_fedavg_client", """
        from graftfl.protocols import ClientProtocol
        CLIENT_PROTOCOL = ClientProtocol(name="fedavg")
    """)
    registry.register_protocol("fedavg", server="graftfl.strategies.fedavg", client=module)
    with pytest.raises(ProtocolError, match="needs at least one handler among"):
        load_client_protocol("fedavg")
    with pytest.raises(ProtocolError, match=r"unknown protocol 'nope'; valid: \[.*'split'"):
        load_protocol("nope")
    registry.register_protocol("lonely", server=module_dir("lonely_server", GOOD_SERVER.replace('"fedavg"', '"lonely"')))
    with pytest.raises(ProtocolError, match="federated but registers no client module"):
        load_protocol("lonely")
    registry.register_protocol("ghost", server="graftfl.strategies.ghost", client="graftfl.clients.ghost")
    with pytest.raises(ProtocolError, match="module 'graftfl.strategies.ghost' does not exist"):
        load_protocol("ghost")
    with pytest.raises(ProtocolError, match="must be a Python identifier"):
        register_protocol("not-a-name", server="x")
    with pytest.raises(ProtocolError, match="a protocol already has that name"):
        register_phase("split", server="x")


def test_every_builtin_protocol_honours_the_contract():
    for name in protocols.protocol_names():
        server = load_protocol(name)
        client = load_client_protocol(name)
        assert server.name == name and (client is not None) == server.federated
        if client is not None:
            assert all(message_type.endswith(f".{name}") for message_type in client.handlers())


def test_config_rejects_unknown_repeated_and_siteless_phases(registry):
    register_phase("probe", server=ServerPhase(name="probe", run=lambda grid, run, node_ids: {}))
    with pytest.raises(ConfigError, match=r"unknown phase 'dedupe' in phases; valid phases: \[.*'probe'.*\]"):
        compose_config(["protocol=fedavg", "dataset=digits", "phases=[dedupe]"])
    with pytest.raises(ConfigError, match="lists a phase twice"):
        compose_config(["protocol=fedavg", "dataset=digits", "phases=[probe,probe]"])
    with pytest.raises(ConfigError, match="need a federated protocol; protocol 'centralized'"):
        compose_config(["protocol=centralized", "dataset=digits", "phases=[probe]"])
    assert list(compose_config(["protocol=fedavg", "dataset=digits", "phases=[probe]"]).phases) == ["probe"]


# ------------------------------------------------------- a phase end to end ---

EVENTS: list[tuple] = []


def probe_phase_server(grid, run, node_ids):
    """Ask every site for a fact only it knows (its partition id times 10) and total them."""
    EVENTS.append(("phase-server", tuple(node_ids)))
    messages = [Message(RecordDict({"config": run.config_record()}), dst_node_id=node, message_type="query.probe") for node in node_ids]
    replies = grid.send_and_receive(messages)
    return {"sites": len(replies), "total": sum(int(r.content["metrics"]["local-fact"]) for r in replies)}


def probe_phase_client(message, context):
    fact = 10 * int(context.node_config["partition-id"])
    context.state[phase_state_key("probe")] = ConfigRecord({"local-fact": fact})
    EVENTS.append(("phase-client", context.node_id))
    return Message(RecordDict({"metrics": MetricRecord({"local-fact": fact})}), reply_to=message)


def probe_protocol_server(grid, run):
    EVENTS.append(("protocol-server",))
    messages = [Message(RecordDict({"config": run.config_record()}), dst_node_id=node, message_type="train.probeproto") for node in grid.get_node_ids()]
    replies = grid.send_and_receive(messages)
    return {"seen": {str(r.metadata.src_node_id): int(r.content["metrics"]["seen"]) for r in replies}}


def probe_protocol_client(message, context):
    """The protocol's own handler reads what the phase left in this site's state."""
    state = context.state.get(phase_state_key("probe"))
    EVENTS.append(("protocol-client", context.node_id))
    return Message(RecordDict({"metrics": MetricRecord({"seen": -1 if state is None else int(state["local-fact"])})}), reply_to=message)


def test_a_phase_runs_once_before_the_protocol_and_its_site_state_reaches_the_protocol(registry, tmp_path):
    register_phase("probe", server=ServerPhase(name="probe", run=probe_phase_server), client=ClientPhase(name="probe", query=probe_phase_client))
    register_protocol(
        "probeproto",
        server=ServerProtocol(name="probeproto", run=probe_protocol_server, validate_config=lambda cfg: None),
        client=ClientProtocol(name="probeproto", train=probe_protocol_client),
    )
    cfg = compose_config(["protocol=fedavg", "dataset=digits", "num_clients=3", "phases=[probe]", f"output_dir={tmp_path}"])
    cfg.protocol.name = "probeproto"  # a protocol without a config file, reached through the registry
    grid = FakeGrid(3)
    EVENTS.clear()
    with flower_task_identity():
        run_dir = run_protocol(grid, cfg)

    kinds = [event[0] for event in EVENTS]
    assert kinds == ["phase-server", "phase-client", "phase-client", "phase-client", "protocol-server", "protocol-client", "protocol-client", "protocol-client"]
    assert EVENTS[0] == ("phase-server", (100, 101, 102))
    assert [m.metadata.message_type for m in grid.sent] == ["query.probe"] * 3 + ["train.probeproto"] * 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["phases"] == {"probe": {"sites": 3, "total": 0 + 10 + 20}}
    assert summary["seen"] == {"100": 0, "101": 10, "102": 20}  # each site saw its own phase result


def test_a_run_without_phases_sends_no_phase_messages_and_writes_no_phases_field(registry, tmp_path):
    register_protocol(
        "probeproto",
        server=ServerProtocol(name="probeproto", run=probe_protocol_server, validate_config=lambda cfg: None),
        client=ClientProtocol(name="probeproto", train=probe_protocol_client),
    )
    cfg = compose_config(["protocol=fedavg", "dataset=digits", "num_clients=2", f"output_dir={tmp_path}"])
    cfg.protocol.name = "probeproto"
    grid = FakeGrid(2)
    with flower_task_identity():
        summary = json.loads((run_protocol(grid, cfg) / "summary.json").read_text())
    assert "phases" not in summary and summary["seen"] == {"100": -1, "101": -1}
    assert [m.metadata.message_type for m in grid.sent] == ["train.probeproto"] * 2
