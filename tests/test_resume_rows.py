"""A crash between logging a round and checkpointing it: the resumed run has every round once."""

from __future__ import annotations

import json

import pytest

from graftfl.config import compose_config
from graftfl.core.meter import RunRecorder
from graftfl.server_app.app import run_protocol
from graftfl.strategies.checkpoint import load_checkpoint
from graftfl.strategies.utils import ServerRun
from tests.dssgd_helpers import LocalGrid, server_identity

BASE = ["protocol=dssgd", "dataset=digits", "progress=false", "train.local_steps=2", "num_clients=2"]


def rounds_logged(run_dir) -> list[int]:
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_a_round_logged_but_not_checkpointed_is_logged_once_after_resume(tmp_path, monkeypatch):
    real_checkpoint = ServerRun.checkpoint

    def crash_at_round_2(self, round_number, model, extra=None):
        if round_number == 2:
            raise RuntimeError("simulated crash after logging round 2, before its checkpoint")
        return real_checkpoint(self, round_number, model, extra)

    monkeypatch.setattr(ServerRun, "checkpoint", crash_at_round_2)
    cfg = compose_config([*BASE, f"output_dir={tmp_path}", "run_id=crashy", "rounds=3"])
    with server_identity(), pytest.raises(RuntimeError, match="simulated crash"):
        run_protocol(LocalGrid(2), cfg)
    run_dir = tmp_path / "crashy"
    assert rounds_logged(run_dir) == [1, 2] and load_checkpoint(run_dir)["round"] == 1

    monkeypatch.setattr(ServerRun, "checkpoint", real_checkpoint)
    resumed = compose_config([*BASE, f"resume={run_dir}", "rounds=3"])
    with server_identity():
        assert run_protocol(LocalGrid(2), resumed) == run_dir
    assert rounds_logged(run_dir) == [1, 2, 3]
    assert load_checkpoint(run_dir)["round"] == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["bytes_up"] == pytest.approx(sum(row["bytes_up"] for row in rows))  # totals count round 2 once


def test_recorder_keeps_rows_up_to_the_checkpoint_round(tmp_path):
    recorder = RunRecorder(tmp_path)
    for round_number in (1, 2, 3):
        recorder.log_round({"round": round_number, "bytes_up": 10})
    resumed = RunRecorder(tmp_path, resume=True, resume_round=2)
    assert [row["round"] for row in resumed.rows] == [1, 2] and resumed.last_round == 2
    resumed.log_round({"round": 3, "bytes_up": 10})
    assert rounds_logged(tmp_path) == [1, 2, 3]
