"""A site's own data: loaded from the folder its SuperNode names, checked against the declaration.

A SuperNode names its data with node-config ``data-path`` (Flower's convention for deployment
data); the run config only declares what every site must agree on (``dataset.input_shape``,
``dataset.num_classes``, optionally ``dataset.classes`` and ``dataset.resize``). The server
never opens these files. Layouts and decoding: :mod:`graftfl.core.site_formats` (folder,
manifest) and :mod:`graftfl.core.site_hf` (Hugging Face ``save_to_disk``); the decoded-tensor
cache: :mod:`graftfl.core.site_cache`; normalization moments: :mod:`graftfl.core.site_stats`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from graftfl.core import site_cache
from graftfl.core.site_formats import (
    FORMATS,
    MANIFEST_NAME,
    SiteDataError,
    SourceRecord,
    decode_image,
    detect_format,
    fit_to_declaration,
    list_folder,
    list_manifest,
)
from graftfl.core.site_rows import held_out_mask, label_indices

__all__ = ["SiteData", "SiteDataError", "SiteDeclaration", "held_out_mask", "load_site_data", "site_data_from_config"]  # held_out_mask: re-exported

DATA_PATH_KEY = "data-path"  # node-config keys
CACHE_DIR_KEY = "cache-dir"
CACHE_VERIFY_KEY = "cache-verify"
RESIZE_POLICIES = ("refuse", "resize")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteDeclaration:
    """What every site must agree on, from the run config's ``dataset`` group."""

    input_shape: tuple[int, int, int]
    num_classes: int
    classes: tuple[str, ...] | None = None
    resize: str = "refuse"
    format: str = "auto"
    image_column: str | None = None
    label_column: str | None = None

    def __post_init__(self):
        shape = tuple(int(v) for v in self.input_shape)
        if len(shape) != 3 or min(shape) < 1 or shape[0] not in (1, 3):
            raise SiteDataError(f"dataset.input_shape must be [channels, height, width] with 1 or 3 channels, got {list(self.input_shape)}")
        if int(self.num_classes) < 1:
            raise SiteDataError(f"dataset.num_classes must be >= 1, got {self.num_classes}")
        if self.classes is not None and (len(self.classes) != int(self.num_classes) or len(set(self.classes)) != len(self.classes)):
            raise SiteDataError(f"dataset.classes must list dataset.num_classes={self.num_classes} distinct names, got {list(self.classes)}")
        if self.resize not in RESIZE_POLICIES:
            raise SiteDataError(f"dataset.resize={self.resize!r}; valid policies: {list(RESIZE_POLICIES)}")
        if self.format not in FORMATS:
            raise SiteDataError(f"dataset.format={self.format!r}; valid formats: {list(FORMATS)}")
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "num_classes", int(self.num_classes))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))

    @classmethod
    def from_config(cls, data_cfg: Mapping) -> SiteDeclaration:
        """From ``dataset.input_shape``, ``num_classes`` and the optional ``classes``, ``resize``,
        ``format``, ``image_column``, ``label_column``."""
        get = data_cfg.get
        if get("input_shape") is None or get("num_classes") is None:
            raise SiteDataError("site data needs dataset.input_shape=[channels,height,width] and dataset.num_classes in the run config")
        classes = get("classes")
        return cls(
            input_shape=tuple(get("input_shape")),
            num_classes=get("num_classes"),
            classes=tuple(classes) if classes else None,
            resize=get("resize") or "refuse",
            format=get("format") or "auto",
            image_column=get("image_column") or None,
            label_column=get("label_column") or None,
        )


