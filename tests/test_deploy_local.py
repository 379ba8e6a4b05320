"""`graftfl deploy-local`: real flower-superlink + flower-supernodes on loopback, TLS, auth, cleanup.

The end-to-end tests run the real command in a subprocess whose environment carries a
unique tag; every process the deployment starts inherits it, so after the command
returns we can list (from /proc) anything of ours that survived.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from omegaconf import OmegaConf

from graftfl.config import compose_config
from graftfl.deploy.flower_files import CONNECTION, hydra_quote, run_config_overrides, write_flower_config, write_run_config
from graftfl.deploy.local import LocalDeployment
from graftfl.deploy.supervise import marked_pids, processes_with_env
from graftfl.tls import generate_node_auth_keys, generate_tls_files

ROOT = Path(__file__).resolve().parent.parent
TAG_ENV = "GRAFTFL_TEST_TAG"
needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="process listing needs Linux /proc")


# -- helpers ---------------------------------------------------------------------------
def tagged_processes(tag: str) -> dict[int, str]:
    """pid -> command line of live processes whose environment carries ``TAG_ENV=tag``."""
    return processes_with_env(TAG_ENV, tag)


def _default_sigint() -> None:
    # A CI job started in the background by a non-interactive shell inherits SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler: give the child a real Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def graftfl_process(args: list[str], cwd: Path, tag: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", TAG_ENV: tag}
    return subprocess.Popen([sys.executable, "-m", "graftfl.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint)


def stop_deploy_local(process: subprocess.Popen, tag: str) -> None:
    """After a failed test: SIGTERM (deploy-local then stops its own processes), then what is left."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pid in tagged_processes(tag):  # only processes carrying this test's tag: ours
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def run_deploy_local(args: list[str], cwd: Path, timeout: float = 240) -> tuple[Path, str]:
    """Run ``graftfl deploy-local ARGS`` to the end; return the run dir and stderr; assert no survivors."""
    tag = uuid.uuid4().hex
    process = graftfl_process(["deploy-local", *args], cwd, tag)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        survivors = tagged_processes(tag)  # before any cleanup of ours
    finally:
        stop_deploy_local(process, tag)
    assert process.returncode == 0, f"deploy-local {shlex.join(args)} exited {process.returncode}\n{stdout[-3000:]}\n{stderr[-6000:]}"
    assert survivors == {}, "processes of the deployment survived the command"
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("run: "), f"last stdout line is not 'run: ...': {last!r}"
    return cwd / last.removeprefix("run: "), stderr


def workdir_from(stderr: str) -> Path:
    match = re.search(r"workdir (\S+)", stderr)
    assert match, "deploy-local did not name its temporary directory"
    return Path(match.group(1))


RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt", "accuracy.png", "accuracy_vs_bytes.png")


def assert_run_directory(run_dir: Path, num_clients: int, rounds: int, protocol: str = "fedavg", dataset: str = "digits") -> dict:
    """The run format a deployed run writes; returns its config.yaml."""
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), f"{name} missing in {run_dir}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    training = [row for row in rows if row["round"] >= 1]  # a pre-training phase (dedup) writes round 0
    assert [row["round"] for row in training] == list(range(1, rounds + 1))
    for row in training:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["protocol"] == protocol and summary["dataset"] == dataset
    assert summary["num_clients"] == num_clients and summary["rounds"] == rounds
    return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))


def assert_deployment(stderr: str, config: dict, num_nodes: int, tls: bool = False, auth: bool = False) -> None:
    """What deploy-local said it started (security included), what the ServerApp got, and that its workdir is gone."""
    assert f"{num_nodes} SuperNodes online" in stderr
    if auth:
        assert "(TLS, SuperNode auth)" in stderr and f"registered {num_nodes} SuperNode public keys" in stderr
    else:
        assert ("(TLS)" if tls else "(insecure)") in stderr and "public keys" not in stderr
    if tls or auth:
        # The ServerApp got the generated files through the overrides (absolute paths, for the split data plane).
        for key in ("ca_cert", "server_cert", "server_key"):
            assert Path(config["tls"][key]).is_absolute()
    else:
        assert config["tls"]["ca_cert"] is None
    assert not workdir_from(stderr).exists()  # logs and FLWR_HOME are removed after a successful run


