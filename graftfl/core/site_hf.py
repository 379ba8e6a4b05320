"""A site folder written by Hugging Face ``datasets`` ``save_to_disk`` (what ``flwr-datasets create`` writes).

A ``DatasetDict`` gives the held-out part through its split names (``test``, ``validation``);
a single ``Dataset`` may carry a ``split`` column. The image and label columns are named by
``dataset.image_column`` / ``dataset.label_column`` or detected: the column whose feature is
``datasets.Image`` (else one named image, img, pixel_values, pixels) and the ``ClassLabel``
column (else one named label, labels, fine_label, class, target).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graftfl.core.site_formats import (
    IMAGE_COLUMN_GUESSES,
    LABEL_COLUMN_GUESSES,
    SiteDataError,
    SourceRecord,
)

HELD_OUT_SPLITS = ("test", "validation", "valid", "val")


def _pick_column(features: dict, wanted: str | None, feature_type: type, guesses: tuple[str, ...], role: str, where: str, site: str) -> str:
    names = list(features)
    if wanted:
        if wanted not in features:
            raise SiteDataError(f"site {site}: {where}: dataset.{role}_column={wanted!r} is not a column; columns: {names}")
        return wanted
    typed = [name for name, feature in features.items() if isinstance(feature, feature_type)]
    if len(typed) == 1:
        return typed[0]
    for guess in guesses:
        if guess in features:
            return guess
    raise SiteDataError(f"site {site}: {where}: cannot tell which column holds the {role}; columns: {names}. Set dataset.{role}_column")


def read_hf(data_path: Path, site: str, image_column: str | None = None, label_column: str | None = None) -> tuple[list[SourceRecord], Callable[[], list[Any]], list[str] | None]:
    """Records, a function that returns the image objects (Pillow images or arrays) in record
    order, and the ClassLabel names (or None). Images are decoded only when that function is
    called, so a cached load reads labels but decodes no image."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    try:
        loaded = datasets.load_from_disk(str(data_path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise SiteDataError(f"site {site}: data-path={data_path} is not a readable Hugging Face save_to_disk directory ({err})") from err
    parts = dict(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else {None: loaded}
    records: list[SourceRecord] = []
    image_columns: list[tuple[Any, str]] = []
    class_names: list[str] | None = None
    for split_name, part in parts.items():
        where = f"{data_path}" + (f" split {split_name!r}" if split_name else "")
        features = part.features
        image_col = _pick_column(features, image_column, datasets.Image, IMAGE_COLUMN_GUESSES, "image", where, site)
        label_col = _pick_column(features, label_column, datasets.ClassLabel, LABEL_COLUMN_GUESSES, "label", where, site)
        if isinstance(features[label_col], datasets.ClassLabel):
            class_names = list(features[label_col].names)
        if split_name is None:
            fixed_split = None
        elif split_name.lower() == "train":
            fixed_split = "train"
        elif split_name.lower() in HELD_OUT_SPLITS:
            fixed_split = "test"
        else:
            raise SiteDataError(f"site {site}: {data_path}: split {split_name!r} is neither train nor one of {list(HELD_OUT_SPLITS)}")
        columns = part.column_names
        split_values = part["split"] if fixed_split is None and "split" in columns else None
        patients = [str(p) for p in part["patient_id"]] if "patient_id" in columns else None
        # Array features in numpy format keep their dtype (uint8 vs uint16); Image features stay Pillow images
        image_columns.append((part if isinstance(features[image_col], datasets.Image) else part.with_format("numpy"), image_col))
        for row, label in enumerate(part[label_col]):
            split = fixed_split
            if split_values is not None:
                split = str(split_values[row]).lower() or None
                if split not in (None, "train", "test"):
                    raise SiteDataError(f"site {site}: {where} row {row}: split {split_values[row]!r} is not train or test")
            records.append(SourceRecord(ref=f"{split_name or 'data'}/{row}", label=label, patient_id=patients[row] if patients else None, split=split))
    if not records:
        raise SiteDataError(f"site {site}: data-path={data_path} is a Hugging Face dataset with no rows")

    def images() -> list[Any]:
        return [image for part, column in image_columns for image in part[column]]

    return records, images, class_names
