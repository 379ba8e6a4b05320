"""Loading ``.pt`` files a user may have been handed, without running code.

Checkpoints (``checkpoint.pt``), autoencoders and classifiers are written with
``torch.save`` and hold only tensors and plain containers (dict, list, tuple,
str, int, float, bool, bytes, None). A run directory can come from elsewhere
(``resume=``, ``graftfl serve --run``, ``graftfl predict``), and a full pickle
executes whatever callables it names while loading. So every such file is read
with PyTorch's weights-only unpickler, and anything else is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class UnsafeWeightsFile(ValueError):
    """A ``.pt`` file that holds more than tensors and plain containers (it could run code when loaded)."""


def load_weights_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with a clear error for anything else.

    Parameters
    ----------
    path : str or Path
        A file written by ``torch.save`` from tensors, dicts, lists, tuples and scalars.

    Raises
    ------
    UnsafeWeightsFile
        When unpickling would need any other class or callable (e.g. ``os.system``):
        the file is refused before any of it runs.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeWeightsFile(
            f"refusing to load {path}: it is not a plain weights file (only tensors, dicts, lists, tuples, str, "
            f"numbers, bytes and None are accepted; this one names other objects, which could run code): {first_line}"
        ) from err
