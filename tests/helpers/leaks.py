"""What a dedup transcript must never carry: a patient identifier in any form the sites could derive from it."""

from __future__ import annotations

import hashlib

from graftfl.core.dedup import KeySpec, SaltedKeys


def digests(value: str) -> list[bytes]:
    """Unsalted hashes of ``value`` (sha256, md5, sha1, sha512) as raw bytes and as lower/upper hex."""
    out = []
    for algorithm in ("sha256", "md5", "sha1", "sha512"):
        digest = hashlib.new(algorithm, value.encode()).digest()
        out += [digest, digest.hex().encode(), digest.hex().upper().encode()]
    return out


def identifier_needles(patient: str, spec: KeySpec, salted: SaltedKeys) -> list[bytes]:
    """``patient`` raw, lower-cased and normalized, their unsalted hashes, and the salted PSI element before blinding."""
    normalized = spec.key({"patient_id": patient})
    element = salted.element("patient", spec.domain, normalized)
    needles = [patient.encode(), patient.lower().encode(), normalized.encode()]
    needles += digests(patient) + digests(patient.lower()) + digests(normalized)
    return needles + [element.encode(), bytes.fromhex(element)]  # even the salted element must not travel
