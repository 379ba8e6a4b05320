"""The server's recording of what it receives (``audit.record=true``), for ``graftfl audit``.

The recorder lives on the server side (strategies, split server stage), so a simulated and a
deployed run record the same things. It stores plain tensors with ``torch.save`` (read back
with the weights-only unpickler) in ``runs/<run-id>/audit/`` and keeps ``index.json`` beside
them: one entry per file, what it holds, its bytes, and what was dropped once the
``audit.max_mb`` cap was reached. Recording only copies what arrives; it never changes a
tensor a protocol computes with, so a recorded run computes the same weights.

What is recorded, per protocol:

- ``split`` / ``semisup``: the cut activations and the labels of every training frame, per turn
  (round, partition);
- ``ushaped``: the activations of every ``forward`` frame and the gradients of the middle's
  outputs of every ``backward`` frame, per turn;
- ``dssgd``: every upload (indices, values) with the global parameters the site downloaded;
- ``fedavg``: every site's update (its weights minus the global weights it received);
- ``features``: nothing is copied: the feature store already holds the uploaded latents and
  labels, and the index points at it;
- every protocol: the final model or server part is the run's ``checkpoint.pt``.

No Flower here: the hooks in the strategies hand plain tensors over.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

AUDIT_DIR = "audit"
INDEX_FILE = "index.json"
# frame kinds of a training turn and the tensors of each that the server receives
TRAIN_FRAME_TENSORS = {"train": ("activations", "labels"), "forward": ("activations",), "backward": ("gradient",)}


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors.values()))


class AuditRecorder:
    """Records what the server receives into ``<run_dir>/audit/``, capped at ``max_bytes``.

    Parameters
    ----------
    run_dir : Path or None
        The run directory; None makes a recorder that records nothing (``audit.record=false``).
    max_bytes : int
        Cap on the recorded tensors' bytes; later entries (or frames) are dropped and counted.
    """

    def __init__(self, run_dir: Path | None, max_bytes: int = 64 * 2**20):
        self.directory = None if run_dir is None else Path(run_dir) / AUDIT_DIR
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._turns: dict[int, dict[str, list]] = {}
        self._downloads: dict[int, torch.Tensor] = {}
        self.index: dict[str, Any] = {"max_bytes": self.max_bytes, "bytes": 0, "truncated": False, "dropped": {}, "entries": [], "pointers": {}}
        if self.directory is not None:
            existing = self.directory / INDEX_FILE
            if existing.exists():  # a resumed run appends
                self.index.update(json.loads(existing.read_text()))
                self.index["max_bytes"] = self.max_bytes
            self.directory.mkdir(parents=True, exist_ok=True)
            self.index["pointers"]["final_model"] = "checkpoint.pt"  # the run's own checkpoint: the global model or server part
            self._write_index()

    @classmethod
    def from_config(cls, cfg, run_dir: Path) -> "AuditRecorder":
        """A recorder for ``cfg.audit`` (``record``, ``max_mb``); a no-op one when recording is off."""
        audit = cfg.get("audit") or {}
        if not bool(audit.get("record", False)):
            return cls(None)
        max_mb = float(audit.get("max_mb", 64))
        if max_mb <= 0:
            raise ValueError(f"audit.max_mb must be > 0, got {max_mb}")
        return cls(run_dir, int(max_mb * 2**20))

    @property
    def enabled(self) -> bool:
        """Whether this recorder writes anything."""
        return self.directory is not None

    # ----------------------------------------------------------------- storage
    def _room_for(self, nbytes: int, what: str) -> bool:
        """Reserve ``nbytes`` under the cap, or count ``what`` as dropped (caller holds the lock)."""
        if self.index["bytes"] + nbytes > self.max_bytes:
            if not self.index["truncated"]:
                logger.warning("audit.record: the cap of audit.max_mb (%d bytes) is reached; later %s are dropped", self.max_bytes, what)
            self.index["truncated"] = True
            dropped = self.index["dropped"].setdefault(what, {"count": 0, "bytes": 0})
            dropped["count"] += 1
            dropped["bytes"] += int(nbytes)
            return False
        self.index["bytes"] += int(nbytes)
        return True

    def _save(self, file_name: str, tensors: dict[str, torch.Tensor], **fields) -> None:
        torch.save({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, self.directory / file_name)
        self.index["entries"].append({"file": file_name, "bytes": _nbytes(tensors), **fields})
        self._write_index()

    def _write_index(self) -> None:
        tmp = self.directory / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(self.index, indent=1))
        tmp.replace(self.directory / INDEX_FILE)

    # ------------------------------------------------------- split protocols
    def watch_stage(self, stage, handoff=None) -> None:
        """Record the training frames a split server stage handles (its ``handle`` is wrapped on this instance).

        Frames are kept per turn (keyed by the turn's state dict) until :meth:`end_turn`
        names the turn's round and partition. ``handoff`` (the runner's hand-off state): with
        ``mode == "average"`` the server receives each site's client parts after its turn,
        and :meth:`end_turn` records them too (what tier (a) of the inversion needs).
        """
        if not self.enabled:
            return
        self._handoff = handoff
        handle = stage.handle

        def recording_handle(kind: str, tensors: dict, state: dict, **options):
            if kind in TRAIN_FRAME_TENSORS:  # copied before the stage touches them
                self._buffer(state, kind, {name: tensors[name].detach().clone() for name in TRAIN_FRAME_TENSORS[kind] if name in tensors})
            return handle(kind, tensors, state, **options)  # options: the stage's own (defer_update)

        stage.handle = recording_handle

    def _buffer(self, state: dict, kind: str, tensors: dict[str, torch.Tensor]) -> None:
        with self._lock:
            frames = self._turns.setdefault(id(state), {"frames": [], "counts": {}})
            position = frames["counts"].get(kind, 0)
            frames["counts"][kind] = position + 1
            if self._room_for(_nbytes(tensors), f"{kind} frames"):
                frames["frames"].append((kind, position, tensors))

    def end_turn(self, state: dict, round_number: int, partition: int, site_turn: int | None = None) -> None:
        """Write the frames of the turn whose state is ``state``: one file per turn, frames concatenated by kind.

        Frames of turns that never reached here (failed turns) are discarded. ``site_turn``: the
        site's count of its completed turns, this one included (which of its turns' batches these are).
        """
        if not self.enabled:
            return
        with self._lock:
            turn = self._turns.pop(id(state), None)
            for failed in self._turns.values():  # a failed turn's frames: not attributable to a partition, their room freed
                self.index["bytes"] -= sum(_nbytes(tensors) for _, _, tensors in failed["frames"])
            self._turns.clear()
            if turn is None or not turn["frames"]:
                return
            tensors: dict[str, torch.Tensor] = {}
            for kind in TRAIN_FRAME_TENSORS:
                frames = [(position, t) for k, position, t in turn["frames"] if k == kind]
                if not frames:
                    continue
                for name in TRAIN_FRAME_TENSORS[kind]:
                    tensors[name] = torch.cat([t[name] for _, t in frames])
                tensors[f"{kind}_batch"] = torch.tensor([position for position, _ in frames])  # frame index of its kind in the turn
                tensors[f"{kind}_rows"] = torch.tensor([len(next(iter(t.values()))) for _, t in frames])
            self._save(f"split_r{round_number}_p{partition}.pt", tensors, kind="split_turn", round=int(round_number), partition=int(partition),
                       frames={k: int(v) for k, v in turn["counts"].items()}, **({} if site_turn is None else {"site_turn": int(site_turn)}))
            handoff = getattr(self, "_handoff", None)
            if getattr(handoff, "mode", None) == "average" and handoff.round_weights:  # the parts this site just handed back
                parts = {key: torch.as_tensor(value) for key, value in handoff.round_weights[-1][1].to_torch_state_dict().items()}
                if self._room_for(_nbytes(parts), "models"):
                    self._save(f"parts_r{round_number}_p{partition}.pt", parts, kind="client_parts", round=int(round_number), partition=int(partition))

    # ------------------------------------------------------------------ dssgd
    def dssgd_download(self, node: int, params: torch.Tensor) -> None:
        """Keep the global parameters ``node`` downloads (the point its upload is measured from)."""
        if self.enabled:
            with self._lock:
                self._downloads[int(node)] = params.detach().clone()

    def dssgd_upload(self, round_number: int, node: int, partition: int, indices: torch.Tensor | None, values: torch.Tensor) -> None:
        """Record one received upload with the parameters its site downloaded."""
        if not self.enabled:
            return
        with self._lock:
            params = self._downloads.get(int(node))
            tensors = {"values": values}
            if indices is not None:
                tensors["indices"] = indices
            if params is not None:
                tensors["params"] = params
            if self._room_for(_nbytes(tensors), "dssgd uploads"):
                self._save(f"dssgd_r{round_number}_p{partition}.pt", tensors, kind="dssgd_upload", round=int(round_number), partition=int(partition))

    # ----------------------------------------------------------------- fedavg
    def fedavg_update(self, round_number: int, partition: int, weights: dict, reference: dict) -> None:
        """Record one site's update: its returned weights minus the global ``reference`` it received."""
        if not self.enabled:
            return
        update = {key: torch.as_tensor(weights[key]) - torch.as_tensor(reference[key]) for key in reference
                  if torch.as_tensor(reference[key]).is_floating_point()}
        with self._lock:
            if self._room_for(_nbytes(update), "fedavg updates"):
                self._save(f"fedavg_r{round_number}_p{partition}.pt", update, kind="fedavg_update", round=int(round_number), partition=int(partition))

    # ------------------------------------------------------------------ other
    def keep_model(self, name: str, state_dict: dict) -> None:
        """Record a model the server holds but does not checkpoint (e.g. the features autoencoder of federated/public)."""
        if not self.enabled:
            return
        with self._lock:
            tensors = {key: torch.as_tensor(value) for key, value in state_dict.items()}
            if self._room_for(_nbytes(tensors), "models"):
                self._save(f"model_{name}.pt", tensors, kind="model", name=name)

    def point_to(self, name: str, path: Path | str) -> None:
        """Name a file the run already writes (e.g. the feature store) instead of copying it."""
        if self.enabled:
            with self._lock:
                self.index["pointers"][name] = str(path)
                self._write_index()


def load_index(run_dir: Path | str) -> dict | None:
    """The recording index of a run, or None when the run recorded nothing."""
    path = Path(run_dir) / AUDIT_DIR / INDEX_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def load_entry(run_dir: Path | str, entry: dict) -> dict[str, torch.Tensor]:
    """The tensors of one index entry (weights-only unpickling: a run directory may come from elsewhere)."""
    return torch.load(Path(run_dir) / AUDIT_DIR / entry["file"], map_location="cpu", weights_only=True)
