"""The classifier the features server trains and serves, and its online retrain loop.

- :class:`ServedClassifier` holds the model that answers predictions; a retrain
  replaces it with one reference assignment under a lock, so a prediction uses
  either the old or the new model, never a half-updated one.
- :class:`OnlineTrainer` retrains from the feature store in a background thread
  every ``retrain_every`` new records while predictions go on.

The HTTP prediction service that serves a finished run's classifier is
:mod:`graftfl.commands.feature_service` (``graftfl serve``).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from graftfl.core.autoencoder import train_classifier
from graftfl.strategies.features.store import FeatureStore

CLASSIFIER_FILE = "classifier.pt"


class ServedClassifier:
    """The classifier that answers predictions, replaceable atomically.

    Parameters
    ----------
    model : torch.nn.Module or None
        The first model (``None`` until the first training).
    version : int
        Bumped by every :meth:`swap`.
    """

    def __init__(self, model: torch.nn.Module | None = None, version: int = 0):
        self._lock = threading.Lock()
        self._current = (model.eval() if model is not None else None, version)

    @property
    def version(self) -> int:
        """Version of the served model (0 before the first training)."""
        return self._current[1]

    @property
    def model(self) -> torch.nn.Module | None:
        """The served model, or None before the first training."""
        return self._current[0]

    @property
    def ready(self) -> bool:
        """Whether a model is being served."""
        return self._current[0] is not None

    def swap(self, model: torch.nn.Module) -> int:
        """Serve ``model`` from now on; returns its version."""
        model.eval()
        with self._lock:
            self._current = (model, self._current[1] + 1)
            return self._current[1]

    @torch.no_grad()
    def predict(self, latents: np.ndarray | torch.Tensor) -> np.ndarray:
        """Predicted class of every row of ``latents``, all by the same model version."""
        model, _ = self._current  # one read: the whole batch uses one model
        if model is None:
            raise RuntimeError("no classifier has been trained yet")
        batch = torch.as_tensor(np.asarray(latents, dtype=np.float32))
        return model(batch).argmax(dim=1).numpy()


class OnlineTrainer(threading.Thread):
    """Retrain the classifier from the store every ``retrain_every`` new records.

    Parameters
    ----------
    store : FeatureStore
        Where uploads land.
    served : ServedClassifier
        Swapped after each retrain.
    retrain_every : int
        New learning-mode records that trigger a retrain.
    num_classes : int
        Classifier outputs.
    train_kwargs : dict
        Passed to :func:`graftfl.core.autoencoder.train_classifier`.
    poll_s : float
        How often the store is counted.
    """

    def __init__(self, store: FeatureStore, served: ServedClassifier, retrain_every: int, num_classes: int, train_kwargs: dict, poll_s: float = 0.2):
        super().__init__(name="graftfl-online-retrain", daemon=True)
        self.store, self.served = store, served
        self.retrain_every, self.num_classes, self.train_kwargs, self.poll_s = int(retrain_every), num_classes, train_kwargs, poll_s
        self.trained_on = 0
        self.rows: list[dict] = []  # one per retrain, drained by the strategy into metrics.jsonl
        self._rows_lock = threading.Lock()
        self._stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        """Retrain whenever enough new records arrived, until stopped; an error is kept for :meth:`finish`."""
        try:
            while not self._stop_event.wait(self.poll_s):
                if self.store.count() - self.trained_on >= self.retrain_every:
                    self.retrain()
        except BaseException as err:  # surfaced by finish(); the uploads go on meanwhile
            self.error = err

    def retrain(self) -> dict:
        """Train a classifier on everything in the store and serve it; returns the metrics row of the retrain."""
        started = time.monotonic()
        x, y = self.store.load()
        model, metrics = train_classifier(torch.from_numpy(x), torch.from_numpy(y), self.num_classes, **self.train_kwargs)
        version = self.served.swap(model)
        self.trained_on = len(y)
        row = {"records": len(y), "classifier_version": version, "retrain_s": time.monotonic() - started, **metrics}
        with self._rows_lock:
            self.rows.append(row)
        return row

    def drain_rows(self) -> list[dict]:
        """The metrics rows of the retrains since the last call (each row is returned once)."""
        with self._rows_lock:
            rows, self.rows = self.rows, []
        return rows

    def finish(self) -> None:
        """Stop the loop and retrain once more if records arrived since the last retrain."""
        self._stop_event.set()
        self.join()
        if self.error is not None:
            raise RuntimeError(f"online retraining failed: {self.error}") from self.error
        if self.store.count() > self.trained_on or not self.served.ready:
            self.retrain()
