"""Per-batch cost of a split step by the path its frames take, at the in-process simulation's settings.

LeNet on Fashion-MNIST, cut after ``conv1``, SGD, one process; the client's torch threads
``--threads``; the server stage's as ``graftfl sim sim.backend=inprocess`` sets them with
``protocol.plane_threads=null``: the client's count in memory, 1 in a gRPC handler thread (more
there gives the handler thread an OpenMP pool of its own, which slows every later step in the
process; ``--plane-threads`` sets one count for every path):

- whole model: the unsplit LeNet step (what R(N) compares split with);
- (a) split, no frames: the client role calls the server stage directly (the compute floor
  of split: two modules, two backward passes, two optimizer steps);
- (d) in-memory data plane (``sim.split_plane=direct``): encoded frames, token and tensor
  checks, served in the caller's thread;
- (b') gRPC data plane, client thread in the server process (``sim.split_plane=grpc``).

Interleaved repetitions, the median reported.

    python benchmarks/split_plane_paths.py            # batch 10 (sim_throughput's), 2 threads

Writes docs/benchmarks/split_plane_paths.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from common import write_results
from graftfl.core.data import load_dataset
from graftfl.core.models import build_model
from graftfl.core.split import BottomClient, TopStage, activation_shape, model_parts
from graftfl.core.train import make_optimizer
from graftfl.transport.client import DataPlaneClient
from graftfl.transport.server import DataPlaneServer

CUT, LR, WARMUP = "conv1", 0.01, 20
PATHS = {
    "whole": "whole model, no split (reference)",
    "direct_call": "(a) split, stage called directly (no frames)",
    "direct_plane": "(d) in-memory data plane (`sim.split_plane=direct`)",
    "grpc_thread": "(b') gRPC data plane, client thread in the server process (`sim.split_plane=grpc`)",
}


def batches_of(batch_size: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = load_dataset("fashion_mnist", download=False)
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))[: steps * batch_size]
    return [(data.train_x[idx], data.train_y[idx]) for idx in order.split(batch_size)]


def split_parts(plane_threads: int):
    torch.manual_seed(0)
    bottom, top = model_parts(build_model("lenet", (1, 28, 28), 10), CUT)
    role = BottomClient(bottom)
    role.optimizer = make_optimizer("sgd", bottom.parameters(), LR)
    stage = TopStage(top, make_optimizer("sgd", top.parameters(), LR), activation_shape(bottom, (1, 28, 28)), 10)
    return role, stage


def seconds_per_step(step, batches) -> float:
    for x, y in batches[:WARMUP]:
        step(x, y)
    started = time.perf_counter()
    for x, y in batches[WARMUP:]:
        step(x, y)
    return (time.perf_counter() - started) / (len(batches) - WARMUP)


def whole(batches, plane_threads: int) -> float:
    torch.manual_seed(0)
    model = build_model("lenet", (1, 28, 28), 10)
    optimizer = make_optimizer("sgd", model.parameters(), LR)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return seconds_per_step(step, batches)


def direct_call(batches, plane_threads: int) -> float:
    role, stage = split_parts(plane_threads)

    def exchange(kind, tensors):
        client_threads = torch.get_num_threads()
        if client_threads != plane_threads:  # as the in-memory data plane serves it
            torch.set_num_threads(plane_threads)
        _, reply, meta = stage.handle(kind, tensors, {}, defer_update=False)
        if client_threads != plane_threads:
            torch.set_num_threads(client_threads)
        return reply, meta

    return seconds_per_step(lambda x, y: role.train_step(x, y, exchange), batches)


def over_plane(batches, plane_threads: int, direct: bool) -> float:
    role, stage = split_parts(plane_threads)
    server = DataPlaneServer(stage, max_batch=len(batches[0][1]), compute_threads=plane_threads, direct=direct).start()
    try:
        turn = server.open_turn()
        with DataPlaneClient(server.address, turn.token) as plane:
            assert plane.in_memory == direct
            return seconds_per_step(lambda x, y: role.train_step(x, y, plane.exchange), batches)
    finally:
        server.stop()


MEASURES = {  # name -> (measure, whether the stage runs in the caller's thread)
    "whole": (whole, True),
    "direct_call": (direct_call, True),
    "direct_plane": (lambda batches, threads: over_plane(batches, threads, direct=True), True),
    "grpc_thread": (lambda batches, threads: over_plane(batches, threads, direct=False), False),
}


def render(payload: dict) -> str:
    whole_ms = payload["median_ms"]["whole"]
    lines = [
        "# Split step by data-plane path",
        "",
        f"Measured {payload['when']} on {payload['cpu']}; LeNet / Fashion-MNIST, batch {payload['batch_size']}, cut `{CUT}`, "
        f"client torch threads {payload['threads']}, stage threads {payload['plane_threads']} in memory and "
        f"{payload['grpc_plane_threads']} over gRPC; median of {payload['repeats']} interleaved "
        f"repetitions of {payload['steps'] - WARMUP} steps. Command: `{payload['command']}`.",
        "",
        "| path | ms per step | steps/s vs whole model (medians) | the same, paired: median of each repetition's ratio |",
        "|---|---:|---:|---:|",
    ]
    for name, label in PATHS.items():
        ms = payload["median_ms"][name]
        lines.append(f"| {label} | {ms:.3f} | {whole_ms / ms:.2f} | {payload['paired_ratio'][name]:.2f} |")
    lines += ["", "The paired ratio compares each path with the whole model measured beside it in the same repetition: this VM",
              "switches between a fast and a slow phase (the whole model's step in each repetition is in the JSON), and a",
              "ratio of medians can pair figures from different phases."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--plane-threads", type=int, default=None, help="the stage's torch threads on every path "
                        "(default: --threads in memory, 1 over gRPC, as protocol.plane_threads=null)")
    args = parser.parse_args()
    grpc_threads = args.plane_threads or 1
    args.plane_threads = args.plane_threads or args.threads
    torch.set_num_threads(args.threads)
    batches = batches_of(args.batch_size, args.steps)
    runs: dict[str, list[float]] = {name: [] for name in MEASURES}
    for repeat in range(args.repeats):
        for name, (measure, in_callers_thread) in MEASURES.items():
            runs[name].append(1e3 * measure(batches, args.plane_threads if in_callers_thread else grpc_threads))
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{name} {ms[-1]:.3f} ms" for name, ms in runs.items()), flush=True)
    payload = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__, "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
        "plane_threads": args.plane_threads, "grpc_plane_threads": grpc_threads, "command": "python benchmarks/split_plane_paths.py", "all_ms": runs,
        "median_ms": {name: statistics.median(ms) for name, ms in runs.items()}, "load_average_1min_after": os.getloadavg()[0],
        "paired_ratio": {name: statistics.median(w / x for w, x in zip(runs["whole"], ms, strict=True)) for name, ms in runs.items()},
    }
    write_results("split_plane_paths", payload, render(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
