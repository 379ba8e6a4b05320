"""What one SGD step of the shared train loop costs on CUDA, and which setting makes it cost that.

The simulation benchmark's centralized side (pfl-research's CIFAR-10 workload: ``model=cnn``,
batch 10, one torch thread) took about 2.4 ms a step on an H200, far above what the GPU
needs for such a model. Each variant runs in a fresh process (``CUBLAS_WORKSPACE_CONFIG``
counts only before CUDA's first matrix product) and times steps of
:func:`graftfl.core.train.train` over rows already on the device, after a warm-up:

- ``plain``: no deterministic kernels asked for;
- ``deterministic``: ``torch.use_deterministic_algorithms(True, warn_only=True)`` alone, as runs
  asked for it before (every cuBLAS call then raised a warning);
- ``deterministic+workspace``: :func:`graftfl.core.train.deterministic_kernels` (the fixed cuBLAS
  workspace with it), as runs ask for it now;
- ``..., rows on the CPU``: the same, with the rows copied to the device batch by batch.

    python benchmarks/gpu_step_cost.py      # writes docs/benchmarks/gpu_step_cost.{json,md}

Needs torch with CUDA; no Flower.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "plain": {"deterministic": "none", "rows": "cuda"},
    "deterministic": {"deterministic": "warn_only", "rows": "cuda"},
    "deterministic+workspace": {"deterministic": "kernels", "rows": "cuda"},
    "deterministic+workspace, rows on the CPU": {"deterministic": "kernels", "rows": "cpu"},
}
WORKLOADS = {"cnn 3x32x32 batch 10": ("cnn", (3, 32, 32), 10), "lenet 1x28x28 batch 64": ("lenet", (1, 28, 28), 64)}


def measure(variant: dict, steps: int = 300) -> dict:
    """Milliseconds per step of each workload under ``variant`` (run in this process)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from graftfl.core.data import make_loader
    from graftfl.core.models import build_model
    from graftfl.core.train import deterministic_kernels, make_optimizer, train

    torch.set_num_threads(1)
    if variant["deterministic"] == "warn_only":
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif variant["deterministic"] == "kernels":
        deterministic_kernels()
    device = torch.device("cuda")
    result = {}
    for name, (model_name, shape, batch) in WORKLOADS.items():
        torch.manual_seed(0)
        x, y = torch.randn(steps * batch, *shape), torch.randint(0, 10, (steps * batch,))
        if variant["rows"] == "cuda":
            x, y = x.to(device), y.to(device)
        model = build_model(model_name, shape, 10).to(device)
        optimizer = make_optimizer("sgd", model.parameters(), 0.01, 0.9)
        train(model, make_loader(x[: 20 * batch], y[: 20 * batch], batch, shuffle=True), optimizer, device=device)  # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        metrics = train(model, make_loader(x, y, batch, shuffle=True, seed=1), optimizer, device=device)
        torch.cuda.synchronize()
        assert metrics["steps"] == steps and metrics["loss"] == metrics["loss"]
        result[name] = 1000 * (time.perf_counter() - started) / steps
    return result


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--variant":  # the child process
        print(json.dumps(measure(VARIANTS[sys.argv[2]])))
        return 0
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_step_cost: CUDA is not available on this machine")
    rows = {}
    for name in VARIANTS:
        env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
        out = subprocess.run([sys.executable, __file__, "--variant", name], env=env, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            rows[name] = {"error": out.stderr[-2000:]}
        else:
            rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, rows[name], flush=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    payload = {"measured": stamp, "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "torch_threads": 1, "ms_per_step": rows}
    lines = [f"# One SGD step of the shared train loop on CUDA (ms)\n\nMeasured {stamp} on one {payload['device']} (torch {torch.__version__}, "
             "one torch thread; a lent GPU machine, not CI). Command: `python benchmarks/gpu_step_cost.py`. Each variant in a fresh process.\n",
             "| variant | " + " | ".join(WORKLOADS) + " |", "|---|" + "---:|" * len(WORKLOADS)]
    for name, row in rows.items():
        cells = [f"{row[w]:.3f}" if w in row else "failed" for w in WORKLOADS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out_dir = ROOT / "docs" / "benchmarks"
    (out_dir / "gpu_step_cost.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out_dir / "gpu_step_cost.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
