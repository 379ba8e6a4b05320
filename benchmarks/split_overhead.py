"""Split-learning overhead: steps/s with and without graftfl's data plane, bytes and client FLOPs.

Measures, for LeNet on Fashion-MNIST, batch 64, cut after ``conv1``, on CPU:

(a) the split model in one process (client role -> server stage by a function call);
(b) graftfl's gRPC data plane over loopback, the client in a *separate process*
    (``--client`` mode of this script), plus the same with the client in a thread
    of the server process;
(c) Flower messages, one batch per message round trip, in Flower's simulation.

Then bytes and client FLOPs per client per epoch, split vs FedAvg, for LeNet
(28x28) and VGG11 / ResNet-18 (32x32, synthetic input; only shapes matter).

    flock /tmp/graftfl-bench.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/split_overhead.py

Writes docs/benchmarks/split_overhead.json and docs/benchmarks/split_overhead.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from graftfl.core.codec import nbytes_of_arrays  # noqa: E402
from graftfl.core.data import load_dataset  # noqa: E402
from graftfl.core.meter import count_train_flops  # noqa: E402
from graftfl.core.models import build_model  # noqa: E402
from graftfl.core.split import BottomClient, TopStage, activation_shape, model_parts  # noqa: E402
from graftfl.core.train import make_optimizer  # noqa: E402
from graftfl.transport.frames import Frame, encode_frame  # noqa: E402

BATCH, CUT, LR = 64, "conv1", 0.05
OUT = ROOT / "docs" / "benchmarks"


def lenet_parts(input_shape=(1, 28, 28)):
    torch.manual_seed(0)
    bottom, top = model_parts(build_model("lenet", input_shape, 10), CUT)
    return bottom, top


def fashion_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = load_dataset("fashion_mnist", download=False)
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))[: steps * BATCH]
    return [(data.train_x[idx], data.train_y[idx]) for idx in order.split(BATCH)]


def client_role(bottom) -> BottomClient:
    role = BottomClient(bottom)
    role.optimizer = make_optimizer("sgd", bottom.parameters(), LR, 0.9)
    return role


def server_stage(bottom, top) -> TopStage:
    return TopStage(top, make_optimizer("sgd", top.parameters(), LR, 0.9), activation_shape(bottom, (1, 28, 28)), 10)


def timed_steps(role, batches, exchange, warmup: int = 10) -> float:
    for x, y in batches[:warmup]:
        role.train_step(x, y, exchange)
    started = time.perf_counter()
    for x, y in batches[warmup:]:
        role.train_step(x, y, exchange)
    return (len(batches) - warmup) / (time.perf_counter() - started)


# ------------------------------------------------------------------ (a) and (b)


def steps_in_process(batches) -> float:
    bottom, top = lenet_parts()
    stage, state = server_stage(bottom, top), {}

    def exchange(kind, tensors):
        _, reply, meta = stage.handle(kind, tensors, state)
        return reply, meta

    return timed_steps(client_role(bottom), batches, exchange)


def steps_whole_model(batches) -> float:
    torch.manual_seed(0)
    model = build_model("lenet", (1, 28, 28), 10)
    optimizer = make_optimizer("sgd", model.parameters(), LR, 0.9)
    for i, (x, y) in enumerate(batches):
        if i == 10:
            started = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return (len(batches) - 10) / (time.perf_counter() - started)


def steps_data_plane(batches, separate_process: bool, wire_dtype: str = "float32") -> dict:
    from graftfl.transport.client import DataPlaneClient
    from graftfl.transport.server import DataPlaneServer

    bottom, top = lenet_parts()
    server = DataPlaneServer(server_stage(bottom, top), wire_dtype=wire_dtype, max_batch=BATCH).start()
    turn = server.open_turn()
    try:
        if separate_process:
            command = [sys.executable, __file__, "--client", server.address, turn.token, str(len(batches)), wire_dtype]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip().splitlines()[-1])
            steps_per_s = result["steps_per_s"]
        else:
            with DataPlaneClient(server.address, turn.token, wire_dtype=wire_dtype) as plane:
                steps_per_s = timed_steps(client_role(bottom), batches, plane.exchange)
    finally:
        server.close_turn(turn)
        server.stop()
    return {"steps_per_s": steps_per_s, "bytes_up_per_step": turn.bytes_up / len(batches), "bytes_down_per_step": turn.bytes_down / len(batches)}


def client_main(address: str, token: str, steps: int, wire_dtype: str) -> None:
    """``--client`` mode: the client side of (b) in its own process."""
    from graftfl.transport.client import DataPlaneClient

    torch.set_num_threads(int(os.environ.get("GRAFTFL_BENCH_THREADS", "1")))
    batches = fashion_batches(steps)
    bottom, _ = lenet_parts()
    with DataPlaneClient(address, token, wire_dtype=wire_dtype) as plane:
        steps_per_s = timed_steps(client_role(bottom), batches, plane.exchange)
    print(json.dumps({"steps_per_s": steps_per_s}))


def steps_deploy_local(steps: int) -> dict | None:
    """(b) inside a real ``graftfl deploy-local`` run (when this checkout has graftfl/deploy.py).

    The server times its data-plane frames: frames/s of the one client turn = steps/s.
    ClientApp and ServerApp processes use torch's default thread count here.
    """
    import importlib.util
    import secrets
    import tempfile

    if importlib.util.find_spec("graftfl.deploy") is None:
        return None
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRAFTFL_SPLIT_KEY": secrets.token_hex(32)}
    overrides = ["protocol=split", "dataset=fashion_mnist", "num_clients=1", "rounds=1", "train.batch_size=64", f"protocol.turn_batches={steps}", "progress=false"]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "graftfl.cli", "deploy-local", *overrides], cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            return {"error": proc.stderr[-1500:]}
        run_dir = Path(tmp) / proc.stdout.strip().splitlines()[-1].removeprefix("run: ")
        row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return {"steps_per_s": row["client_plane_frames_per_s"][0], "turn_s": row["client_turn_s"][0], "steps": steps, "overrides": overrides}


# ------------------------------------------------------------------------- (c)


def steps_flower_messages(steps: int) -> dict:
    """One Flower message round trip per batch in simulation (activations up, gradient down)."""
    OUT.mkdir(parents=True, exist_ok=True)
    result_file = OUT / ".flower_per_batch.json"
    command = [sys.executable, __file__, "--flower", str(steps), str(result_file)]
    subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}", "RAY_DEDUP_LOGS": "0"}, timeout=900)
    result = json.loads(result_file.read_text())
    result_file.unlink()
    return result


def flower_main(steps: int, result_file: str) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    server_app, client_app = ServerApp(), ClientApp()

    @client_app.train("perbatch")
    def client_step(message: Message, context: Context) -> Message:
        # A ClientApp keeps no Python objects between messages: the bottom lives in context.state.
        step = int(message.content["config"]["step"])
        bottom, _ = lenet_parts()
        role = client_role(bottom)
        if "bottom" in context.state:
            bottom.load_state_dict(context.state["bottom"].to_torch_state_dict())
        x, y = fashion_batches_cached()[step % len(fashion_batches_cached())]
        if "gradient" in message.content:  # finish the previous batch with the server's gradient
            px, _ = fashion_batches_cached()[(step - 1) % len(fashion_batches_cached())]
            role.optimizer.zero_grad()
            bottom(px).backward(torch.from_numpy(message.content["gradient"]["g"].numpy()))
            role.optimizer.step()
        context.state["bottom"] = ArrayRecord(bottom.state_dict())
        with torch.no_grad():
            activations = bottom(x)
        return Message(RecordDict({"activations": ArrayRecord({"a": activations, "y": y})}), reply_to=message)

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        while not grid.get_node_ids():
            time.sleep(0.2)
        node = sorted(grid.get_node_ids())[0]
        bottom, top = lenet_parts()
        stage, state, gradient = server_stage(bottom, top), {}, None
        started, byte_count = None, 0
        for step in range(steps + 1):
            if step == 1:
                started = time.perf_counter()  # after the first (actor start-up) round trip
            content = {"config": ConfigRecord({"step": step})}
            if gradient is not None:
                content["gradient"] = ArrayRecord({"g": gradient})
            reply = next(iter(grid.send_and_receive([Message(RecordDict(content), dst_node_id=node, message_type="train.perbatch")], timeout=120)))
            arrays = reply.content["activations"]
            byte_count += nbytes_of_arrays([arrays["a"].numpy(), arrays["y"].numpy()]) + (gradient.numel() * 4 if gradient is not None else 0)
            _, out, _ = stage.handle("train", {"activations": torch.from_numpy(arrays["a"].numpy()), "labels": torch.from_numpy(arrays["y"].numpy())}, state)
            gradient = out["gradient"]
        elapsed = time.perf_counter() - started
        Path(result_file).write_text(json.dumps({"steps_per_s": steps / elapsed, "round_trip_s": elapsed / steps, "payload_bytes_per_step": byte_count / (steps + 1)}))

    run_simulation(server_app, client_app, num_supernodes=1, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"include_dashboard": False}})


_BATCH_CACHE: list = []


def fashion_batches_cached():
    if not _BATCH_CACHE:
        _BATCH_CACHE.extend(fashion_batches(50))
    return _BATCH_CACHE


# ---------------------------------------------------------- bytes and FLOPs


def traffic_and_flops(model_name: str, input_shape, cut: str, samples_per_client: int, num_classes: int = 10) -> dict:
    """Per client per epoch: split (data plane frames + relayed bottom) vs FedAvg (model down + up)."""
    torch.manual_seed(0)
    model = build_model(model_name, input_shape, num_classes)
    bottom, top = model_parts(model, cut)
    act_shape = activation_shape(bottom, input_shape)
    batches = -(-samples_per_client // BATCH)
    x = torch.randn(BATCH, *input_shape)
    y = torch.randint(0, num_classes, (BATCH,))
    activation_frame = len(encode_frame(Frame("train", {"activations": torch.zeros(BATCH, *act_shape), "labels": y}, token="t" * 32)))
    gradient_frame = len(encode_frame(Frame("gradient", {"gradient": torch.zeros(BATCH, *act_shape)}, meta={"loss": 0.0})))
    bottom_bytes = sum(p.numel() * 4 for p in bottom.state_dict().values())
    model_bytes = sum(p.numel() * 4 for p in model.state_dict().values())
    relay = 2 * 2 * bottom_bytes  # in + out, weights + momentum buffers (AES-GCM adds 28 bytes)
    flops_bottom = count_train_flops(bottom, x[:8]) / 8
    flops_whole = count_train_flops(model, x[:8], torch.nn.functional.cross_entropy, y[:8]) / 8
    return {
        "model": model_name, "input": list(input_shape), "cut": cut, "samples_per_client": samples_per_client,
        "split_bytes": batches * (activation_frame + gradient_frame) + relay,
        "fedavg_bytes": 2 * model_bytes,
        "split_client_flops": flops_bottom * samples_per_client,
        "fedavg_client_flops": flops_whole * samples_per_client,
    }


# ------------------------------------------------------------------- report


def write_report(results: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "split_overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    s = results["steps"]
    a = s["in_process"]["steps_per_s"]
    lines = [
        "# Split learning overhead",
        "",
        f"Measured {results['when']} on {results['machine']} (a 2-core machine shared with other work; CPU only, torch threads = {results['torch_threads']}).",
        "LeNet on Fashion-MNIST, batch 64, cut after `conv1`, SGD. Command: `flock /tmp/graftfl-bench.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/split_overhead.py`.",
        "",
        "## Steps per second",
        "",
        f"Median of {results['repeats']} interleaved repetitions of {results['steps_per_measurement']} steps (all values in the JSON); torch uses {results['torch_threads']} thread(s) per process. "
        f"1-minute load average of the machine before/after the steps/s measurements: {results['load_average_1min'][0]:.1f} / {results['load_average_1min'][1]:.1f} (2 cores).",
        "",
        "| setting | steps/s | vs (a) |",
        "|---|---:|---:|",
        f"| whole model, no split (reference) | {s['whole_model']['steps_per_s']:.1f} | {s['whole_model']['steps_per_s'] / a:.2f} |",
        f"| (a) split model in one process, no transport | {a:.1f} | 1.00 |",
        f"| (b) data plane over loopback, client in a separate process (float32) | {s['data_plane_process']['steps_per_s']:.1f} | {s['data_plane_process']['steps_per_s'] / a:.2f} |",
        f"| (b) data plane over loopback, client in a separate process (float16 wire) | {s['data_plane_process_fp16']['steps_per_s']:.1f} | {s['data_plane_process_fp16']['steps_per_s'] / a:.2f} |",
        f"| (b') data plane over loopback, client thread in the server process | {s['data_plane_thread']['steps_per_s']:.1f} | {s['data_plane_thread']['steps_per_s'] / a:.2f} |",
        *([f"| (b) data plane inside a `graftfl deploy-local` run (one turn of {s['data_plane_deploy_local']['steps']} batches; server-side frame timing) | "
            f"{s['data_plane_deploy_local']['steps_per_s']:.1f} | {s['data_plane_deploy_local']['steps_per_s'] / a:.2f} |"] if "steps_per_s" in s.get("data_plane_deploy_local", {}) else []),
        f"| (c) Flower messages, one batch per round trip, simulation | {s['flower_messages']['steps_per_s']:.2f} | {s['flower_messages']['steps_per_s'] / a:.3f} |",
        "",
        f"Target (b) >= 0.85 x (a): **{'met' if s['data_plane_process']['steps_per_s'] >= 0.85 * a else 'missed'}** "
        f"({s['data_plane_process']['steps_per_s'] / a:.2f}; against the whole, unsplit model: "
        f"{s['data_plane_process']['steps_per_s'] / s['whole_model']['steps_per_s']:.2f}).",
        "The server stage replies with the gradient of the activations first and completes its own parameter update after "
        "the reply has left (`TopStage`, `_PendingStep`), so over the data plane that update overlaps the client's backward "
        "pass; in (a) the same code runs serially, and (a) runs "
        f"{100 * (1 - a / s['whole_model']['steps_per_s']):.0f}% below the whole model (the cut and the stage's two backward passes).",
        f"Data-plane bytes per step (float32): {s['data_plane_process']['bytes_up_per_step']:.0f} up, {s['data_plane_process']['bytes_down_per_step']:.0f} down.",
        ("(b) inside `deploy-local`: deploy-local shares the machine's cores among its co-located ServerApp and ClientApps "
         f"(OMP_NUM_THREADS = cores // (clients + 1) = {max(1, (os.cpu_count() or 1) // 2)} here), so its threads match (a)'s; " if "data_plane_deploy_local" in s else
         "(b) is measured with the client as its own process on loopback, not inside a `graftfl deploy-local` run (no graftfl/deploy.py in this checkout); ")
        + "the Flower control-plane cost of a deployed turn is one message (~6 s, see docs/architecture.md) per turn, not per batch.",
        "",
        "## Bytes and client FLOPs per client per epoch (split vs FedAvg)",
        "",
        "Split: activation frames up + gradient frames down (graftfl frame sizes, float32) + the relayed bottom (weights and momentum, in and out). "
        "FedAvg: the whole model down and up once per epoch. FLOPs: forward + backward per sample x samples (torch FlopCounter).",
        "",
        "| model | input | cut | samples/client | split MB | FedAvg MB | split client GFLOP | FedAvg client GFLOP |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in results["traffic"]:
        lines.append(
            f"| {row['model']} | {'x'.join(map(str, row['input']))} | {row['cut']} | {row['samples_per_client']} | {row['split_bytes'] / 1e6:.1f} | "
            f"{row['fedavg_bytes'] / 1e6:.1f} | {row['split_client_flops'] / 1e9:.1f} | {row['fedavg_client_flops'] / 1e9:.1f} |"
        )
    lines += ["", "As in Gupta & Raskar Fig. 3-4: split costs far fewer client FLOPs; its bytes grow with the data per client, FedAvg's with the model, so split wins on bytes when clients are many (little data each) or the model is large.", ""]
    (OUT / "split_overhead.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--flower-steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1: the two processes of (b) do not fight over 2 cores)")
    parser.add_argument("--client", nargs=4, metavar=("ADDRESS", "TOKEN", "STEPS", "WIRE_DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--flower", nargs=2, metavar=("STEPS", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client_main(args.client[0], args.client[1], int(args.client[2]), args.client[3])
    if args.flower:
        return flower_main(int(args.flower[0]), args.flower[1])
    torch.set_num_threads(args.threads)
    os.environ["GRAFTFL_BENCH_THREADS"] = str(args.threads)  # the --client process uses the same
    batches = fashion_batches(args.steps)
    settings = {
        "whole_model": lambda: {"steps_per_s": steps_whole_model(batches)},
        "in_process": lambda: {"steps_per_s": steps_in_process(batches)},
        "data_plane_process": lambda: steps_data_plane(batches, separate_process=True),
        "data_plane_process_fp16": lambda: steps_data_plane(batches, separate_process=True, wire_dtype="float16"),
        "data_plane_thread": lambda: steps_data_plane(batches, separate_process=False),
    }
    # Interleaved repetitions, median reported: the machine is shared, load drifts during a run.
    samples: dict[str, list[dict]] = {name: [] for name in settings}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, measure in settings.items():
            samples[name].append(measure())
    steps = {}
    for name, runs in samples.items():
        ordered = sorted(runs, key=lambda r: r["steps_per_s"])
        steps[name] = {**ordered[len(ordered) // 2], "all_steps_per_s": [r["steps_per_s"] for r in runs]}
    load_during = [load_before, os.getloadavg()[0]]
    print(json.dumps(steps, indent=1), flush=True)
    steps["flower_messages"] = steps_flower_messages(args.flower_steps)
    deployed = steps_deploy_local(args.steps)
    if deployed is not None:
        steps["data_plane_deploy_local"] = deployed
    traffic = []
    for clients in (5, 100):
        traffic.append(traffic_and_flops("lenet", (1, 28, 28), "conv1", 60000 // clients))
        traffic.append(traffic_and_flops("vgg11", (3, 32, 32), "block1", 50000 // clients))
        traffic.append(traffic_and_flops("resnet18", (3, 32, 32), "stem", 50000 // clients))
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch_threads": torch.get_num_threads(), "batch_size": BATCH, "steps": steps, "traffic": traffic,
        "repeats": args.repeats, "steps_per_measurement": args.steps - 10, "load_average_1min": load_during,
    }
    write_report(results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
