"""Checks of the features sites' replies before anything touches the store or the classifier.

Sites are not trusted. The server names each site after its Flower node id
(:func:`client_id_of`) and tells it the name; the store keys rows by that name, never
by what a reply claims. An upload must carry exactly the names and row offsets the
server asked for, and service-mode scores must have the right shapes and totals;
anything else raises :class:`~graftfl.strategies.features.store.InvalidChunk` or is
reported by :func:`score_problem`.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from graftfl.strategies.features.store import InvalidChunk
from graftfl.strategies.replies import untrusted_values

SCORE_FIELDS = ("correct_by_class", "count_by_class", "error_sum_by_class", "error_count_by_class")


def client_id_of(node: int) -> str:
    """The ``clientID`` the server gives the site on Flower node ``node`` (store key, acknowledgements)."""
    return f"node-{node}"


def upload_id_of(chunk: int) -> str:
    """The ``upload_id`` the server asks for (with ``client_id`` and the row, the store's unique key)."""
    return f"chunk-{chunk:05d}"



def reply_config(reply: Message, name: str) -> ConfigRecord:
    """The reply's ConfigRecord ``name``; ``InvalidChunk`` when it has none."""
    record = reply.content[name] if name in reply.content else None
    if not isinstance(record, ConfigRecord):
        raise InvalidChunk(f"reply carries no '{name}' config record")
    return record


def require_claims(record: ConfigRecord, expected: dict) -> None:
    """Raise ``InvalidChunk`` unless ``record`` holds exactly the ``expected`` values (names, offsets)."""
    for key, value in expected.items():
        claimed = record.get(key)
        if claimed != value or type(claimed) is not type(value):
            raise InvalidChunk(f"claims {key}={claimed!r}, the server expects {value!r}")


def reply_arrays(reply: Message, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named arrays of the reply's ``arrays`` record as numpy; ``InvalidChunk`` when missing or undecodable."""
    record = reply.content["arrays"] if "arrays" in reply.content else None
    if not isinstance(record, ArrayRecord):
        raise InvalidChunk("reply carries no 'arrays' record")
    missing = [name for name in names if name not in record]
    if missing:
        raise InvalidChunk(f"reply lacks arrays {missing}")
    try:
        return {name: untrusted_values(record[name]).copy() for name in names}  # a writable copy, as Flower's .numpy() gave
    except (ValueError, TypeError) as err:
        raise InvalidChunk(f"undecodable arrays: {err}") from err


def score_problem(reply: Message, num_classes: int, answered: int) -> str | None:
    """Why a site's service scores cannot be pooled, or None.

    Each of ``SCORE_FIELDS`` must be ``num_classes`` finite non-negative numbers, no
    class may have more correct answers than images, and the images counted must be
    the ``answered`` predictions the server sent to that site.
    """
    metrics = reply.content["metrics"] if "metrics" in reply.content else None
    if not isinstance(metrics, MetricRecord):
        return "reply carries no 'metrics' record"
    values = {}
    for key in SCORE_FIELDS:
        try:
            values[key] = np.asarray(metrics[key], dtype=np.float64) if key in metrics else None
        except (TypeError, ValueError):
            values[key] = None
        if values[key] is None or values[key].shape != (num_classes,):
            return f"{key} is not a list of {num_classes} numbers"
        if not np.isfinite(values[key]).all() or (values[key] < 0).any():
            return f"{key} holds negative or non-finite values"
    if (values["correct_by_class"] > values["count_by_class"]).any():
        return "a class has more correct answers than test images"
    if values["count_by_class"].sum() != answered:
        return f"scored {int(values['count_by_class'].sum())} test images, the server answered {answered}"
    return None


def figure_of(reply: Message) -> str:
    """The figure path a site reports ('' when none)."""
    files = reply.content["files"] if "files" in reply.content else None
    figure = files.get("figure", "") if isinstance(files, ConfigRecord) else ""
    return figure if isinstance(figure, str) else ""
