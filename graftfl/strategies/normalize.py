"""The ``normalize`` pre-training phase, server side: pooled per-channel statistics without pooling pixels.

Step ``moments``: every site sends the count, sum and sum of squares of each channel of its
training images (:mod:`graftfl.core.site_stats`); the server validates each site's figures
(:meth:`ChannelMoments.from_dict`: values pixels in [0, 1] cannot produce are refused) and
combines them into the mean and standard deviation pooling would give.
Step ``install``: every site that sent valid moments receives the mean and std and keeps them
in ``context.state[phase_state_key("normalize")]``; the site loader standardizes with them in
every later message. A site that fails either step is reported as that site's failure (in the
phase summary) and takes no part in the mean; its later messages fail for want of statistics.
For a registry dataset (simulation) the sites' rows are their partitions, and the server keeps
the result too (:meth:`ServerRun.install_statistics`) to standardize its own test set with it.
"""

from __future__ import annotations

import json
import logging

from flwr.app import Message, RecordDict

from graftfl.config import normalization_of
from graftfl.core.site_stats import ChannelMoments, MomentsError, combine_moments
from graftfl.protocols import ServerPhase

PHASE = "normalize"
STEP, MOMENTS, INSTALL = "step", "moments", "install"
logger = logging.getLogger(__name__)


def _messages(run, node_ids: list[int], **fields) -> list[Message]:
    return [Message(RecordDict({"config": run.config_record(**fields)}), dst_node_id=node, message_type=f"query.{PHASE}") for node in node_ids]


def _failure(reply: Message) -> str:
    return f"node {reply.metadata.src_node_id}: {reply.error.reason}"


def run(grid, run, node_ids: list[int]) -> dict:
    """Collect the sites' moments, combine them, send every valid site the mean and std; summary fields."""
    channels = int(run.input_shape[0])
    replies = list(grid.send_and_receive(_messages(run, node_ids, **{STEP: MOMENTS}), timeout=run.cfg.timeout_s))
    failures, accepted, counts = [], [], {}
    for reply in replies:
        if reply.has_error():
            failures.append(_failure(reply))
            continue
        node = reply.metadata.src_node_id
        try:
            metrics = reply.content["metrics"]
            moments = ChannelMoments.from_dict({k: metrics[k] for k in ("count", "sum", "sum_sq") if k in metrics}, channels, f"node {node}")
        except (MomentsError, KeyError) as err:
            failures.append(f"node {node}: {err}")
            continue
        accepted.append((node, moments))
        counts[str(node)] = moments.count
    missing = len(node_ids) - len(replies)
    if missing > 0:
        failures.append(f"{missing} site(s) did not reply within timeout_s")
    if not accepted:
        raise RuntimeError(f"normalize phase: no site sent valid moments ({'; '.join(failures)})")
    mean, std = combine_moments(moments for _, moments in accepted)
    run.install_statistics(mean, std)  # a registry dataset's server-held test set is standardized with them
    installs = _messages(run, [node for node, _ in accepted], **{STEP: INSTALL, "mean": json.dumps(mean), "std": json.dumps(std)})
    for reply in grid.send_and_receive(installs, timeout=run.cfg.timeout_s):
        if reply.has_error():
            failures.append(_failure(reply))
    if failures:
        logger.warning("[normalize] %d site failure(s): %s", len(failures), "; ".join(failures))
    logger.info("[normalize] mean %s std %s from %d sites", [round(v, 4) for v in mean], [round(v, 4) for v in std], len(accepted))
    return {"mean": mean, "std": std, "sites": len(accepted), "pixels_per_channel": counts, "failures": failures}


def validate_config(cfg) -> None:
    """The phase computes the statistics of ``dataset.normalization=federated`` (site or registry data)."""
    if normalization_of(cfg) != "federated":
        raise ValueError("the normalize phase runs with dataset.normalization=federated "
                         "(it is added by itself then; do not list it in phases)")


SERVER_PHASE = ServerPhase(name=PHASE, run=run, validate_config=validate_config)
