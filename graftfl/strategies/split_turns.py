"""Server-side turn orchestration shared by ``split``, ``ushaped`` and ``semisup``.

Flower is the control plane: each client *turn* is one ``train.<protocol>``
message carrying the data-plane address, a one-time token, the turn length and
the protocol config (plus the relayed ciphertext or the averaged weights); the
per-batch traffic runs over :class:`~graftfl.transport.server.DataPlaneServer`
meanwhile. Evaluation is an ``evaluate.<protocol>`` message to every site
(``eval.where=site``, the default): each site scores the current parts on its own
held-out rows and returns only ``correct``, ``loss_sum`` and ``count``; the server
pools them weighted by count. ``eval.where=server`` streams the server's test set
through a client's bottom instead: the server then holds (input, activation)
pairs for inputs it chose and can fit the bottom, so with ``relay`` it is a config
error unless ``eval.server_reveals_bottom`` acknowledges that.

A round in which every turn failed stops the run with the turns' reasons.

Faults: a turn whose reply is an error, does not arrive within
``protocol.turn_timeout_s`` or is refused (:func:`~graftfl.strategies.split_handoff.turn_reply_problem`,
:meth:`~graftfl.strategies.split_handoff.HandoffState.problem`) is recorded in ``failed_turns``; its token is
revoked, the server's model part stays as after the last completed step, and
the next client continues (from the last handed-back ciphertext with relay).
"""

from __future__ import annotations

import logging
import math
import random
import time

import numpy as np
import torch
from flwr.app import Message, RecordDict

from graftfl.core.handoff import RELAY_KEY
from graftfl.core.meter import metrics_row
from graftfl.core.split import MiddleStage, TopStage, activation_shape, cut_points, model_parts, split_at_cut
from graftfl.config import eval_where
from graftfl.core.train import optimizer_from_config
from graftfl.core.wire import DATA_PLANE_ADDRESS, DATA_PLANE_TOKEN, SERVER_ROUND, SITE_TURN_KEY, max_frame_bytes, max_frame_rows
from graftfl.strategies.split_config import serves_in_memory, stage_threads
from graftfl.strategies.split_handoff import HandoffState, parts_signature, turn_reply_problem
from graftfl.strategies.replies import claimed_whole_number, metrics_problem
from graftfl.strategies.utils import ServerRun, wait_for_nodes
from graftfl.strategies.wire_bytes import message_nbytes
from graftfl.transport.server import DataPlaneServer


log = logging.getLogger(__name__)

class AllTurnsFailed(RuntimeError):
    """Every turn of a round failed: the run stops with the turns' reasons (``failed_turns``: their records)."""

    def __init__(self, message: str, failed_turns: list[dict]):
        super().__init__(message)
        self.failed_turns = failed_turns


def start_data_plane(cfg, stage) -> DataPlaneServer:
    """The data plane for ``stage``, with the config's addresses, limits and TLS files."""
    tls = cfg.get("tls") or {}
    return DataPlaneServer(
        stage,
        bind_address=cfg.protocol.bind_address,
        advertise_address=cfg.protocol.advertise_address,
        wire_dtype=cfg.protocol.wire_dtype,
        max_batch=max_frame_rows(cfg),
        max_frame_bytes=max_frame_bytes(cfg),
        server_cert=tls.get("server_cert"),
        server_key=tls.get("server_key"),
        idle_timeout_s=float(cfg.protocol.idle_timeout_s),
        max_pending_streams=int(cfg.protocol.max_pending_streams),
        compute_threads=stage_threads(cfg),
        flush_denormal=bool(cfg.get("flush_denormal", False)),
        direct=serves_in_memory(cfg),
    ).start()


def frame_kinds(stage, category: str) -> tuple[str, ...]:
    """The frame kinds a ``train`` or ``evaluate`` turn of ``stage`` accepts (an evaluation turn trains nothing)."""
    if category == "evaluate":  # activations in, outputs back: labels and scores stay at the site
        return ("eval_forward",)
    three_part = isinstance(stage, MiddleStage)  # ushaped: the server holds the middle
    return ("forward", "backward") if three_part else ("train",)


def train_batch_cap(cfg, run: ServerRun) -> int:
    """Most batches a training turn may send: ``turn_batches``, else whole epochs of the largest possible partition."""
    if cfg.protocol.turn_batches is not None:
        return int(cfg.protocol.turn_batches)
    samples = cfg.partition.get("samples_per_client") or run.max_site_rows()
    return int(cfg.train.local_epochs) * math.ceil(int(samples) / int(cfg.train.batch_size))


