"""The data plane: token checks, frame validation, label privacy, encryption, abandoned turns."""

from __future__ import annotations

import math
import struct
import os

import grpc
import pytest
import torch
from cryptography.exceptions import InvalidTag

from graftfl.core.models import build_model
from graftfl.core.split import BottomClient, MiddleStage, TopStage, UShapedClient, activation_shape, model_parts
from graftfl.core.train import make_optimizer
from graftfl.config import compose_config
from graftfl.transport import direct
from graftfl.transport.client import DataPlaneClient, DataPlaneError
from graftfl.clients.split_turns import role_state
from graftfl.transport.frames import Frame, encode_frame, parse_header
from graftfl.core.handoff import MissingSplitKey, client_key, decrypt_state, encrypt_state, parse_key
from graftfl.transport.server import DataPlaneServer

INPUT_SHAPE, NUM_CLASSES, BATCH = (1, 8, 8), 10, 8


def lenet():
    torch.manual_seed(0)
    return build_model("lenet", INPUT_SHAPE, NUM_CLASSES)


def make_top_server(**kwargs):
    bottom, top = model_parts(lenet(), None)
    act_shape = activation_shape(bottom, INPUT_SHAPE)
    stage = TopStage(top, make_optimizer("sgd", top.parameters(), 0.1), act_shape, NUM_CLASSES)
    return DataPlaneServer(stage, max_batch=BATCH, **kwargs).start(), act_shape


def good_frame(act_shape, token, batch=BATCH, **overrides):
    tensors = {"activations": torch.randn(batch, *act_shape), "labels": torch.randint(0, NUM_CLASSES, (batch,))}
    tensors.update(overrides)
    return Frame("train", tensors, token=token)


@pytest.fixture(params=["grpc", "direct"])
def top_server(request, monkeypatch):
    """A top-stage data plane reached over gRPC, or in memory by this process's clients (the in-process simulation)."""
    served_directly = []
    for name in ("serve_direct", "serve_direct_frame"):  # encoded frames (send_raw) and frames handed over as parsed (exchange)
        serve = getattr(DataPlaneServer, name)
        monkeypatch.setattr(DataPlaneServer, name, lambda self, *args, serve=serve: served_directly.append(1) or serve(self, *args))
    server, act_shape = make_top_server(max_frame_bytes=16 * 1024, direct=request.param == "direct")
    yield server, act_shape
    server.stop()
    # every test sends frames: they went the way the parameter says
    assert bool(served_directly) == (request.param == "direct")


