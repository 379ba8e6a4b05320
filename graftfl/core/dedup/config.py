"""Settings of the de-duplication phase that every site must share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .keys import KeySpec
from .phash import BandScheme

MAX_FPR = 1e-9
DATA_STRUCTURES = ("raw", "gcs")
IMAGE_MODES = ("none", "phash")


@dataclass(frozen=True)
class DedupConfig:
    """Settings every site must share (the server may send them; the salt never comes from it).

    Parameters
    ----------
    key
        Manifest column(s) of the identifier key, ``"patient_id"`` or ``"name|birth_date|sex"``.
    nfkc, collapse_whitespace
        Normalization applied to each key part before it is trimmed and case-folded.
    images
        ``"none"`` or ``"phash"`` (also match near-duplicate images through pHash bands).
    image_bands, image_max_distance
        The band scheme (:class:`~graftfl.core.dedup.phash.BandScheme`).
    data_structure
        ``"raw"`` (exact, larger setup) or ``"gcs"`` (Golomb-compressed, false-positive rate ``fpr``).
    fpr
        False-positive rate of the GCS setup for a full request; refused above 1e-9.
    max_peer_items
        Largest request a site serves (and the size its GCS setup is built for).
    max_message_bytes
        Largest envelope a site opens.
    """

    key: str = "patient_id"
    nfkc: bool = True
    collapse_whitespace: bool = True
    images: str = "none"
    image_bands: int = 8
    image_max_distance: int = 3
    data_structure: str = "raw"
    fpr: float = 1e-9
    max_peer_items: int = 10_000_000
    max_message_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.images not in IMAGE_MODES:
            raise ValueError(f"dedup.images={self.images!r}; valid: {IMAGE_MODES}")
        if self.data_structure not in DATA_STRUCTURES:
            raise ValueError(f"dedup.data_structure={self.data_structure!r}; valid: {DATA_STRUCTURES}")
        if not 0.0 < float(self.fpr) <= MAX_FPR:
            raise ValueError(f"dedup.fpr={self.fpr} must be in (0, {MAX_FPR}]: a false positive drops a unique patient")
        if not 1 <= self.max_peer_items <= 100_000_000:
            raise ValueError(f"dedup.max_peer_items={self.max_peer_items} must be in [1, 100000000]")
        if self.max_message_bytes < 1024:
            raise ValueError(f"dedup.max_message_bytes={self.max_message_bytes} must be at least 1024")
        self.key_spec()  # validates the column list
        if self.images == "phash":
            self.band_scheme()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DedupConfig:
        """Build from a config mapping (e.g. the ``dedup`` group); unknown keys are an error."""
        names = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown dedup setting(s) {unknown}; valid: {sorted(names)}")
        return cls(**dict(values))

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> DedupConfig:
        """From the run config's ``dedup`` group (``conf/dedup/psi.yaml``), whose selector ``name`` is not a setting."""
        return cls.from_mapping({key: value for key, value in dict(group).items() if key != "name"})

    def key_spec(self) -> KeySpec:
        """The key columns and text normalisation as a :class:`KeySpec`."""
        return KeySpec(columns=self.key, nfkc=self.nfkc, collapse_whitespace=self.collapse_whitespace)

    def band_scheme(self) -> BandScheme:
        """The perceptual-hash banding as a :class:`BandScheme`."""
        return BandScheme(bands=self.image_bands, max_distance=self.image_max_distance)
