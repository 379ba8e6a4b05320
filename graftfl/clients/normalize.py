"""The ``normalize`` pre-training phase, site side: per-channel moments out, pooled statistics in.

``query.normalize`` step ``moments``: the count, sum and sum of squares per channel of this
site's training rows (raw values in [0, 1], after any dedup drops; held-out rows excluded),
never a pixel. For a registry dataset those rows are the site's own partition. Step ``install``: keep the server's mean and std in
``context.state[phase_state_key("normalize")]`` for the site loader
(:func:`graftfl.clients.site_data.standardization_of`).
"""

from __future__ import annotations

import json
import math

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from graftfl.clients.site_data import (
    MEAN,
    NORMALIZE_PHASE,
    STD,
    site_channels,
    site_label,
    training_pixels,
)
from graftfl.clients.utils import config_of, partition_id_of
from graftfl.core.site_stats import channel_moments
from graftfl.protocols import ClientPhase, phase_state_key


def _channel_values(text: str, channels: int, what: str, context: Context) -> list[float]:
    values = [float(v) for v in json.loads(text)]
    if len(values) != channels or not all(math.isfinite(v) for v in values):
        raise ValueError(f"site {site_label(context)}: the server's {what} must be {channels} finite values, got {values}")
    return values


def query(message: Message, context: Context) -> Message:
    """Answer ``query.normalize`` (steps ``moments`` and ``install``)."""
    cfg = config_of(message)
    fields = message.content["config"]
    step = str(fields.get("step", ""))
    partition_id, _ = partition_id_of(context)
    if step == "moments":
        moments = channel_moments(training_pixels(cfg, context))
        metrics = {**moments.as_dict(), "partition-id": partition_id}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
    if step == "install":
        channels = site_channels(cfg, context)
        mean = _channel_values(str(fields["mean"]), channels, "mean", context)
        std = _channel_values(str(fields["std"]), channels, "std", context)
        if min(std) <= 0:
            raise ValueError(f"site {site_label(context)}: the server's std must be > 0, got {std}")
        context.state[phase_state_key(NORMALIZE_PHASE)] = ConfigRecord({MEAN: json.dumps(mean), STD: json.dumps(std)})
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id})}), reply_to=message)
    raise ValueError(f"query.normalize: unknown step '{step}' (moments | install)")


CLIENT_PHASE = ClientPhase(name=NORMALIZE_PHASE, query=query)