BAD_FRAMES = {
    "wrong token": (grpc.StatusCode.UNAUTHENTICATED, lambda s, turn: encode_frame(good_frame(s, "not-the-token"))),
    "wrong shape": (grpc.StatusCode.INVALID_ARGUMENT, lambda s, turn: encode_frame(good_frame(s, turn.token, activations=torch.randn(BATCH, 3, 2, 2)))),
    "batch mismatch": (grpc.StatusCode.INVALID_ARGUMENT, lambda s, turn: encode_frame(good_frame(s, turn.token, labels=torch.zeros(BATCH - 1, dtype=torch.long)))),
    "wrong dtype": (grpc.StatusCode.INVALID_ARGUMENT, lambda s, turn: encode_frame(good_frame(s, turn.token), "float16")),
    "nan": (grpc.StatusCode.INVALID_ARGUMENT, lambda s, turn: encode_frame(good_frame(s, turn.token, activations=torch.full((BATCH, *s), float("nan"))))),
    "infinite": (grpc.StatusCode.INVALID_ARGUMENT, lambda s, turn: encode_frame(good_frame(s, turn.token, activations=torch.full((BATCH, *s), float("inf"))))),
    "one nan": (grpc.StatusCode.INVALID_ARGUMENT, lambda s, turn: encode_frame(good_frame(s, turn.token, activations=torch.zeros(BATCH * math.prod(s)).index_fill_(0, torch.tensor([7]), float("nan")).reshape(BATCH, *s)))),
    "cancelling infinities": (grpc.StatusCode.INVALID_ARGUMENT, lambda s, turn: encode_frame(good_frame(s, turn.token, activations=torch.tensor([float("inf"), -float("inf")]).repeat(BATCH * math.prod(s) // 2).reshape(BATCH, *s)))),
    "oversize": (grpc.StatusCode.INVALID_ARGUMENT, lambda s, turn: encode_frame(good_frame(s, turn.token, batch=64))),
    "label too big": (grpc.StatusCode.INVALID_ARGUMENT, lambda s, turn: encode_frame(good_frame(s, turn.token, labels=torch.full((BATCH,), NUM_CLASSES)))),
    "negative label": (grpc.StatusCode.INVALID_ARGUMENT, lambda s, turn: encode_frame(good_frame(s, turn.token, labels=torch.full((BATCH,), -1)))),
    "unknown kind": (grpc.StatusCode.INVALID_ARGUMENT, lambda s, turn: encode_frame(Frame("backward", {"gradient": torch.zeros(BATCH, *s)}, token=turn.token))),
    "garbage": (grpc.StatusCode.INVALID_ARGUMENT, lambda s, turn: b"hello, data plane"),
    # a header within the size limit, nested deeper than the JSON parser recurses
    "deep header": (grpc.StatusCode.INVALID_ARGUMENT, lambda s, turn: b"GFL1" + struct.pack(">I", 60_000) + b"[" * 30_000 + b"]" * 30_000),
}


MESSAGE_HINTS = {
    "wrong token": "token", "wrong shape": "shape", "batch mismatch": "batch", "wrong dtype": "dtype", "nan": "NaN", "one nan": "NaN",
    "cancelling infinities": "NaN or infinite",
    "infinite": "infinite", "oversize": "exceeds the limit", "label too big": "labels must lie", "negative label": "labels must lie",
    "unknown kind": "unexpected frame kind", "garbage": "magic", "deep header": "not JSON",
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_bad_frame_gets_status_while_other_client_is_served(top_server, case):
    server, act_shape = top_server
    good_turn = server.open_turn("good")
    with DataPlaneClient(server.address, good_turn.token) as good:
        reply, meta = good.exchange("train", good_frame(act_shape, "").tensors)
        assert reply["gradient"].shape == (BATCH, *act_shape)
        server.settle()  # the top's update of that reply may still be running in the server's thread
        steps = server.stage.steps
        weights = [p.detach().clone() for p in server.stage.top.parameters()]

        code, make_raw = BAD_FRAMES[case]
        bad_turn = server.open_turn("bad")
        bad = DataPlaneClient(server.address, bad_turn.token)
        with pytest.raises(DataPlaneError) as error:
            bad.send_raw(make_raw(act_shape, bad_turn))
        bad.abandon()
        assert error.value.code == code, error.value
        assert MESSAGE_HINTS[case] in error.value.details  # a message that says what was wrong
        # the bad frame changed nothing, and the good client's stream goes on
        server.settle()
        assert server.stage.steps == steps
        assert all(torch.equal(a, b.detach()) for a, b in zip(weights, server.stage.top.parameters(), strict=True))
        reply, _ = good.exchange("train", good_frame(act_shape, "").tensors)
        server.settle()
        assert torch.isfinite(reply["gradient"]).all() and server.stage.steps == steps + 1
    assert good_turn.ended_cleanly


def test_closing_a_turn_cuts_a_stalled_stream(top_server):
    server, act_shape = top_server
    turn = server.open_turn()
    stalled = DataPlaneClient(server.address, turn.token)
    stalled.exchange("train", good_frame(act_shape, "").tensors)
    server.close_turn(turn)  # the turn timed out: its stream is cancelled, not left holding a thread
    with pytest.raises(DataPlaneError) as error:
        stalled.exchange("train", good_frame(act_shape, "").tensors)
    stalled.abandon()
    assert error.value.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAUTHENTICATED)
    assert server.stage.steps == 1


def test_token_is_one_time_and_expires(top_server):
    server, act_shape = top_server
    turn = server.open_turn()
    with DataPlaneClient(server.address, turn.token) as first:
        first.exchange("train", good_frame(act_shape, "").tensors)
        second = DataPlaneClient(server.address, turn.token)  # the same token on a second stream
        with pytest.raises(DataPlaneError) as reused:
            second.exchange("train", good_frame(act_shape, "").tensors)
        second.abandon()
        assert reused.value.code == grpc.StatusCode.UNAUTHENTICATED
    server.close_turn(turn)
    late = DataPlaneClient(server.address, turn.token)
    with pytest.raises(DataPlaneError) as expired:
        late.exchange("train", good_frame(act_shape, "").tensors)
    late.abandon()
    assert expired.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_abandoned_turn_keeps_completed_steps_and_server_goes_on(top_server):
    server, act_shape = top_server
    turn = server.open_turn()
    dying = DataPlaneClient(server.address, turn.token)
    for _ in range(2):
        dying.exchange("train", good_frame(act_shape, "").tensors)
    dying.abandon()  # crash mid-turn: no 'end' frame
    server.close_turn(turn)
    assert server.stage.steps == 2 and not turn.ended_cleanly
    next_turn = server.open_turn()
    with DataPlaneClient(server.address, next_turn.token) as plane:
        plane.exchange("train", good_frame(act_shape, "").tensors)
    assert server.stage.steps == 3


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_stage_computes_with_the_plane_threads_whatever_the_process_count(threads, direct):
    # a gRPC handler thread starts with the process's count; the stage must run with the configured one
    # (a fixed count keeps seeded split runs identical on both simulation backends); a frame served in
    # the caller's thread (direct) leaves that thread with its own count
    server, act_shape = make_top_server(compute_threads=threads, direct=direct)
    seen, handle = [], server.stage.handle
    server.stage.handle = lambda *args, **kwargs: seen.append(torch.get_num_threads()) or handle(*args, **kwargs)
    process_threads = torch.get_num_threads()
    torch.set_num_threads(3 - threads)  # the other count, for the threads gRPC starts from now on
    try:
        turn = server.open_turn()
        with DataPlaneClient(server.address, turn.token) as plane:
            for _ in range(3):
                plane.exchange("train", good_frame(act_shape, "").tensors)
                caller_threads = torch.get_num_threads()
        server.close_turn(turn)
    finally:
        torch.set_num_threads(process_threads)
        server.stop()
    assert seen == [threads] * 3 and plane.in_memory == direct
    assert caller_threads == 3 - threads


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("flush", [False, True])
def test_the_stage_computes_with_the_runs_denormal_flag_whatever_the_thread_had(flush, direct):
    # x86 keeps the flag per thread: a handler thread started before the run set it has its own
    from graftfl.core.denormals import flush_denormals

    server, act_shape = make_top_server(flush_denormal=flush, direct=direct)
    seen, handle = [], server.stage.handle
    denormal_flushed = lambda: (torch.tensor([1e-39]) * 1.0).item() == 0.0  # noqa: E731
    server.stage.handle = lambda *args, **kwargs: seen.append(denormal_flushed()) or handle(*args, **kwargs)
    flush_denormals(not flush)  # the other setting, for the threads gRPC starts from now on
    try:
        turn = server.open_turn()
        with DataPlaneClient(server.address, turn.token) as plane:
            for _ in range(2):
                plane.exchange("train", good_frame(act_shape, "").tensors)
        server.close_turn(turn)
    finally:
        flush_denormals(False)
        server.stop()
    assert seen == [flush] * 2 and plane.in_memory == direct


def test_turns_share_one_channel_each_on_its_own_stream():
    from graftfl.transport.client import shared_channel

    server, act_shape = make_top_server()
    channels, turns = set(), []
    for _ in range(2):
        turn = server.open_turn()
        with DataPlaneClient(server.address, turn.token, max_frame_bytes=1 << 20) as plane:
            plane.exchange("train", good_frame(act_shape, "").tensors)
        channels.add(id(shared_channel(server.address, None, 1 << 20)))
        turns.append(server.close_turn(turn))
    server.stop()
    assert len(channels) == 1 and server.stage.steps == 2
    assert all(turn.ended_cleanly and turn.frames == 2 for turn in turns)  # one train frame and the end frame each


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
def test_half_precision_wire_dtypes(wire_dtype):
    server, act_shape = make_top_server(wire_dtype=wire_dtype)
    try:
        turn = server.open_turn()
        with DataPlaneClient(server.address, turn.token, wire_dtype=wire_dtype) as plane:
            reply, _ = plane.exchange("train", good_frame(act_shape, "").tensors)
        assert reply["gradient"].dtype == torch.float32 and torch.isfinite(reply["gradient"]).all()
        # half the float32 payload: 2 bytes per activation value
        assert turn.bytes_up < BATCH * int(torch.tensor(act_shape).prod()) * 4
    finally:
        server.stop()


def recording(server: DataPlaneServer) -> list[dict]:
    """Record the header of every frame the server receives."""
    headers, serve = [], server._serve_frame

    def spy(raw, *rest):
        headers.append(parse_header(raw)[0])
        return serve(raw, *rest)

    server._serve_frame = spy
    return headers


def test_ushaped_never_sends_labels_but_split_does():
    x, y = torch.randn(BATCH, *INPUT_SHAPE), torch.randint(0, NUM_CLASSES, (BATCH,))
    bottom, middle, head = model_parts(lenet(), None, head_stages=1)
    act_shape = activation_shape(bottom, INPUT_SHAPE)
    stage = MiddleStage(middle, make_optimizer("sgd", middle.parameters(), 0.1), act_shape, activation_shape(middle, act_shape))
    server = DataPlaneServer(stage, max_batch=BATCH).start()
    headers = recording(server)
    role = UShapedClient(bottom, head)
    role.optimizer = make_optimizer("sgd", [*bottom.parameters(), *head.parameters()], 0.1)
    try:
        turn = server.open_turn()
        with DataPlaneClient(server.address, turn.token) as plane:
            for _ in range(3):
                role.train_step(x, y, plane.exchange)
            role.eval_batch(x, y, plane.exchange)
    finally:
        server.stop()
    assert [h["kind"] for h in headers] == ["forward", "backward"] * 3 + ["eval_forward", "end"]
    for header in headers:
        assert {t["name"] for t in header["tensors"]} <= {"activations", "gradient"}
        assert all(t["dtype"] == "float32" for t in header["tensors"]), "an integer tensor reached the server"
        assert not header["meta"]

    # the same inspection catches labels in plain split learning
    split_server, _ = make_top_server()
    split_headers = recording(split_server)
    split_role = BottomClient(model_parts(lenet(), None)[0])
    split_role.optimizer = make_optimizer("sgd", split_role.bottom.parameters(), 0.1)
    try:
        turn = split_server.open_turn()
        with DataPlaneClient(split_server.address, turn.token) as plane:
            split_role.train_step(x, y, plane.exchange)
    finally:
        split_server.stop()
    assert any(t["name"] == "labels" for h in split_headers for t in h["tensors"])


def test_relayed_weights_are_encrypted(monkeypatch):
    bottom, _ = model_parts(lenet(), None)
    role = BottomClient(bottom)
    role.optimizer = make_optimizer("sgd", bottom.parameters(), 0.1, momentum=0.9)
    key = os.urandom(32)
    blob = encrypt_state(key, role_state(role))
    weights = bottom.state_dict()["conv1.0.weight"].numpy().tobytes()
    # no 16-byte window of the weights (nor the pickle's zip header) appears in what the server stores
    assert not any(weights[i : i + 16] in blob for i in range(0, len(weights) - 16, 4))
    assert b"PK\x03\x04" not in blob and b"conv1" not in blob
    restored = decrypt_state(key, blob)["modules"]["bottom"]
    assert all(torch.equal(restored[k], v) for k, v in bottom.state_dict().items())
    with pytest.raises(InvalidTag):
        decrypt_state(os.urandom(32), blob)
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(InvalidTag):
        decrypt_state(key, bytes(tampered))
    assert parse_key(key.hex()) == key
    # the key comes from the client's node config, else its environment, else nowhere
    monkeypatch.setenv("GRAFTFL_SPLIT_KEY", "22" * 32)
    assert client_key({"split-key": key.hex()}) == key and client_key({}) == bytes.fromhex("22" * 32)
    monkeypatch.delenv("GRAFTFL_SPLIT_KEY")
    with pytest.raises(MissingSplitKey, match="GRAFTFL_SPLIT_KEY"):
        client_key({})
    with pytest.raises(ValueError):
        parse_key("abcd")


def write_test_pki(folder) -> dict[str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1 (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "graftfl test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])).issuer_name(ca_name)
              .public_key(server_key.public_key()).serial_number(2).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = {name: str(folder / f"{name}.pem") for name in ("ca_cert", "server_cert", "server_key", "other_ca")}
    (folder / "ca_cert.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server_cert.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (folder / "server_key.pem").write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(other_key.public_key()).serial_number(3)
             .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(other_key, hashes.SHA256()))
    (folder / "other_ca.pem").write_bytes(other.public_bytes(serialization.Encoding.PEM))
    return paths


def test_tls_data_plane(tmp_path):
    pki = write_test_pki(tmp_path)
    server, act_shape = make_top_server(server_cert=pki["server_cert"], server_key=pki["server_key"])
    try:
        assert server.tls
        turn = server.open_turn()
        with DataPlaneClient(server.address, turn.token, ca_cert=pki["ca_cert"]) as plane:
            reply, _ = plane.exchange("train", good_frame(act_shape, "").tensors)
        assert reply["gradient"].shape == (BATCH, *act_shape)
        for ca_cert in (None, pki["other_ca"]):  # plaintext, or a CA that did not sign the server: no stream
            other_turn = server.open_turn()
            client = DataPlaneClient(server.address, other_turn.token, ca_cert=ca_cert)
            with pytest.raises(DataPlaneError) as error:
                client.exchange("train", good_frame(act_shape, "").tensors)
            client.abandon()
            assert error.value.code == grpc.StatusCode.UNAVAILABLE
        server.settle()
        assert server.stage.steps == 1
    finally:
        server.stop()


def test_a_direct_plane_serves_this_process_in_memory_with_the_replies_of_grpc():
    torch.manual_seed(5)
    batches = [good_frame((6, 4, 4), "").tensors for _ in range(3)]
    seen = {}
    for direct_plane in (False, True):
        server, act_shape = make_top_server(direct=direct_plane)  # the same seeded top both times
        assert act_shape == (6, 4, 4)
        try:
            turn = server.open_turn("site", accept=("train",), max_batches=3)
            with DataPlaneClient(server.address, turn.token) as plane:
                assert plane.in_memory == direct_plane
                replies = [plane.send_raw(encode_frame(Frame("train", batch, token=turn.token))) for batch in batches]
                streams = server.open_streams()
            server.close_turn(turn)
            weights = [p.detach().clone() for p in server.stage.top.parameters()]
            seen[direct_plane] = (replies, turn.bytes_up, turn.bytes_down, turn.frames, turn.ended_cleanly, plane.bytes_up, plane.bytes_down)
            seen[direct_plane, "weights"] = weights
        finally:
            server.stop()
        assert direct.server_at(server.address) is None  # a stopped server is no longer reachable in memory
        assert streams == (0 if direct_plane else 1)  # an in-memory turn holds no gRPC stream (nor a server thread)
    assert seen[True] == seen[False]  # the same reply bytes and the same counts, frame for frame
    assert all(torch.equal(a, b) for a, b in zip(seen[True, "weights"], seen[False, "weights"], strict=True))


@pytest.mark.parametrize("wire_dtype", ["float32", "float16", "bfloat16"])
def test_frames_exchanged_in_memory_get_the_replies_and_byte_counts_of_grpc(wire_dtype):
    # exchange() in memory hands frames over as parsed (no bytes): the same tensors, sizes and weights as over gRPC
    torch.manual_seed(6)
    batches = [good_frame((6, 4, 4), "").tensors for _ in range(3)]
    seen = {}
    for direct_plane in (False, True):
        server, _ = make_top_server(direct=direct_plane, wire_dtype=wire_dtype)
        try:
            turn = server.open_turn("site", accept=("train",), max_batches=3)
            with DataPlaneClient(server.address, turn.token, wire_dtype=wire_dtype) as plane:
                replies = [plane.exchange("train", batch) for batch in batches]
            server.close_turn(turn)
            counts = (turn.bytes_up, turn.bytes_down, turn.frames, turn.ended_cleanly, plane.bytes_up, plane.bytes_down)
            seen[direct_plane] = (replies, counts, [p.detach().clone() for p in server.stage.top.parameters()])
        finally:
            server.stop()
    (grpc_replies, grpc_counts, grpc_weights), (memory_replies, memory_counts, memory_weights) = seen[False], seen[True]
    assert memory_counts == grpc_counts and grpc_counts[0] > 0
    for (grpc_tensors, grpc_meta), (memory_tensors, memory_meta) in zip(grpc_replies, memory_replies, strict=True):
        assert grpc_meta == memory_meta and grpc_tensors.keys() == memory_tensors.keys()
        assert all(torch.equal(grpc_tensors[k], memory_tensors[k]) and memory_tensors[k].dtype == torch.float32 for k in grpc_tensors)
    assert all(torch.equal(a, b) for a, b in zip(grpc_weights, memory_weights, strict=True))


@pytest.mark.parametrize("meta", [{}, {"step": 4, "loss": 0.1 + 0.2, "ok": True, "none": None, "name": "é"},
                                  {"pair": (1, 2), 3: "x", "nested": {"a": [1.5]}}])
def test_a_frame_handed_over_in_memory_is_what_its_bytes_decode_to(meta):
    """Meta-less headers are kept per turn and flat meta skips the JSON round trip: the same header, meta and size either way."""
    from graftfl.transport.frames import FrameError, as_delivered, decode_frame

    frame = Frame("train", {"activations": torch.randn(3, 5) * 1e3, "labels": torch.tensor([2, 0, 1], dtype=torch.int32)}, meta, "tok")
    for wire_dtype in ("float32", "float16", "bfloat16", "float32"):  # float32 twice: a kept header the second time
        raw = encode_frame(frame, wire_dtype)
        header, delivered, size = as_delivered(frame, wire_dtype)
        decoded = decode_frame(raw)
        assert size == len(raw) and header == parse_header(raw)[0]
        assert (delivered.kind, delivered.meta, delivered.token) == (decoded.kind, decoded.meta, decoded.token)
        assert all(torch.equal(delivered.tensors[k], decoded.tensors[k]) and delivered.tensors[k].dtype == decoded.tensors[k].dtype
                   for k in decoded.tensors)
        delivered.meta["added by the receiver"] = 1  # its own copy: the next frame's header is not changed
    with pytest.raises(FrameError, match="'token' a string"):  # refused as the bytes would be, kept header or not
        as_delivered(Frame("train", {"activations": torch.zeros(3, 5)}, meta, 7))
    sent = frame.tensors["activations"].clone()
    as_delivered(frame, "float32")[1].tensors["activations"].add_(1.0)  # a copy: the receiver cannot change what the sender holds
    assert torch.equal(frame.tensors["activations"], sent)
    with pytest.raises(FrameError, match="no elements"):  # the header checks of parse_header
        as_delivered(Frame("train", {"activations": torch.zeros(0, 5)}))


def test_a_direct_plane_still_serves_grpc_and_tls_clients_go_through_grpc(tmp_path):
    from graftfl.transport.server import SERVICE_METHOD

    server, act_shape = make_top_server(direct=True)
    try:
        turn = server.open_turn("remote site")
        channel = grpc.insecure_channel(server.address)  # what a site in another process does
        call = channel.stream_stream(SERVICE_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        frames = [encode_frame(good_frame(act_shape, turn.token)), encode_frame(Frame("end", token=turn.token))]
        assert len(list(call(iter(frames)))) == 1 and turn.ended_cleanly
        channel.close()
        # a client given a CA is never served in memory: gRPC checks the certificate (here: a plaintext server, refused)
        pki = write_test_pki(tmp_path)
        tls_turn = server.open_turn("tls site")
        client = DataPlaneClient(server.address, tls_turn.token, ca_cert=pki["ca_cert"])
        assert not client.in_memory
        with pytest.raises(DataPlaneError) as error:
            client.exchange("train", good_frame(act_shape, "").tensors)
        client.abandon()
        assert error.value.code == grpc.StatusCode.UNAVAILABLE and tls_turn.frames == 0
    finally:
        server.stop()


def test_one_direct_server_per_address():
    first, second = object(), object()
    direct.register("127.0.0.1:1", first)
    try:
        direct.register("127.0.0.1:1", first)  # the same server again: fine
        with pytest.raises(ValueError, match="already served directly"):
            direct.register("127.0.0.1:1", second)
        direct.unregister("127.0.0.1:1", second)  # not its address: nothing removed
        assert direct.server_at("127.0.0.1:1") is first
    finally:
        direct.unregister("127.0.0.1:1", first)
    assert direct.server_at("127.0.0.1:1") is None


def test_only_the_inprocess_backend_serves_sites_in_memory():
    from omegaconf import OmegaConf

    from graftfl.strategies.split_config import serves_in_memory

    assert compose_config([]).sim.split_plane == "direct"  # the documented default
    assert serves_in_memory(OmegaConf.create({"sim": {"backend": "inprocess", "split_plane": "direct"}}))
    assert not serves_in_memory(OmegaConf.create({"sim": {"backend": "inprocess", "split_plane": "grpc"}}))
    assert not serves_in_memory(OmegaConf.create({"sim": {"backend": "ray", "split_plane": "direct"}}))
    assert not serves_in_memory(OmegaConf.create({}))  # a deployment's config may have no sim section
    with pytest.raises(ValueError, match=r"sim.split_plane must be one of \['direct', 'grpc'\]"):
        serves_in_memory(OmegaConf.create({"sim": {"backend": "inprocess", "split_plane": "memory"}}))


def test_finite_values_whose_sum_overflows_are_finite():
    # the check sums first (a NaN or an infinity makes the sum non-finite); an overflowing sum gets the full check
    from graftfl.transport.checks import all_finite

    huge = torch.full((4, 8), 3e38)
    assert not torch.isfinite(huge.sum()) and all_finite(huge)
    assert not all_finite(torch.cat([huge.flatten(), torch.tensor([float("inf")])]))
    assert not all_finite(torch.tensor([1.0, float("nan"), 2.0])) and all_finite(torch.tensor([1.0, -2.0]))