@dataclass
class SiteData:
    """A site's images (N x C x H x W float32 in [0, 1]), labels (int64) and held-out flags.

    ``patient_ids`` is None when the layout has none; ``files`` names each row's source
    (path relative to the data folder, or ``<split>/<row>`` for Hugging Face data).
    """

    site: str
    x: torch.Tensor
    y: torch.Tensor
    patient_ids: list[str] | None
    test_mask: torch.Tensor
    files: list[str]
    format: str
    from_cache: bool = False

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def train_part(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of the rows the site trains on."""
        keep = ~self.test_mask
        return self.x[keep], self.y[keep]

    def test_part(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of the held-out rows the site evaluates on."""
        return self.x[self.test_mask], self.y[self.test_mask]

    def keep(self, rows: torch.Tensor | Sequence[bool]) -> SiteData:
        """A copy with only the rows where ``rows`` is true (e.g. after removing duplicate patients)."""
        rows = torch.as_tensor(rows, dtype=torch.bool)
        picked = rows.nonzero().flatten().tolist()
        return replace(
            self,
            x=self.x[rows],
            y=self.y[rows],
            patient_ids=[self.patient_ids[i] for i in picked] if self.patient_ids is not None else None,
            test_mask=self.test_mask[rows],
            files=[self.files[i] for i in picked],
        )


# ------------------------------------------------------------------ loading ---


def _check_data_path(data_path: str | os.PathLike | None, site: str) -> Path:
    if data_path in (None, ""):
        raise SiteDataError(
            f"site {site}: node-config key '{DATA_PATH_KEY}' is not set; expected the folder of this site's images, "
            f'e.g. flower-supernode --node-config "{DATA_PATH_KEY}=/data/site0"'
        )
    path = Path(data_path).expanduser()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise SiteDataError(
            f"site {site}: {DATA_PATH_KEY}={path} (node-config) {what}; expected a folder with <class>/<image> "
            f"folders, a {MANIFEST_NAME}, or a Hugging Face save_to_disk directory"
        )
    return path


def _decode_all(data_path: Path, fmt: str, records: list[SourceRecord], hf_images: list[Any] | None, declaration: SiteDeclaration, site: str) -> tuple[torch.Tensor, bool]:
    tensors, exact_bytes = [], True
    for number, record in enumerate(records):
        source = hf_images[number] if hf_images is not None else data_path / record.ref
        where = f"{data_path} row {record.ref}" if hf_images is not None else str(data_path / record.ref)
        array, eight_bit = decode_image(source, where, site)
        tensor, changed = fit_to_declaration(array, declaration.input_shape, declaration.resize, where, site)
        exact_bytes = exact_bytes and eight_bit and not changed
        tensors.append(tensor)
    return torch.stack(tensors), exact_bytes


def _source_files(data_path: Path, fmt: str, records: list[SourceRecord]) -> list[str]:
    if fmt == "folder":
        return [r.ref for r in records]
    if fmt == "manifest":
        return [MANIFEST_NAME, *(r.ref for r in records)]
    files = []
    for root, dirs, names in os.walk(data_path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files.extend(os.path.relpath(os.path.join(root, n), data_path) for n in names if not n.startswith("."))
    return files


def load_site_data(
    data_path: str | os.PathLike | None,
    declaration: SiteDeclaration,
    site: str,
    *,
    site_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    verify_cache: bool = False,
) -> SiteData:
    """Load, check and hold out a site's data (see the module docstring).

    Parameters
    ----------
    data_path : the site's folder (node-config ``data-path``).
    declaration : what the run config declares (:meth:`SiteDeclaration.from_config`).
    site : the site's name in error messages (e.g. ``"node 3"`` or ``"site-0"``).
    site_fraction : held-out fraction when the data marks no split (``eval.site_fraction``).
    seed : seeds the held-out choice.
    cache_dir : where decoded tensors are cached (node-config ``cache-dir``); default
        ``<data_path>/.graftfl-cache``; an unwritable folder disables the cache.
    use_cache : False decodes every image and writes nothing.
    verify_cache : re-hash every file's bytes instead of trusting unchanged size + mtime.

    Raises
    ------
    SiteDataError
        Missing or empty folder, unreadable file, wrong shape (under ``resize=refuse``),
        unknown class; the message names the site, the node-config key or file, and what
        was expected.
    """
    path = _check_data_path(data_path, site)
    fmt = detect_format(path, declaration.format)
    hf_image_reader, source_names = None, None
    if fmt == "hf":
        from graftfl.core.site_hf import read_hf

        records, hf_image_reader, source_names = read_hf(path, site, declaration.image_column, declaration.label_column)
    else:
        records = list_manifest(path, site) if fmt == "manifest" else list_folder(path, site)
    labels = label_indices(records, declaration.num_classes, declaration.classes, source_names, fmt, path, site)

    folder = site_cache.usable_cache_dir(path, cache_dir) if use_cache else None
    payload, key, index = None, None, None
    if folder is not None:
        index = site_cache.ContentIndex(folder)
        try:
            fingerprint = index.fingerprint(path, _source_files(path, fmt, records), verify=verify_cache)
        except FileNotFoundError as err:
            raise SiteDataError(f"site {site}: {err.filename}: file not found (listed in {path / MANIFEST_NAME})") from err
        params = {"format": fmt, "input_shape": declaration.input_shape, "resize": declaration.resize}  # row order: fixed by the hashed manifest / sorted listing
        key = site_cache.cache_key(fingerprint, params)
        payload = site_cache.read_entry(folder, key)
    if payload is not None and tuple(payload["x"].shape) != (len(records), *declaration.input_shape):
        payload = None  # an entry that does not fit the listing is never trusted: decode again
    from_cache = payload is not None
    if payload is None:
        hf_images = hf_image_reader() if hf_image_reader is not None else None
        x, exact_bytes = _decode_all(path, fmt, records, hf_images, declaration, site)
        if folder is not None:
            stored = x.mul(255.0).round_().to(torch.uint8) if exact_bytes else x
            site_cache.write_entry(folder, key, {"x": stored})
            index.save()
    else:
        stored = payload["x"]
        x = stored.to(torch.float32).div_(255.0) if stored.dtype == torch.uint8 else stored
        if index is not None:
            index.save()
    patient_ids = [r.patient_id for r in records] if records[0].patient_id is not None else None
    files = [r.ref for r in records]
    mask = held_out_mask(len(records), [r.split for r in records], patient_ids, files, site_fraction, seed)
    log.info("site %s: %d images (%s, %d held out)%s", site, len(records), fmt, int(mask.sum()), " from cache" if from_cache else "")
    return SiteData(site, x, torch.tensor(labels, dtype=torch.int64), patient_ids, mask, files, fmt, from_cache)


def site_data_from_config(node_config: Mapping[str, Any], data_cfg: Mapping, site: str, site_fraction: float = 0.2, seed: int = 0) -> SiteData:
    """Load a site's data as its SuperNode names it: node-config ``data-path`` (required),
    ``cache-dir`` and ``cache-verify`` (optional); the declaration from the ``dataset`` config."""
    verify = str(node_config.get(CACHE_VERIFY_KEY, "false")).lower() in ("1", "true", "yes")
    return load_site_data(
        node_config.get(DATA_PATH_KEY),
        SiteDeclaration.from_config(data_cfg),
        site,
        site_fraction=site_fraction,
        seed=seed,
        cache_dir=node_config.get(CACHE_DIR_KEY) or None,
        verify_cache=verify,
    )
