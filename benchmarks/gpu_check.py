"""CUDA paths of the training core and the split data plane, checked on a GPU machine.

CI has no GPU, so these paths are exercised here instead: ``device=auto`` picks
CUDA; the shared train loop; split learning over the real gRPC data plane with
the client's bottom and the server's top (or U-shaped middle) on the GPU, and
its weights against the whole model trained on the same batches; DP-SGD through
Opacus on a CUDA model; and DSSGD's upload selection, clipping and Laplace noise
on a CUDA update. Inputs are random tensors (only paths and speed are checked).

    python benchmarks/gpu_check.py        # writes docs/benchmarks/gpu_check.{json,md}

Needs torch with CUDA, opacus, omegaconf and grpcio; no Flower.
"""

from __future__ import annotations

import json
import platform
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from graftfl.core.models import build_model  # noqa: E402
from graftfl.core.split import BottomClient, MiddleStage, TopStage, UShapedClient, activation_shape, model_parts  # noqa: E402
from graftfl.core.train import make_optimizer, resolve_device, seed_everything, train  # noqa: E402

OUT = ROOT / "docs" / "benchmarks"
SHAPE, CLASSES, BATCH = (1, 28, 28), 10, 64


def batches(count: int, batch: int = BATCH, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *SHAPE, generator=generator), torch.randint(0, CLASSES, (batch,), generator=generator)) for _ in range(count)]


def fresh_lenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("lenet", SHAPE, CLASSES)


def sgd(params):
    return make_optimizer("sgd", params, 0.05, 0.9)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_device() -> dict:
    device = resolve_device("auto")
    assert device.type == "cuda", f"device=auto resolved to {device}"
    return {"device": str(device), "name": torch.cuda.get_device_name(device)}


def check_train_loop() -> dict:
    """Steps/s of the shared train loop, LeNet, on CUDA and on CPU."""
    result = {}
    for device_name in ("cuda", "cpu"):
        device = torch.device(device_name)
        for batch in (64, 512):
            data = batches(60, batch)
            model = fresh_lenet()
            loader = [(x, y) for x, y in data]
            train(model, loader[:10], sgd(model.parameters()), device=device)  # warm-up
            synchronize(device)
            started = time.perf_counter()
            metrics = train(model, loader[10:], sgd(model.parameters()), device=device)
            synchronize(device)
            assert metrics["steps"] == 50 and metrics["loss"] == metrics["loss"]
            assert next(model.parameters()).device.type == device_name
            result[f"{device_name}_batch{batch}_steps_per_s"] = 50 / (time.perf_counter() - started)
    return result


def run_over_data_plane(stage, role, data, ushaped: bool = False) -> float:
    from graftfl.transport.client import DataPlaneClient
    from graftfl.transport.server import DataPlaneServer

    server = DataPlaneServer(stage, max_batch=BATCH).start()
    turn = server.open_turn()
    elapsed = {}

    def client() -> None:
        with DataPlaneClient(server.address, turn.token) as plane:
            started = time.perf_counter()
            for x, y in data:
                role.train_step(x, y, plane.exchange)
            synchronize(role.device)
            elapsed["s"] = time.perf_counter() - started

    try:
        thread = threading.Thread(target=client)
        thread.start()
        thread.join(timeout=300)
        server.close_turn(turn)
        assert turn.ended_cleanly and "s" in elapsed, f"the client's turn did not finish (error: {turn.error})"
    finally:
        server.stop()
    return len(data) / elapsed["s"]


def whole_model_weights(data, device: torch.device) -> dict[str, torch.Tensor]:
    model = fresh_lenet().to(device)
    optimizer = sgd(model.parameters())
    for x, y in data:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        optimizer.step()
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def largest_difference(parts: list[torch.nn.Module], reference: dict[str, torch.Tensor]) -> float:
    return max(float((v.detach().cpu() - reference[k]).abs().max()) for part in parts for k, v in part.state_dict().items())


def check_split_on_cuda() -> dict:
    """Split (bottom and top on CUDA) over loopback gRPC; weights vs the whole model on CUDA."""
    device = torch.device("cuda")
    seed_everything(0, deterministic=True)
    data = batches(200)
    bottom, top = model_parts(fresh_lenet(), None)
    stage = TopStage(top, sgd(top.parameters()), activation_shape(bottom, SHAPE), CLASSES, device)
    role = BottomClient(bottom, device=device)
    role.optimizer = sgd(role.bottom.parameters())
    steps_per_s = run_over_data_plane(stage, role, data)
    difference = largest_difference([role.bottom, stage.top], whole_model_weights(data, device))
    assert stage.steps == len(data) and difference < 1e-3, f"{stage.steps} steps, largest weight difference {difference}"
    return {"steps_per_s": steps_per_s, "server_steps": stage.steps, "largest_weight_difference_vs_whole_model": difference}


