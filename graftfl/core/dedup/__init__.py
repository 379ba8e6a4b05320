"""Cross-site de-duplication of patients (and near-duplicate images) with pairwise ECDH PSI.

Transport-agnostic: :class:`DedupSite` is a site's side, :class:`DedupCoordinator` the
relaying server's, and every message between them is a mapping of str -> bytes/str/int
(a ConfigRecord in a Flower phase). docs/dedup.md says what it protects and what not.
"""

from .config import DedupConfig
from .coordinator import (
    STEPS,
    DedupCoordinator,
    Transcript,
    deliver_in_process,
    message_bytes,
    run_pairwise_dedup,
)
from .keys import (
    SALT_ENV_VAR,
    SALT_NODE_CONFIG_KEY,
    DedupKeyError,
    KeySpec,
    SaltedKeys,
    check_salt,
    record_keys,
    resolve_salt,
)
from .phash import BandScheme, hamming, image_phash, near_duplicate_pairs
from .site import DedupSite, PairResult
from .wire import DedupProtocolError

__all__ = [
    "SALT_ENV_VAR",
    "SALT_NODE_CONFIG_KEY",
    "STEPS",
    "BandScheme",
    "DedupConfig",
    "DedupCoordinator",
    "DedupKeyError",
    "DedupProtocolError",
    "DedupSite",
    "KeySpec",
    "PairResult",
    "SaltedKeys",
    "Transcript",
    "check_salt",
    "deliver_in_process",
    "hamming",
    "image_phash",
    "message_bytes",
    "near_duplicate_pairs",
    "record_keys",
    "resolve_salt",
    "run_pairwise_dedup",
]
