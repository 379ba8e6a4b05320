"""The data plane under attack: malformed headers, wrong frame kinds, too many frames, idle streams, TLS strictness."""

from __future__ import annotations

import json
import logging
import queue
import struct
import threading
import time
from types import SimpleNamespace

import grpc
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from graftfl.config import compose_config, to_container
from graftfl.core.split import MiddleStage, TopStage
from graftfl.transport.client import DataPlaneClient, DataPlaneError
from graftfl.transport.frames import MAGIC, Frame, encode_frame
from graftfl.transport.server import SERVICE_METHOD, DataPlaneServer
from tests.conftest import flower_task_identity
from tests.test_split_plane import BATCH, good_frame, make_top_server, write_test_pki


def crafted(token: str, entries, payload: bytes = b"", kind: str = "train", **header) -> bytes:
    """A frame with a hand-written header (what an attacker controls completely)."""
    raw_header = json.dumps({"token": token, "kind": kind, "meta": {}, "tensors": entries, **header}).encode()
    return MAGIC + struct.pack(">I", len(raw_header)) + raw_header + payload


def act_entries(act_shape, batch=BATCH, activations_shape=None, labels_shape=None):
    return [{"name": "activations", "shape": activations_shape or [batch, *act_shape], "dtype": "float32"},
            {"name": "labels", "shape": labels_shape or [batch], "dtype": "int64"}]


def payload(act_shape, batch=BATCH) -> bytes:
    elements = batch * int(torch.tensor(act_shape).prod())
    return torch.zeros(elements).numpy().tobytes() + torch.zeros(batch, dtype=torch.long).numpy().tobytes()


