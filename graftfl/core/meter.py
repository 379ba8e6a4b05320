"""Metrics: client FLOPs, per-round records and the run directory writer.

``RunRecorder`` writes the run-directory contract of docs/architecture.md ("Outputs"):
``config.yaml``, ``metrics.jsonl``, ``summary.json`` and PNG plots. It knows
nothing of Flower, so centralized baselines write the same format.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

SUMMED_FIELDS = ("bytes_up", "bytes_down", "client_flops", "wall_s")


def count_train_flops(model: nn.Module, example_input: torch.Tensor, loss_fn: Callable | None = None, targets: torch.Tensor | None = None) -> int:
    """FLOPs of one forward + backward pass of ``model`` on ``example_input``.

    With ``loss_fn`` and ``targets`` the loss is part of the pass; otherwise the
    backward pass starts from a gradient of ones on the output (the split
    learning bottom's view: it receives the gradient of its activations).
    """
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        output = model(example_input)
        if loss_fn is not None and targets is not None:
            loss_fn(output, targets).backward()
        else:
            output.backward(torch.ones_like(output))
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


_FLOPS_PER_SAMPLE: dict[tuple, float] = {}  # architecture, input shape, loss -> FLOPs per sample


def train_flops_per_sample(
    module: nn.Module, example: torch.Tensor, loss_fn: Callable | None = None, targets: torch.Tensor | None = None
) -> float:
    """Forward + backward FLOPs per training sample of ``module`` (see :func:`count_train_flops`).

    Counted on the first two rows of ``example`` (and ``targets``), moved to the
    device of ``module``'s parameters, so a module on a GPU is counted there. The
    count is cached per architecture (``repr(module)``), input shape and loss: it
    depends on nothing else. Counting leaves ``module`` as it was: its buffers
    (batch-norm statistics), gradients, train/eval modes and the CPU random state
    are restored, so a FLOP count never changes what a run learns.

    Parameters
    ----------
    module : nn.Module
        The model or model part one participant trains.
    example : torch.Tensor
        Inputs, batch first (only the per-sample shape and two rows are used).
    loss_fn, targets : optional
        The training loss and its targets; without them the backward pass starts
        from a gradient of ones on the output (a split bottom's view).
    """
    key = (repr(module), tuple(example.shape[1:]), getattr(loss_fn, "__name__", repr(loss_fn)), targets is not None)
    if key not in _FLOPS_PER_SAMPLE:
        parameter = next(module.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        example = example[:2].to(device)
        targets = targets[:2].to(device) if targets is not None else None
        modes = [(m, m.training) for m in module.modules()]
        buffers = [(b, b.detach().clone()) for b in module.buffers()]
        grads = [(p, p.grad) for p in module.parameters()]
        for p, _ in grads:
            p.grad = None  # set aside: the counting backward pass would add into them
        with torch.random.fork_rng(devices=[]):
            flops = count_train_flops(module, example, loss_fn, targets)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for p, grad in grads:
            p.grad = grad
        for m, training in modes:
            m.training = training
        _FLOPS_PER_SAMPLE[key] = flops / len(example)
    return _FLOPS_PER_SAMPLE[key]


def metrics_row(
    round_number: int,
    *,
    accuracy: float | None,
    loss: float | None,
    bytes_up: float,
    bytes_down: float,
    client_flops: float,
    wall_s: float,
    client_rows: Sequence[Mapping[str, Any]] | None = None,
    client_columns: Mapping[str, str] | None = None,
    epsilon: float | None = None,
    client_epsilon: Sequence[float] | None = None,
    **fields: Any,
) -> dict:
    """One ``metrics.jsonl`` row of a round or turn, in the fields of docs/architecture.md ("Outputs").

    Every protocol builds its rows here, so the common fields are always present
    and always named the same.

    Parameters
    ----------
    round_number : int
        The row's ``round``.
    accuracy, loss : float or None
        The round's test accuracy and loss (None where the round has none).
    bytes_up, bytes_down, client_flops, wall_s : float
        The round's traffic, client compute and duration (summed in ``summary.json``).
    client_rows : sequence of mapping, optional
        The per-client results of the round, in the order the lists should have
        (callers sort by partition id). With them the row gets ``clients`` (their
        ``partition-id``, -1 where missing) and one list per ``client_columns`` entry.
    client_columns : mapping, optional
        Row field -> key in each client row, e.g. ``{"client_train_loss": "train_loss"}``.
    epsilon : float, optional
        The privacy spent by a single trainer (gives ``epsilon`` only).
    client_epsilon : sequence of float, optional
        The privacy spent per participant: gives ``epsilon`` (the largest) and
        ``client_epsilon``. Neither (or an empty list): no privacy fields.
    **fields
        Protocol-specific fields, added after the common ones.
    """
    row: dict[str, Any] = {
        "round": round_number,
        "accuracy": accuracy,
        "loss": loss,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "client_flops": client_flops,
        "wall_s": wall_s,
    }
    if client_rows is not None:
        row["clients"] = [int(client.get("partition-id", -1)) for client in client_rows]
        row.update({name: [client.get(key) for client in client_rows] for name, key in (client_columns or {}).items()})
    row.update(fields)
    if client_epsilon:
        row["epsilon"], row["client_epsilon"] = max(client_epsilon), list(client_epsilon)
    elif epsilon is not None:
        row["epsilon"] = epsilon
    return row


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    return value


class RunRecorder:
    """Append per-round metrics and write the summary and plots of one run.

    Parameters
    ----------
    run_dir : Path
        ``runs/<run-id>``; created if missing.
    resume : bool
        Keep existing ``metrics.jsonl`` rows (a resumed run appends to them).
    resume_round : int, optional
        The round of the checkpoint a resumed run continues from. Rows of later rounds
        (logged before a crash that came before their checkpoint) are dropped, since
        those rounds run again: every round appears once in ``metrics.jsonl``.
    """

    def __init__(self, run_dir: Path, resume: bool = False, resume_round: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        if resume and self.metrics_path.exists():
            self.rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
            if resume_round is not None and any(int(row["round"]) > resume_round for row in self.rows):
                self.rows = [row for row in self.rows if int(row["round"]) <= resume_round]
                tmp = self.metrics_path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(row) + "\n" for row in self.rows))
                os.replace(tmp, self.metrics_path)  # atomic: a second crash leaves the old or the new file
        elif self.metrics_path.exists():
            self.metrics_path.unlink()
        self._started = time.monotonic()

    def write_config(self, config_yaml: str) -> None:
        """Write the resolved run config to ``config.yaml`` in the run directory."""
        (self.run_dir / "config.yaml").write_text(config_yaml)

    def log_round(self, row: dict) -> dict:
        """Append one round/turn (must carry ``round``) to ``metrics.jsonl`` and return it."""
        row = _jsonable(dict(row))
        self.rows.append(row)
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        return row

    @property
    def last_round(self) -> int:
        """The number of the last recorded round, 0 before the first."""
        return int(self.rows[-1]["round"]) if self.rows else 0

    def totals(self) -> dict[str, float]:
        """Sums over all recorded rounds of the fields in ``SUMMED_FIELDS`` (bytes, FLOPs, wall time)."""
        return {field: float(sum(row.get(field) or 0 for row in self.rows)) for field in SUMMED_FIELDS}

    def write_summary(self, **fields: Any) -> dict:
        """Write ``summary.json``: final accuracy, totals of the summed fields, and ``fields``."""
        final = self.rows[-1] if self.rows else {}
        summary = {"accuracy": final.get("accuracy"), "loss": final.get("loss"), **self.totals()}
        if any("epsilon" in row for row in self.rows):
            summary["epsilon"] = max((row.get("epsilon") or 0.0) for row in self.rows)
        summary.update(fields)
        summary = _jsonable(summary)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def plot(self, title: str = "") -> list[Path]:
        """Accuracy per round and accuracy vs cumulative bytes (up + down), as PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [row for row in self.rows if row.get("accuracy") is not None]
        if not rows:
            return []
        rounds = [row["round"] for row in rows]
        accuracy = [row["accuracy"] for row in rows]
        cumulative, total = [], 0.0
        for row in self.rows:
            total += (row.get("bytes_up") or 0) + (row.get("bytes_down") or 0)
            if row.get("accuracy") is not None:
                cumulative.append(total / 1e6)
        paths = []
        for name, xs, xlabel in (("accuracy.png", rounds, "round"), ("accuracy_vs_bytes.png", cumulative, "cumulative MB (up + down)")):
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.plot(xs, accuracy, marker="o")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = self.run_dir / name
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
        return paths
