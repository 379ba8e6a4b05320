"""Config checks shared by the split protocols (``split``, ``ushaped``, ``semisup``)."""

from __future__ import annotations

from graftfl.config import eval_where
from graftfl.core.codec import FLOAT_WIRE_DTYPES
from graftfl.core.models import model_from_config
from graftfl.core.split import cut_points
from graftfl.strategies.utils import require_choice

HANDOFFS = ("relay", "local", "average")
TURN_ORDERS = ("round_robin", "random")
EVAL_WHERE = ("site", "server")
SPLIT_PLANES = ("direct", "grpc")


def serves_in_memory(cfg) -> bool:
    """Whether the data plane also serves the ServerApp's own process in memory (``graftfl.transport.direct``).

    True for the in-process simulation backend with ``sim.split_plane=direct`` (the default):
    its sites run in the ServerApp's process, and their frames then skip gRPC, not the checks.
    """
    sim = cfg.get("sim") or {}
    plane = str(sim.get("split_plane") or "direct")
    require_choice("sim.split_plane", plane, SPLIT_PLANES)
    return sim.get("backend") == "inprocess" and plane == "direct"


def stage_threads(cfg) -> int:
    """Torch threads of the server's stage: ``protocol.plane_threads``; null: 1, or a site's count in memory.

    Null gives the stage a site's count (``sim.client_threads``, else the whole part of
    ``client_resources.num_cpus``, at least 1) where it runs in the site's own thread: the
    in-process backend's in-memory data plane without TLS. The step then uses the unsplit model's
    thread count and the frame needs no thread switch. A gRPC handler thread computes with 1: with
    more, every handler thread gets an OpenMP pool of its own, and once a process holds more
    OpenMP threads than cores every torch call in it slows down (docs/split.md, ``plane_threads``).
    A seeded run gives the same weights on two backends when their stages use the same count.
    """
    threads = cfg.protocol.get("plane_threads")
    if threads is None:
        if not serves_in_memory(cfg) or (cfg.get("tls") or {}).get("server_cert"):
            return 1
        threads = (cfg.get("sim") or {}).get("client_threads")
    if threads is None:
        return max(1, int(float((cfg.get("client_resources") or {}).get("num_cpus") or 1)))
    if isinstance(threads, bool) or not float(threads).is_integer() or int(threads) < 1:
        name = "protocol.plane_threads" if cfg.protocol.get("plane_threads") is not None else "sim.client_threads"
        raise ValueError(f"{name} must be a whole number >= 1, got {threads!r} (it sets the torch threads of the split server's stage)")
    return int(threads)


def validate_split_config(cfg) -> None:
    """Checks shared by the split protocols (raise ValueError with the valid values)."""
    protocol = cfg.protocol
    require_choice("protocol.handoff", protocol.handoff, HANDOFFS)
    require_choice("protocol.turn_order", protocol.turn_order, TURN_ORDERS)
    require_choice("protocol.wire_dtype", protocol.wire_dtype, FLOAT_WIRE_DTYPES)
    if protocol.turn_batches is not None and int(protocol.turn_batches) < 1:
        raise ValueError("protocol.turn_batches must be >= 1 or null (one local epoch per turn)")
    if float(protocol.turn_timeout_s) <= 0 or float(protocol.max_frame_mb) <= 0:
        raise ValueError("protocol.turn_timeout_s and protocol.max_frame_mb must be > 0")
    if float(protocol.idle_timeout_s) <= 0 or int(protocol.max_pending_streams) < 1:
        raise ValueError("protocol.idle_timeout_s must be > 0 and protocol.max_pending_streams >= 1")
    stage_threads(cfg)
    tls = cfg.get("tls") or {}
    if bool(tls.get("server_cert")) != bool(tls.get("server_key")):
        # one without the other would silently serve the data plane in plaintext
        raise ValueError("tls.server_cert and tls.server_key must be set together (both: a TLS data plane; neither: plaintext); "
                         f"got only tls.{'server_cert' if tls.get('server_cert') else 'server_key'}")
    serves_in_memory(cfg)  # a wrong sim.split_plane names the valid ones before the run starts
    require_choice("privacy", cfg.privacy.name, ("none", "dpsgd"))  # dpsgd: on the site's parts (core/split_private.py)
    if cfg.resume:
        raise ValueError(f"protocol={protocol.name} cannot resume a run yet (resume=null)")
    require_choice("eval.where", eval_where(cfg), EVAL_WHERE)
    if eval_where(cfg) == "site" and not 0 < float(cfg.eval.site_fraction) < 1:
        raise ValueError(f"eval.site_fraction must be in (0, 1) (the share of each site's partition held out for evaluation), got {cfg.eval.site_fraction}")
    if eval_where(cfg) == "server" and protocol.handoff == "relay" and not cfg.eval.get("server_reveals_bottom", False):
        raise ValueError(
            "eval.where=server with protocol.handoff=relay streams the server's own test set through the clients' bottom, "
            "which lets the server fit the bottom the relay encrypts; use eval.where=site, or acknowledge with "
            "eval.server_reveals_bottom=true (each site must also allow it: node config allow-server-eval=true)"
        )
    # stage names do not depend on the input size: a 3x32x32 stand-in is enough to check the cut
    cut_points(model_from_config(cfg, (3, 32, 32), 10), protocol.cut_stage, protocol.get("head_stages"))
