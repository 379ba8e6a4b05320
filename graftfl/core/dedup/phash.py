"""Perceptual hashes of images and their band elements for near-duplicate PSI.

Two images whose 64-bit pHashes differ in at most ``max_distance`` bits agree exactly on
at least ``bands - max_distance`` of ``bands`` disjoint bit bands (pigeonhole). Each image
therefore contributes one element per *combination* of ``bands - max_distance`` bands (the
band indices and their values): a pair within the distance shares at least one element
exactly, so exact-match PSI finds it.

With ``bands = max_distance + 1`` this is plain banding (four 16-bit bands for distance 3):
one band of 16 bits must match, which random hashes do with probability ~4 * 2**-16 per
image pair -- thousands of false pairs between sites of a few thousand images. Combinations
of several bands keep the guarantee while requiring many more matching bits (8 bands of 8
bits, distance 3: 56 elements per image, each covering 40 bits). The band match *is* the
criterion: the PSI client learns that one of its images shares an element with some image
of the other site, not which one, so the full Hamming distance is not confirmed (that would
need a secure comparison beyond PSI). docs/dedup.md gives the false-positive figures.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from math import comb

import numpy as np

HASH_BITS = 64
MAX_ELEMENTS_PER_IMAGE = 256


def image_phash(image: np.ndarray) -> int:
    """64-bit pHash (``imagehash.phash``) of a 2-D grayscale or H x W x C image, as an int.

    Float images are taken to lie in [0, 1]; integer images in [0, 255]. A C x H x W
    array with 1 or 3 channels first is transposed to channels-last.
    """
    import imagehash
    from PIL import Image

    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"image_phash takes an H x W or H x W x C image; got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        array = np.clip(np.nan_to_num(array) * 255.0, 0, 255)
    array = array.astype(np.uint8)
    bits = imagehash.phash(Image.fromarray(array).convert("L"), hash_size=8).hash.flatten()
    return int("".join("1" if bit else "0" for bit in bits), 2)


def hamming(a: int, b: int) -> int:
    """Number of differing bits of two hashes."""
    return (a ^ b).bit_count()


@dataclass(frozen=True)
class BandScheme:
    """Split 64-bit hashes into ``bands`` bit bands; match any ``bands - max_distance`` of them.

    Parameters
    ----------
    bands
        Number of disjoint bit bands (widths differ by at most one bit).
    max_distance
        Every pair within this Hamming distance shares an element (guaranteed).
    """

    bands: int = 8
    max_distance: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.max_distance < self.bands <= HASH_BITS:
            raise ValueError(f"dedup image bands need 1 <= max_distance < bands <= 64; got bands={self.bands}, max_distance={self.max_distance}")
        if self.elements_per_image > MAX_ELEMENTS_PER_IMAGE:
            raise ValueError(
                f"bands={self.bands}, max_distance={self.max_distance} gives {self.elements_per_image} PSI elements per image; "
                f"at most {MAX_ELEMENTS_PER_IMAGE} allowed (e.g. bands=8, max_distance=3 gives 56)"
            )

    @property
    def elements_per_image(self) -> int:
        """How many PSI elements one image contributes (one per choice of ``max_distance`` bands)."""
        return comb(self.bands, self.max_distance)

    @property
    def domain(self) -> str:
        """A label of the scheme mixed into every element, so elements of different schemes never match."""
        return f"phash64;bands={self.bands};d={self.max_distance}"

    def band_values(self, phash: int) -> list[int]:
        """The hash's band values, most significant band first."""
        if not 0 <= phash < 1 << HASH_BITS:
            raise ValueError(f"a pHash is a 64-bit unsigned int; got {phash}")
        base, extra = divmod(HASH_BITS, self.bands)
        values, shift = [], HASH_BITS
        for index in range(self.bands):
            width = base + (1 if index < extra else 0)
            shift -= width
            values.append((phash >> shift) & ((1 << width) - 1))
        return values

    def min_matching_bits(self) -> int:
        """Fewest hash bits one element pins down (the narrowest combination of bands)."""
        base, extra = divmod(HASH_BITS, self.bands)
        widths = sorted([base + 1] * extra + [base] * (self.bands - extra))
        return sum(widths[: self.bands - self.max_distance])

    def random_pair_match_probability(self) -> float:
        """Chance that two independent uniform hashes share an element (union bound)."""
        return min(1.0, self.elements_per_image * 2.0 ** -self.min_matching_bits())

    def values(self, phash: int) -> list[str]:
        """One string per band combination; equal strings mean those bands agree exactly."""
        band_values = self.band_values(phash)
        keep = self.bands - self.max_distance
        return [
            ",".join(f"{index}={band_values[index]}" for index in subset)
            for subset in itertools.combinations(range(self.bands), keep)
        ]


def near_duplicate_pairs(hashes_a: Sequence[int], hashes_b: Sequence[int], scheme: BandScheme) -> set[tuple[int, int]]:
    """Plain (non-private) reference: index pairs sharing a band element. For tests and sizing."""
    index: dict[str, list[int]] = {}
    for position, value in enumerate(hashes_a):
        for element in scheme.values(value):
            index.setdefault(element, []).append(position)
    pairs = set()
    for position, value in enumerate(hashes_b):
        for element in scheme.values(value):
            pairs.update((other, position) for other in index.get(element, ()))
    return pairs