def top_stage(run: ServerRun) -> tuple[TopStage, torch.nn.Module, dict[str, torch.nn.Module]]:
    """The server's part for ``split`` and ``semisup``: the top of the shared-seed model, and the sites' part
    (the bottom: its architecture only, for checking averaged parts; its weights are never used)."""
    bottom, top, act_shape = split_at_cut(run.new_model(), run.cfg.protocol.cut_stage, run.input_shape)
    optimizer = optimizer_from_config(run.cfg.train, top.parameters())
    return TopStage(top, optimizer, act_shape, run.num_classes, run.device), top, {"bottom": bottom}


def middle_stage(run: ServerRun) -> tuple[MiddleStage, torch.nn.Module, dict[str, torch.nn.Module]]:
    """The server's part for ``ushaped``: the middle of the shared-seed model, and the sites' parts (architecture only)."""
    bottom, middle, head = model_parts(run.new_model(), run.cfg.protocol.cut_stage, int(run.cfg.protocol.head_stages))
    act_shape = activation_shape(bottom, run.input_shape)
    out_shape = activation_shape(middle, act_shape)
    optimizer = optimizer_from_config(run.cfg.train, middle.parameters())
    return MiddleStage(middle, optimizer, act_shape, out_shape, run.device), middle, {"bottom": bottom, "head": head}


def send_one(grid, message: Message, timeout_s: float) -> tuple[Message | None, str | None]:
    """Send one message and wait for its reply: ``(reply, None)`` or ``(None, reason)``."""
    replies = list(grid.send_and_receive([message], timeout=timeout_s))
    if not replies:
        return None, f"no reply within {timeout_s:.0f} s"
    reply = replies[0]
    if reply.has_error():
        return None, f"client error: {reply.error.reason}"
    return reply, None


def turn_order(nodes: list[int], mode: str, seed: int, round_number: int) -> list[int]:
    """The order in which ``nodes`` take their turns in ``round_number``: as given, or shuffled reproducibly."""
    if mode == "random":
        order = list(nodes)
        random.Random(seed * 7919 + round_number).shuffle(order)
        return order
    return list(nodes)


def cfg_cut_stage(run: ServerRun) -> str:
    """The stage name the model is cut after (``protocol.cut_stage``, else the first stage with parameters)."""
    return cut_points(run.new_model(), run.cfg.protocol.cut_stage)[0]


