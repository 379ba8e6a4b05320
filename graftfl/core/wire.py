"""The vocabulary on the wire: names of Flower message records and of their fields, in one place.

Flower's own keys are kebab-case (``num-examples``, ``server-round``); graftfl's
follow them. Server and client import the names from here, so a key cannot be
spelt two ways. Plain strings only: no Flower, no torch (``core`` knows neither
Flower nor the transport).

Not yet moved here: the ``protocol=features`` upload fields (``client_id``,
``upload_id``, ``first_row``, ``num_chunks``, ``chunk``, ``chunk_size``) and
the metric names that become ``metrics.jsonl`` columns (``train_loss``,
``client_flops``); the features package owns the former until it is split.
"""

from __future__ import annotations

# -- records of a message's RecordDict
CONFIG_RECORD = "config"  # ConfigRecord: the resolved run config + per-message fields
ARRAYS_RECORD = "arrays"  # ArrayRecord: model weights (Flower's strategies use the same name)
METRICS_RECORD = "metrics"  # MetricRecord: what a site reports
PRIVACY_RECORD = "privacy"  # ConfigRecord: a site's accountant history, for server checkpoints
HANDOFF_RECORD = "handoff"  # split: the bottom weights passed from turn to turn
DEDUP_RECORD = "dedup"  # ConfigRecord: one step of the dedup phase (graftfl.core.dedup message fields), both ways

# -- what a phase leaves in a site's context.state[phase_state_key(name)] (never sent)
DROPPED_ROWS = "dropped-rows"  # dedup: JSON list of the site's row indices (load order) to leave out

# -- fields of the config record (server -> site)
CONFIG_KEY = "graftfl-config"  # the resolved run config as JSON (the server is the source of truth)
SERVER_ROUND = "server-round"  # Flower's own key
SITE_TURN_KEY = "site-turn"  # a split site's count of its completed turns, this one included (audit: which batches)
ROUND_OFFSET = "round-offset"  # rounds done before a resume (Flower counts from 1 again)
PRIVACY_HISTORIES = "privacy-histories"  # JSON {partition id: accountant history} sent on resume
DATA_PLANE_ADDRESS = "data-plane-address"  # split: where the turn's gRPC stream goes
DATA_PLANE_TOKEN = "data-plane-token"  # split: the one-time token of the turn

# -- fields of the metrics record (site -> server)
PARTITION_ID = "partition-id"  # also the node-config key (Flower's convention)
NUM_EXAMPLES = "num-examples"  # Flower's FedAvg weighs by it

# -- node config (local facts of a SuperNode, never sent by the server)
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_DATA_ROOT = "data-root"
NODE_DEVICE = "device"
NODE_CA_CERT = "ca-cert"
NODE_SPLIT_KEY = "split-key"

MEBIBYTE = 1 << 20


def max_frame_bytes(cfg) -> int:
    """The data plane's frame size limit in bytes, from the run config's ``protocol.max_frame_mb``.

    The transport takes the byte count (``DataPlaneServer(max_frame_bytes=...)``),
    never the config: this is where the one becomes the other.
    """
    return int(float(cfg.protocol.max_frame_mb) * MEBIBYTE)


def max_frame_rows(cfg) -> int:
    """The most rows one data-plane frame may hold: a training batch or an evaluation batch, the larger."""
    return max(int(cfg.train.batch_size), int(cfg.eval.batch_size))