# -- end to end --------------------------------------------------------------------------
# Each deployment costs a minute of a 2-core CI machine, so each one proves several things. The site-folder
# deployments (tests/test_site_sim_deploy.py) cover fedavg (insecure), split with the relay key (--tls), dssgd
# and features (the feature store); this one covers a registry dataset partitioned by node config, with --auth.
@pytest.mark.slow
@needs_proc
def test_deploy_local_ushaped_over_a_tls_data_plane(tmp_path):
    """``--auth`` (implies ``--tls``): throwaway CA, registered SuperNode keys, and the split data plane serves TLS
    with deploy-local's certificates; labels stay at the sites; each SuperNode trains on its node-config partition;
    the roster phase puts the SuperLink's random node ids in partition order (the turn order)."""
    run_dir, stderr = run_deploy_local(["--auth", "protocol=ushaped", "protocol.handoff=local", "protocol.turn_batches=3",
                                        "dataset=digits", "num_clients=2", "rounds=1", "phases=[roster]"], tmp_path, timeout=400)
    assert run_dir.parent == tmp_path / "runs"
    config = assert_run_directory(run_dir, num_clients=2, rounds=1, protocol="ushaped")
    assert_deployment(stderr, config, num_nodes=2, auth=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data_plane_tls"] is True and summary["failed_turns"] == []
    roster = summary["phases"]["roster"]
    assert list(roster["partitions"].values()) == [0, 1] and roster["failures"] == []
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 1 and rows[0]["accuracy"] > 0.0 and rows[0]["clients"] == [0, 1]  # both SuperNodes trained


def test_split_key_reaches_the_supernodes_only(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAFTFL_SPLIT_KEY", "00" * 32)
    first = LocalDeployment(tmp_path / "a", num_nodes=1)
    assert first.env(supernode=True)["GRAFTFL_SPLIT_KEY"] == "00" * 32  # the caller's key wins
    assert "GRAFTFL_SPLIT_KEY" not in first.env()  # SuperLink, flwr CLI: never
    monkeypatch.delenv("GRAFTFL_SPLIT_KEY")
    keys = {LocalDeployment(tmp_path / name, num_nodes=1).env(supernode=True)["GRAFTFL_SPLIT_KEY"] for name in "bcd"}
    assert len(keys) == 3 and all(len(bytes.fromhex(key)) == 32 for key in keys)  # fresh per run


@pytest.mark.slow
@needs_proc
def test_ctrl_c_stops_every_process(tmp_path):
    """SIGINT (Ctrl-C) once the SuperNodes are online: exit 130, no process of ours left."""
    tag = uuid.uuid4().hex
    process = graftfl_process(["deploy-local", "protocol=fedavg", "dataset=digits", "num_clients=2", "rounds=3"], tmp_path, tag)
    stderr_lines: list[str] = []
    online = threading.Event()

    def read_stderr():
        for line in process.stderr:
            stderr_lines.append(line)
            if "SuperNodes online" in line:
                online.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert online.wait(timeout=150), "SuperNodes never came online:\n" + "".join(stderr_lines[-60:])
        running = " | ".join(tagged_processes(tag).values())
        assert running.count("flower-supernode") == 2 and "flower-superlink" in running and "flower-superexec" in running
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        survivors = tagged_processes(tag)  # before any cleanup of ours
    finally:
        stop_deploy_local(process, tag)
    reader.join(timeout=5)
    assert process.returncode == 130, "".join(stderr_lines[-40:])
    assert survivors == {}
    assert not workdir_from("".join(stderr_lines)).exists()


# -- pieces ------------------------------------------------------------------------------
@needs_proc
def test_stop_kills_descendants_in_other_sessions(tmp_path):
    """Flower detaches flower-superexec into its own session; stop() must still find it."""
    child_pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time;"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True);"
        f"open({str(child_pid_file)!r}, 'w').write(str(child.pid));"
        "time.sleep(120)"
    )
    deployment = LocalDeployment(tmp_path / "deploy", num_nodes=1)
    parent = deployment.start("parent", [sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    while not child_pid_file.exists() or not child_pid_file.read_text():
        assert time.monotonic() < deadline and parent.alive
        time.sleep(0.05)
    child_pid = int(child_pid_file.read_text())
    assert os.getsid(child_pid) != os.getsid(parent.popen.pid)  # not reachable through the parent's group
    assert set(marked_pids(deployment.marker)) == {parent.popen.pid, child_pid}
    assert deployment.stop() == []
    assert not parent.alive
    assert not Path(f"/proc/{child_pid}").exists() or b"zombie" in Path(f"/proc/{child_pid}/status").read_bytes().lower()


def test_server_certificate_verifies_against_ca_and_names_loopback(tmp_path):
    files = generate_tls_files(tmp_path / "tls")
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises when the signature or issuer does not match
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    key = serialization.load_pem_private_key(files.server_key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert files.server_key.stat().st_mode & 0o077 == 0
    other = generate_tls_files(tmp_path / "other")
    with pytest.raises((ValueError, InvalidSignature)):  # another CA's name, or its signature
        server.verify_directly_issued_by(x509.load_pem_x509_certificate(other.ca_cert.read_bytes()))


def serve_tls_echo_once(files) -> tuple[int, threading.Thread]:
    """A one-connection TLS echo server on a free loopback port, serving the generated certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.server_cert, files.server_key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        with listener:
            connection, _ = listener.accept()
            try:
                with context.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(tls.recv(5))
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def test_tls_handshake_on_loopback_with_generated_files(tmp_path):
    """A client that trusts only the generated CA verifies the server as 127.0.0.1; another CA is refused."""
    files = generate_tls_files(tmp_path / "tls")
    port, server = serve_tls_echo_once(files)
    trusting = ssl.create_default_context(cafile=str(files.ca_cert))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with trusting.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"hello")
            assert tls.recv(5) == b"hello"
    server.join(timeout=10)

    port, server = serve_tls_echo_once(files)
    untrusting = ssl.create_default_context(cafile=str(generate_tls_files(tmp_path / "other").ca_cert))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, pytest.raises(ssl.SSLCertVerificationError):
        untrusting.wrap_socket(raw, server_hostname="127.0.0.1")
    server.join(timeout=10)


def test_node_auth_keys_load_the_way_flower_loads_them(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.cli.supernode.register import try_load_public_key

    keys = generate_node_auth_keys(tmp_path, "supernode-0")
    private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), None)  # flower-supernode's loader
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    public = serialization.load_ssh_public_key(keys.public_key.read_bytes())
    assert public.public_numbers() == private.public_key().public_numbers()
    assert try_load_public_key(keys.public_key)  # `flwr supernode register` accepts it
    assert keys.private_key.stat().st_mode & 0o077 == 0


def test_overrides_survive_flwr_run_config_and_shlex(tmp_path):
    """What the ServerApp composes equals what the command line composed, quotes, spaces and commas included."""
    from flwr.common.config import parse_config_args

    user = ["dataset=digits", "train.lr=0.1", 'model=mlp']
    output_dir = tmp_path / "my runs,a=b" / "it's"
    value = run_config_overrides(user, run_id='run "1", x', output_dir=output_dir, extra=[f"tls.ca_cert={hydra_quote('/a b/ca.crt')}"])
    path = write_run_config(tmp_path / "run-config.toml", value)
    received = parse_config_args([str(path)])["overrides"]  # how `flwr run --run-config FILE` reads it
    cfg = compose_config(shlex.split(received))  # what graftfl.server_app.app.main does
    assert (cfg.dataset.name, cfg.model.name, cfg.train.lr) == ("digits", "mlp", 0.1)
    assert cfg.run_id == 'run "1", x'
    assert cfg.output_dir == str(output_dir)
    assert cfg.tls.ca_cert == "/a b/ca.crt"


def test_flower_reads_the_generated_connection(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    write_flower_config(tmp_path / "home", 8123, ca_cert=None)
    connection = read_superlink_connection(None)  # the default connection
    assert (connection.name, connection.address, connection.insecure) == (CONNECTION, "127.0.0.1:8123", True)
    ca = generate_tls_files(tmp_path / "tls").ca_cert
    write_flower_config(tmp_path / "home", 8124, ca_cert=ca)
    connection = read_superlink_connection(CONNECTION)
    assert (connection.address, connection.insecure, connection.root_certificates) == ("127.0.0.1:8124", False, str(ca))