def check_ushaped_on_cuda() -> dict:
    device = torch.device("cuda")
    seed_everything(0, deterministic=True)
    data = batches(100)
    bottom, middle, head = model_parts(fresh_lenet(), None, head_stages=1)
    act_shape = activation_shape(bottom, SHAPE)
    stage = MiddleStage(middle, sgd(middle.parameters()), act_shape, activation_shape(middle, act_shape), device)
    role = UShapedClient(bottom, head, device=device)
    role.optimizer = sgd([*role.bottom.parameters(), *role.head.parameters()])
    steps_per_s = run_over_data_plane(stage, role, data)
    difference = largest_difference([role.bottom, stage.middle, role.head], whole_model_weights(data, device))
    assert stage.steps == len(data) and difference < 1e-3, f"{stage.steps} steps, largest weight difference {difference}"
    return {"steps_per_s": steps_per_s, "server_steps": stage.steps, "largest_weight_difference_vs_whole_model": difference}


def check_dpsgd_on_cuda() -> dict:
    from graftfl.core.data import per_row_loader
    from graftfl.core.privacy import DpSgdConfig, PrivateTraining

    device = torch.device("cuda")
    x = torch.randn(1024, *SHAPE)
    y = torch.randint(0, CLASSES, (1024,))
    model = fresh_lenet().to(device)
    private = PrivateTraining(DpSgdConfig(max_grad_norm=1.0, delta=1e-5, noise_multiplier=1.0))
    private_model, optimizer, loader = private.attach(model, sgd(model.parameters()), per_row_loader(x, y, BATCH, shuffle=True, seed=0))
    metrics = train(private_model, loader, optimizer, device=device)
    epsilon = private.epsilon()
    assert metrics["steps"] > 0 and 0 < epsilon < float("inf") and all(torch.isfinite(p).all() for p in model.parameters())
    return {"steps": metrics["steps"], "epsilon_after_one_epoch": epsilon}


def check_selective_upload_on_cuda() -> dict:
    from graftfl.core.selective import make_upload

    delta = torch.randn(100_000, device="cuda")
    result = {}
    for selection, threshold, epsilon in (("largest", None, None), ("threshold", 0.5, None), ("sparse_vector", 0.5, 1.0)):
        upload = make_upload(delta, theta_upload=0.01, selection=selection, threshold=threshold, clip=0.1,
                             upload_epsilon=epsilon, generator=torch.Generator().manual_seed(0))
        assert upload.indices.numel() == 1000 and torch.isfinite(upload.values).all()
        assert upload.values.device.type == "cpu" and upload.indices.device.type == "cpu", "an upload is bound for the wire"
        result[f"{selection}_uploaded"] = int(upload.indices.numel())
    return result


CHECKS = {
    "device=auto picks CUDA": check_device,
    "shared train loop on CUDA (LeNet)": check_train_loop,
    "split over the gRPC data plane, bottom and top on CUDA": check_split_on_cuda,
    "ushaped over the gRPC data plane, bottom/middle/head on CUDA": check_ushaped_on_cuda,
    "DP-SGD (Opacus) on a CUDA model": check_dpsgd_on_cuda,
    "DSSGD upload selection, clipping, Laplace noise on a CUDA update": check_selective_upload_on_cuda,
}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    results = {}
    for name, check in CHECKS.items():
        try:
            results[name] = {"ok": True, **check()}
        except Exception as err:  # every check reports, one failure does not hide the others
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
        print(f"[gpu] {name}: {json.dumps(results[name])[:400]}", flush=True)
    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
              "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "checks": results}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    write_report(report)
    return 0 if all(r["ok"] for r in results.values()) else 1


def write_report(report: dict) -> None:
    checks = report["checks"]
    lines = [
        "# CUDA paths (GPU check)",
        "",
        f"Measured {report['when']} on one {report['gpu']} (torch {report['torch']}; a lent GPU machine, not CI). "
        "Command: `python benchmarks/gpu_check.py`. Random inputs: paths and speed only, no accuracy.",
        "",
        "| check | result | figures |",
        "|---|---|---|",
    ]
    for name, result in checks.items():
        figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items() if k not in ("ok", "error", "traceback"))
        lines.append(f"| {name} | {'ok' if result['ok'] else 'FAILED: ' + result['error']} | {figures} |")
    (OUT / "gpu_check.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