class SplitRunner:
    """Runs the rounds of one split protocol (one turn per client per round).

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The control plane.
    run : ServerRun
        Config, recorder, test set.
    protocol : str
        ``split``, ``ushaped`` or ``semisup`` (the message types' suffix).
    stage : TopStage | MiddleStage
        The server's model part (from :mod:`graftfl.core.split`).
    server_part : torch.nn.Module
        The module inside ``stage`` (checkpointed each round).
    client_parts : dict of str to torch.nn.Module
        The sites' parts by role name (``bottom``, ``head``, ``decoder``): their architecture is
        what an averaged hand-off must match.
    """

    def __init__(self, grid, run: ServerRun, protocol: str, stage, server_part: torch.nn.Module, client_parts: dict[str, torch.nn.Module]):
        self.grid, self.run, self.cfg, self.protocol = grid, run, run.cfg, protocol
        self.stage, self.server_part = stage, server_part
        self.handoff = HandoffState(self.cfg.protocol.handoff, expected=parts_signature(client_parts))
        self.partition_of: dict[int, int] = {}
        self.failed_turns: list[dict] = []
        self.cut_stage = cfg_cut_stage(run)
        run.audit.watch_stage(stage, self.handoff)  # audit.record

    def run_rounds(self) -> dict:
        """Start the data plane, run every round's turns and evaluations, and stop it; returns the run summary."""
        cfg = self.cfg
        nodes = self.run.in_site_order(wait_for_nodes(self.grid, cfg.num_clients, cfg.timeout_s))
        self.plane = start_data_plane(cfg, self.stage)
        log.info(f"[{self.protocol}] data plane on {self.plane.address} (tls={self.plane.tls}, handoff={cfg.protocol.handoff})")
        try:
            self.run.round_seconds()
            for round_number in range(1, cfg.rounds + 1):
                rows = [self.client_turn(node, round_number, index) for index, node in enumerate(turn_order(nodes, cfg.protocol.turn_order, cfg.seed, round_number))]
                if not any(rows):
                    reasons = "; ".join(f"node {f['node']}: {f['reason']}" for f in self.failed_turns if f["round"] == round_number)
                    raise AllTurnsFailed(f"[{self.protocol}] round {round_number}: every turn failed ({reasons})", list(self.failed_turns))
                self.handoff.end_round()
                evaluation = self.evaluate(nodes, round_number)
                self.log_round(round_number, [r for r in rows if r is not None], evaluation)
        finally:
            self.plane.stop()
        return {"failed_turns": self.failed_turns, "handoff": cfg.protocol.handoff, "cut_stage": self.cut_stage, "data_plane_tls": self.plane.tls}

    # ------------------------------------------------------------------ turns
    def message(self, node: int, category: str, turn, round_number: int, **fields) -> tuple[Message, int]:
        """The message of a ``category`` turn to ``node`` (data-plane address and token, handoff records); returns it and its size."""
        records, _ = self.handoff.outgoing()
        config = self.run.config_record(**{
            SERVER_ROUND: round_number,
            DATA_PLANE_ADDRESS: self.plane.address,
            DATA_PLANE_TOKEN: turn.token,
            **fields,
        })
        content = RecordDict({"config": config, **records})
        message = Message(content=content, dst_node_id=node, message_type=f"{category}.{self.protocol}")
        return message, message_nbytes(message)  # the whole message (config, hand-off), not the payload alone

    def client_turn(self, node: int, round_number: int, index: int) -> dict | None:
        """Run one client's training turn; returns its metrics row, or None when the turn failed (the round goes on)."""
        max_batches = train_batch_cap(self.cfg, self.run)
        turn = self.plane.open_turn(label=f"round {round_number} node {node}", accept=frame_kinds(self.stage, "train"), max_batches=max_batches)
        steps_before = self.stage.steps
        message, bytes_down = self.message(node, "train", turn, round_number, **{"turn-index": index})
        started = time.monotonic()
        reply, failure = send_one(self.grid, message, float(self.cfg.protocol.turn_timeout_s))
        self.plane.close_turn(turn)
        if failure is None:
            problem = turn_reply_problem(reply, max_batches, max_frame_rows(self.cfg)) or self.handoff.problem(reply)
            failure = None if problem is None else f"refused reply: {problem}"
        if failure is not None:
            record = {
                "round": round_number, "node": node, "partition-id": self.partition_of.get(node, -1), "reason": failure,
                "server_steps_kept": self.stage.steps - steps_before, "stream_error": turn.error,
            }
            self.failed_turns.append(record)
            log.warning("split turn failed: %s", record)
            log.warning(f"[{self.protocol}] round {round_number}: turn of node {node} failed ({failure}); continuing with the next client")
            return None
        metrics = dict(reply.content["metrics"])
        partition = int(metrics.get("partition-id", -1))
        self.partition_of[node] = partition
        self.handoff.accept(reply, int(metrics.get("samples", 0)))
        self.run.audit.end_turn(turn.state, round_number, partition, claimed_whole_number(metrics, SITE_TURN_KEY))
        handed_back = message_nbytes(reply)  # the whole reply (metrics, hand-off), as for the message sent
        return {
            "partition-id": partition,
            "bytes_up": turn.bytes_up + handed_back,
            "bytes_down": turn.bytes_down + bytes_down,
            "steps": int(metrics.get("steps", 0)),
            "train_loss": metrics.get("train_loss"),
            "client_flops": float(metrics.get("client_flops", 0.0)),
            "turn_s": time.monotonic() - started,
            # one frame per batch for split/semisup, two for ushaped
            "plane_frames_per_s": turn.frames_per_second(),
            **({"epsilon": float(metrics["epsilon"])} if "epsilon" in metrics else {}),  # privacy=dpsgd: the site's cumulative ε
        }

    # ------------------------------------------------------------- evaluation
    def evaluate(self, nodes: list[int], round_number: int) -> dict:
        """Accuracy and loss of the current parts, pooled over the evaluating sites (weighted by count).

        ``eval.where=site``: every site on its own held-out rows. ``eval.where=server``:
        the server's test set through one client (every site with ``handoff=local``).
        """
        if eval_where(self.cfg) == "site" or self.cfg.protocol.handoff == "local":
            targets = nodes
        else:  # the latest relayed / averaged weights: any client can load them
            targets = [nodes[0]]
        results = [r for r in (self.evaluate_on(node, round_number) for node in targets) if r is not None]
        counted = [r for r in results if r["count"] > 0]
        if not counted:
            return {"accuracy": None, "loss": None, "bytes_up": sum(r["bytes_up"] for r in results), "bytes_down": sum(r["bytes_down"] for r in results), "per_client": results}
        total = sum(r["count"] for r in counted)
        return {
            "accuracy": sum(r["correct"] for r in counted) / total,
            "loss": sum(r["loss_sum"] for r in counted) / total,
            "bytes_up": sum(r["bytes_up"] for r in results),
            "bytes_down": sum(r["bytes_down"] for r in results),
            "per_client": results,
        }

    def evaluate_on(self, node: int, round_number: int) -> dict | None:
        # at most one frame per test sample: an evaluation turn cannot stream more than the test set
        """Run an evaluation turn on ``node`` (its own held-out data); returns its scores, or None when it failed."""
        turn = self.plane.open_turn(label=f"evaluate round {round_number} node {node}", accept=frame_kinds(self.stage, "evaluate"),
                                    max_batches=max(1, self.run.max_eval_rows()))
        message, bytes_down = self.message(node, "evaluate", turn, round_number)
        reply, failure = send_one(self.grid, message, float(self.cfg.protocol.turn_timeout_s))
        self.plane.close_turn(turn)
        if failure is None:  # a NaN count stopped the server
            problem = metrics_problem(reply.content, counts=("partition-id", "count", "correct"))
            failure = None if problem is None else f"refused reply: {problem}"
        if failure is not None:
            log.warning("evaluation on node %s failed: %s", node, failure)
            return None
        # Only aggregate counts come back (the labels stay at the site); bounded before they are pooled.
        metrics = reply.content["metrics"]
        count = max(int(metrics.get("count", 0)), 0)
        correct = min(max(int(metrics.get("correct", 0)), 0), count)
        loss_sum = float(metrics.get("loss_sum", 0.0))
        if not np.isfinite(loss_sum) or loss_sum < 0:
            log.warning("evaluation on node %s returned an invalid loss sum %r: ignored", node, loss_sum)
            return None
        return {
            "partition-id": int(metrics.get("partition-id", -1)),
            "count": count,
            "correct": correct,
            "loss_sum": loss_sum,
            "accuracy": correct / count if count else None,
            "loss": loss_sum / count if count else None,
            "bytes_up": turn.bytes_up + message_nbytes(reply),
            "bytes_down": turn.bytes_down + bytes_down,
        }

    # ---------------------------------------------------------------- metrics
    def log_round(self, round_number: int, rows: list[dict], evaluation: dict) -> None:
        """Record the metrics row of ``round_number`` from the turns' rows and the evaluation."""
        rows = sorted(rows, key=lambda r: r["partition-id"])
        failed = [f for f in self.failed_turns if f["round"] == round_number]
        row = metrics_row(
            round_number,
            accuracy=evaluation["accuracy"],
            loss=evaluation["loss"],
            bytes_up=sum(r["bytes_up"] for r in rows) + evaluation["bytes_up"],
            bytes_down=sum(r["bytes_down"] for r in rows) + evaluation["bytes_down"],
            client_flops=sum(r["client_flops"] for r in rows),
            wall_s=self.run.round_seconds(),
            client_rows=rows,
            client_columns={
                "client_steps": "steps",
                "client_train_loss": "train_loss",
                "client_bytes_up": "bytes_up",
                "client_bytes_down": "bytes_down",
                "client_flops_per_client": "client_flops",
                "client_turn_s": "turn_s",
                "client_plane_frames_per_s": "plane_frames_per_s",
            },
            client_epsilon=[r["epsilon"] for r in rows if "epsilon" in r],
            server_steps=self.stage.steps,
            eval_clients=[r["partition-id"] for r in evaluation["per_client"]],
            eval_client_accuracy=[r["accuracy"] for r in evaluation["per_client"]],
            eval_client_loss=[r["loss"] for r in evaluation["per_client"]],
            eval_client_count=[r["count"] for r in evaluation["per_client"]],
            eval_where=eval_where(self.cfg),
            failed_turns=len(failed),
        )
        self.run.recorder.log_round(row)
        self.run.checkpoint(round_number, self.server_part, {"part": "server", "protocol": self.protocol, RELAY_KEY: self.handoff.ciphertext})
        accuracy = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        log.info(f"[{self.protocol}] round {round_number}/{self.cfg.rounds} accuracy {accuracy} failed turns {len(failed)}")
