"""Checks of what a site sends back: a reply is untrusted until these say otherwise.

A site can send anything in its Flower reply. Before these checks a missing record, a NaN
count or a weight of another shape stopped the server (``KeyError``, ``int(nan)``) or
poisoned what it averaged. Each protocol refuses a reply these find a problem in, records
the reason and goes on without it.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, Message, MetricRecord, RecordDict

from graftfl.core.wire import NUM_EXAMPLES, PARTITION_ID
from graftfl.strategies.wire_bytes import array_values


def claimed_whole_number(metrics: dict, key: str) -> int | None:
    """The whole number a reply's metrics claim under ``key``, or None when it is missing or not one (a reply is untrusted)."""
    try:
        value = metrics.get(key)
        return int(value) if value is not None and float(value).is_integer() else None
    except (TypeError, ValueError, OverflowError):
        return None


def claimed_partition(metrics: dict) -> int:
    """The partition id a reply claims, or -1 when it is missing or not an integer (a reply is untrusted)."""
    value = claimed_whole_number(metrics, PARTITION_ID)
    return -1 if value is None else value


def metrics_problem(content, counts: tuple[str, ...] = (), finite: tuple[str, ...] = (), present: tuple[str, ...] = ()) -> str | None:
    """Why a reply's metrics cannot be used, or None.

    ``content`` must hold a MetricRecord ``metrics`` of single numbers (no lists), in which
    every key of ``counts`` is a whole number >= 0, every key of ``finite`` a finite number
    and every key of ``present`` there. Other values may be NaN or infinite: an honest site
    whose training diverged reports a NaN loss, which the server records and never computes with.
    """
    metrics = content.metric_records.get("metrics")
    if metrics is None:
        return "no MetricRecord 'metrics'"
    lists = [key for key, value in metrics.items() if isinstance(value, list)]
    if lists:
        return f"metrics {lists} are lists, not numbers"
    missing = [key for key in (*counts, *finite, *present) if key not in metrics]
    if missing:
        return f"metrics {missing} missing"
    for key in finite:
        if not math.isfinite(metrics[key]):
            return f"metric '{key}' is {metrics[key]}"
    whole = {key: claimed_whole_number(metrics, key) for key in counts}
    bad = [key for key, value in whole.items() if value is None or value < 0]
    if bad:
        return f"{', '.join(bad)} must be whole numbers >= 0, got {[metrics[key] for key in bad]}"
    return None


def untrusted_values(array: Array) -> np.ndarray:
    """The values of a site's ``Array``; ``ValueError`` for anything that is not a readable array.

    Whatever numpy or Flower raises on a crafted payload (an empty one, a zip archive, a
    header that lies) is a refusal, never an exception that stops the server.
    """
    try:
        return array_values(array)
    except Exception as err:  # noqa: BLE001  (untrusted bytes: any failure to read them is the same refusal)
        raise ValueError(f"cannot be read as an array ({type(err).__name__})") from err


def array_problem(name: str, array: Array, shape: tuple[int, ...], dtype: str) -> str | None:
    """Why ``array`` is not a finite ``dtype`` array of ``shape``, or None.

    Its bytes are read, not only its declared shape and dtype: a site can declare one shape
    and send another, which the average would then try to broadcast.
    """
    try:
        values = untrusted_values(array)
    except ValueError as err:
        return f"{name} {err}"
    if (tuple(array.shape), array.dtype, values.shape, str(values.dtype)) != (tuple(shape), dtype, tuple(shape), dtype):
        return f"{name} is {values.dtype}{list(values.shape)} (declared {array.dtype}{list(array.shape)}), expected {dtype}{list(shape)}"
    if values.dtype.kind in "fc" and not np.isfinite(values).all():
        return f"{name} has non-finite values"
    return None


def averaged_by_flower(replies: list[Message]) -> list[Message]:
    """Checked replies as Flower's FedAvg may take them: their ``arrays`` and the metrics every one of them has.

    Flower's consistency check ends the run on any other record and on metric keys that
    differ between replies (a site adding or leaving out one metric).
    """
    shared = set.intersection(*(set(reply.content["metrics"].keys()) for reply in replies)) if replies else set()
    return [Message(RecordDict({"arrays": reply.content["arrays"],
                                "metrics": MetricRecord({key: value for key, value in reply.content["metrics"].items() if key in shared})}),
                    metadata=reply.metadata) for reply in replies]


def reply_problem(content: RecordDict, reference: dict[str, np.ndarray], max_examples: int | None = None,
                  max_update_norm: float | None = None) -> str | None:
    """Why a site's reply to a FedAvg round (``fedavg``, ``features``' federated autoencoder) must not enter the average, or ``None``.

    A malicious site can otherwise move the global model anywhere (1e30 or NaN weights) or
    dominate the weighted average by claiming a huge ``num-examples``.

    Parameters
    ----------
    content : RecordDict
        The reply's content: one ArrayRecord ``arrays`` and one MetricRecord ``metrics``.
    reference : dict of str to numpy.ndarray
        The global model the server sent this round: the reply must have exactly its keys,
        shapes and dtypes.
    max_examples : int, optional
        Largest ``num-examples`` accepted (``protocol.max_examples_per_site``); ``None`` trusts the count.
    max_update_norm : float, optional
        Largest L2 distance of the reply from ``reference`` (``protocol.max_update_norm``); ``None`` is unbounded.
    """
    if list(content.array_records) != ["arrays"] or list(content.metric_records) != ["metrics"]:
        return (f"expected one ArrayRecord 'arrays' and one MetricRecord 'metrics', got arrays {list(content.array_records)} "
                f"and metrics {list(content.metric_records)}")
    arrays = content["arrays"]
    if set(arrays.keys()) != set(reference):
        missing, extra = sorted(set(reference) - set(arrays.keys())), sorted(set(arrays.keys()) - set(reference))
        return f"array keys differ from the model sent (missing {missing}, unexpected {extra})"
    privacy = content.config_records.get("privacy")
    if privacy is not None and not isinstance(privacy.get("history"), str):
        return "ConfigRecord 'privacy' without a text 'history'"
    squared_distance = 0.0
    for key, expected in reference.items():
        problem = array_problem(f"array '{key}'", arrays[key], expected.shape, str(expected.dtype))
        if problem is not None:
            return problem
        if max_update_norm is not None:
            difference = untrusted_values(arrays[key]).astype(np.float64) - expected.astype(np.float64)
            squared_distance += float(np.sum(difference * difference))
    if max_update_norm is not None and not math.sqrt(squared_distance) <= max_update_norm:  # also catches overflow to inf
        return f"update L2 norm {math.sqrt(squared_distance):.4g} exceeds protocol.max_update_norm={max_update_norm}"
    problem = metrics_problem(content, counts=(PARTITION_ID,))  # a NaN partition id stopped the server; a NaN metric poisons the averaged metrics
    if problem is not None:
        return problem
    count = content["metrics"].get(NUM_EXAMPLES)
    if isinstance(count, bool) or not isinstance(count, (int, float)) or not float(count).is_integer() or count < 1:
        return f"{NUM_EXAMPLES} must be a positive integer, got {count!r}"
    if max_examples is not None and count > max_examples:
        return f"{NUM_EXAMPLES}={int(count)} exceeds protocol.max_examples_per_site={max_examples}"
    return None