MALFORMED = {
    # zero-element tensors: today the batch check happens to catch some with a shape message; now the reason is named
    "zero-element": (lambda s, t: crafted(t, act_entries(s, batch=0), b""), "no elements"),
    # a tensors entry that is not an object: today an AttributeError inside the server (gRPC UNKNOWN)
    "entry-not-object": (lambda s, t: crafted(t, [5, "labels"], payload(s)), "must be an object"),
    # non-integer shape values: today int() truncates 8.9 -> 8 (or coerces "8", true) and the frame trains the top
    "float-shape": (lambda s, t: crafted(t, act_entries(s, activations_shape=[BATCH + 0.9, *s]), payload(s)), "non-negative integers"),
    "string-shape": (lambda s, t: crafted(t, act_entries(s, activations_shape=[str(BATCH), *s]), payload(s)), "non-negative integers"),
    "bool-shape": (lambda s, t: crafted(t, act_entries(s, batch=1, activations_shape=[True, *s], labels_shape=[True]), payload(s, 1)), "non-negative integers"),
    "shape-not-list": (lambda s, t: crafted(t, act_entries(s, activations_shape={"0": BATCH}), payload(s)), "shape must be a list"),
    "duplicate-name": (lambda s, t: crafted(t, act_entries(s)[:1] * 2 + act_entries(s)[1:], payload(s)), "twice"),
    "meta-not-object": (lambda s, t: crafted(t, act_entries(s), payload(s), meta=[1, 2]), "'meta' must be an object"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_headers_get_invalid_argument_with_a_logged_reason(case, caplog):
    server, act_shape = make_top_server()
    try:
        make_raw, says = MALFORMED[case]
        turn = server.open_turn("attacker")
        attacker = DataPlaneClient(server.address, turn.token)
        with caplog.at_level(logging.WARNING, logger="graftfl.transport.server"), pytest.raises(DataPlaneError) as error:
            attacker.send_raw(make_raw(act_shape, turn.token))
        attacker.abandon()
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT, error.value
        assert says in error.value.details
        assert any(says in record.getMessage() and "INVALID_ARGUMENT" in record.getMessage() for record in caplog.records)
        server.settle()
        assert server.stage.steps == 0  # nothing reached the model
        good_turn = server.open_turn("good")
        with DataPlaneClient(server.address, good_turn.token) as good:
            good.exchange("train", good_frame(act_shape, "").tensors)
        server.settle()
        assert server.stage.steps == 1
    finally:
        server.stop()


def test_evaluation_turn_accepts_only_evaluation_frames():
    server, act_shape = make_top_server()
    try:
        turn = server.open_turn("evaluate", accept=("eval_forward",))
        client = DataPlaneClient(server.address, turn.token)
        activations = {"activations": good_frame(act_shape, "").tensors["activations"]}
        logits = client.exchange("eval_forward", activations)[0]["logits"]
        assert logits.shape[0] == BATCH  # an evaluation frame is served
        with pytest.raises(DataPlaneError) as error:  # a training step smuggled into an evaluation turn
            client.exchange("train", good_frame(act_shape, "").tensors)
        client.abandon()
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and "not accepted in this turn" in error.value.details
        server.settle()
        assert server.stage.steps == 0 and "not accepted" in turn.error
    finally:
        server.stop()


def test_a_turn_refuses_more_frames_than_its_batches():
    server, act_shape = make_top_server()
    try:
        turn = server.open_turn("train", accept=("train",), max_batches=2)
        client = DataPlaneClient(server.address, turn.token)
        for _ in range(2):
            client.exchange("train", good_frame(act_shape, "").tensors)
        with pytest.raises(DataPlaneError) as error:
            client.exchange("train", good_frame(act_shape, "").tensors)
        client.abandon()
        assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 batches" in error.value.details
        server.settle()
        assert server.stage.steps == 2
    finally:
        server.stop()


def test_the_split_runner_declares_kinds_and_caps():
    from graftfl.strategies.split_turns import frame_kinds, train_batch_cap

    top = TopStage(torch.nn.Linear(2, 2), None, (2,), 2)
    middle = MiddleStage(torch.nn.Linear(2, 2), None, (2,), (2,))
    assert frame_kinds(top, "evaluate") == ("eval_forward",) and frame_kinds(top, "train") == ("train",)
    assert frame_kinds(middle, "evaluate") == ("eval_forward",) and set(frame_kinds(middle, "train")) == {"forward", "backward"}
    run = SimpleNamespace(max_site_rows=lambda: 1000)  # the largest partition a site may hold
    cfg = compose_config(["protocol=split", "dataset=digits", "train.batch_size=32", "train.local_epochs=2"])
    assert train_batch_cap(cfg, run) == 2 * 32  # ceil(1000 / 32) = 32 batches per epoch
    cfg = compose_config(["protocol=split", "dataset=digits", "protocol.turn_batches=5"])
    assert train_batch_cap(cfg, run) == 5


# ------------------------------------------------------------- idle streams ---


class RawStream:
    """A raw gRPC stream to the data plane that sends only what it is told (nothing, by default)."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.outbox: queue.Queue = queue.Queue()
        call = self.channel.stream_stream(SERVICE_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        self.call = call(iter(self.outbox.get, None))
        self.code, self.ended_at = None, None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        try:
            for _ in self.call:
                pass
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            self.code = err.code()
        self.ended_at = time.monotonic()

    def close(self):
        self.outbox.put(None)
        self.channel.close()


def legit_turn(server, act_shape, batches: int, results: dict) -> threading.Thread:
    def run():
        turn = server.open_turn("legit", accept=("train",), max_batches=batches)
        with DataPlaneClient(server.address, turn.token) as plane:
            for _ in range(batches):
                plane.exchange("train", good_frame(act_shape, "").tensors)
        results["done_at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_idle_and_garbage_streams_do_not_starve_a_turn_and_idle_ones_are_closed():
    idle_timeout = 3.0
    server, act_shape = make_top_server(idle_timeout_s=idle_timeout)
    streams = []
    try:
        streams = [RawStream(server.address) for _ in range(16)]  # open a stream, send nothing
        garbage = [RawStream(server.address) for _ in range(4)]
        for number, stream in enumerate(garbage):  # a token nobody issued, or no frame at all
            stream.outbox.put(encode_frame(Frame("train", token=f"guess-{number}")) if number % 2 else b"\x00garbage")
        deadline = time.monotonic() + 5
        while server.open_streams() < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.open_streams() >= 16  # the idle streams are really held by the server
        opened_at = time.monotonic()
        results: dict = {}
        legit_turn(server, act_shape, 3, results).join(timeout=idle_timeout * 5)
        assert "done_at" in results, "the legitimate turn did not complete while idle streams were open"
        for stream in garbage:
            stream.reader.join(timeout=5)
            assert stream.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT)
        for stream in streams:
            stream.reader.join(timeout=idle_timeout + 5)
            assert stream.code == grpc.StatusCode.CANCELLED, stream.code  # closed by the server
            assert stream.ended_at - opened_at >= idle_timeout * 0.5
        assert results["done_at"] < min(stream.ended_at for stream in streams)  # it did not wait for the idle ones to go
        assert server.open_streams() == 0
        server.settle()
        assert server.stage.steps == 3
    finally:
        for stream in streams:
            stream.close()
        server.stop()


def test_pending_streams_are_capped_by_evicting_the_oldest():
    server, act_shape = make_top_server(idle_timeout_s=60, max_pending_streams=4)
    streams = []
    try:
        streams = [RawStream(server.address) for _ in range(16)]
        deadline = time.monotonic() + 10
        while sum(s.code is not None for s in streams) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        ended = [s for s in streams if s.code is not None]
        # evicted (CANCELLED), or, on a loaded machine, refused by gRPC's cap on concurrent streams
        # (RESOURCE_EXHAUSTED) before an evicted stream's thread was free again; either way only the
        # 4 newest stay open (without eviction 12 would)
        assert len(ended) == 12 and all(s.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED) for s in ended)
        assert any(s.code == grpc.StatusCode.CANCELLED for s in ended)
        assert server.open_streams() == 4
        results: dict = {}
        legit_turn(server, act_shape, 2, results).join(timeout=10)
        assert "done_at" in results
    finally:
        for stream in streams:
            stream.close()
        server.stop()


def test_a_turn_that_goes_quiet_is_closed_with_a_reason():
    server, act_shape = make_top_server(idle_timeout_s=1.0)
    try:
        turn = server.open_turn("quiet")
        client = DataPlaneClient(server.address, turn.token)
        client.exchange("train", good_frame(act_shape, "").tensors)
        time.sleep(3.0)  # the client stalls without ending the turn
        with pytest.raises(DataPlaneError) as error:
            client.exchange("train", good_frame(act_shape, "").tensors)
        client.abandon()
        assert error.value.code == grpc.StatusCode.CANCELLED
        assert "idle" in (turn.error or "")
    finally:
        server.stop()


# -------------------------------------------------------------------- TLS ---


def test_half_configured_tls_is_an_error_not_plaintext(tmp_path):
    pki = write_test_pki(tmp_path)
    for only in ({"server_cert": pki["server_cert"]}, {"server_key": pki["server_key"]}):
        with pytest.raises(ValueError, match="both"):
            make_top_server(**only)
    from graftfl.config import ConfigError

    for only in (f"tls.server_cert={pki['server_cert']}", f"tls.server_key={pki['server_key']}"):
        for protocol in ("split", "ushaped", "semisup"):
            with pytest.raises(ConfigError, match="set together"):
                compose_config([f"protocol={protocol}", "dataset=digits", only])
    compose_config(["protocol=split", "dataset=digits", f"tls.server_cert={pki['server_cert']}", f"tls.server_key={pki['server_key']}"])


def turn_message(server: DataPlaneServer, turn, cfg) -> Message:
    from graftfl.strategies.utils import CONFIG_KEY

    config = ConfigRecord({CONFIG_KEY: json.dumps(to_container(cfg)), "server-round": 1, "turn-index": 0,
                           "data-plane-address": server.address, "data-plane-token": turn.token})
    return Message(content=RecordDict({"config": config}), dst_node_id=100, message_type="train.split")


@pytest.mark.parametrize("server_sends_ca", [False, True])
def test_a_site_that_requires_tls_never_sends_activations_in_plaintext(tmp_path, server_sends_ca):
    """require-tls=true: no CA -> refused before any stream; a CA but a plaintext server -> no frame either."""
    from graftfl.clients import split as split_client

    pki = write_test_pki(tmp_path)
    overrides = ["protocol=split", "dataset=digits", "model=lenet", "num_clients=2", "protocol.handoff=local", "protocol.turn_batches=2", "progress=false", f"train.batch_size={BATCH}"]
    cfg = compose_config(overrides + ([f"tls.ca_cert={pki['ca_cert']}"] if server_sends_ca else []))
    server, _ = make_top_server()  # plaintext data plane
    received = []
    serve = server._serve_frame
    server._serve_frame = lambda raw, *rest: (received.append(raw), serve(raw, *rest))[1]
    try:
        with flower_task_identity():
            turn = server.open_turn("site")
            context = Context(run_id=1, node_id=100, node_config={"partition-id": 0, "num-partitions": 2, "require-tls": True},
                              state=RecordDict(), run_config={})
            with pytest.raises(Exception) as error:
                split_client.train(turn_message(server, turn, cfg), context)
            if not server_sends_ca:
                assert "require-tls" in str(error.value) and "plaintext" in str(error.value)
            # the same site without the requirement does talk to this server: the refusal is what stopped it
            relaxed = Context(run_id=1, node_id=100, node_config={"partition-id": 0, "num-partitions": 2, "require-tls": "false"},
                              state=RecordDict(), run_config={})
            assert received == []
            if not server_sends_ca:
                split_client.train(turn_message(server, server.open_turn("relaxed"), cfg), relaxed)
                assert len(received) == 3  # two batches and the end frame
    finally:
        server.stop()


def test_ushaped_run_over_a_tls_data_plane_with_sites_requiring_tls(tmp_path):
    """The whole ServerApp pipeline (turn kinds, batch caps, idle limits) over TLS, every site insisting on it."""
    from graftfl.server_app.app import run_protocol
    from graftfl.tls import generate_tls_files
    from tests.test_split_runs import InProcessGrid

    files = generate_tls_files(tmp_path / "tls")
    cfg = compose_config(["protocol=ushaped", "protocol.handoff=local", "protocol.turn_batches=3", "dataset=digits", "num_clients=2",
                          "rounds=1", "progress=false", "dataset.test_size=64", f"output_dir={tmp_path}",
                          f"tls.ca_cert={files.ca_cert}", f"tls.server_cert={files.server_cert}", f"tls.server_key={files.server_key}"])
    grid = InProcessGrid(2)
    for context in grid.contexts.values():
        context.node_config["require-tls"] = True
    with flower_task_identity(run_id=7):
        run_dir = run_protocol(grid, cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data_plane_tls"] is True and summary["failed_turns"] == []
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["client_steps"] == [3, 3] and row["accuracy"] is not None
