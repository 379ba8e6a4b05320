"""Rows of a site's data: class indices from raw labels, and the held-out part.

Both are recomputed cheaply on every load (also a cached one), from the listing only.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from graftfl.core.site_formats import SiteDataError, SourceRecord

log = logging.getLogger(__name__)


def _as_index(raw: Any) -> int | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    text = str(raw).strip()
    return int(text) if text.lstrip("-").isdigit() else None


def label_indices(records: list[SourceRecord], num_classes: int, declared: tuple[str, ...] | None, source_names: list[str] | None, fmt: str, data_path: Path, site: str) -> list[int]:
    """Each record's class index, or a refusal naming the file and the expected classes.

    Integer labels are indices in [0, num_classes). Names are looked up in ``dataset.classes``;
    without it, an image-folder tree whose names are not integers uses torchvision's order
    (sorted names), which only agrees across sites when each has all ``num_classes`` folders.
    """
    count = num_classes
    implicit: dict[str, int] = {}
    if declared is None and fmt == "folder":
        names = sorted({str(r.label) for r in records})
        if any(_as_index(n) is None for n in names):
            if len(names) != count:
                raise SiteDataError(
                    f"site {site}: data-path={data_path} has class folders {names}, expected dataset.num_classes={count} of them; "
                    f"declare the names in dataset.classes so that every site maps them to the same indices"
                )
            implicit = {name: index for index, name in enumerate(names)}
    indices = []
    for record in records:
        raw = record.label
        if source_names is not None and isinstance(raw, int) and declared is not None and 0 <= raw < len(source_names):
            raw = source_names[raw]  # a ClassLabel index: map by name onto the declared order
        if declared is not None and str(raw) in declared:
            index = declared.index(str(raw))
        elif str(raw) in implicit:
            index = implicit[str(raw)]
        else:
            index = _as_index(raw)
        if index is None or not 0 <= index < count:
            expected = f"one of dataset.classes={list(declared)} or an index" if declared else "an integer index"
            raise SiteDataError(
                f"site {site}: {data_path / record.ref if fmt != 'hf' else record.ref}: unknown class {raw!r}; "
                f"expected {expected} in [0, {count}) (dataset.num_classes={count})"
            )
        indices.append(index)
    return indices


# ---------------------------------------------------------------- held out ---


def held_out_mask(num_rows: int, splits: Sequence[str | None], patient_ids: Sequence[str] | None, files: Sequence[str], fraction: float, seed: int = 0) -> torch.Tensor:
    """Which rows a site holds out for evaluation.

    Rows marked ``split=test`` when any row carries a split; otherwise a deterministic
    ``fraction`` of the rows chosen by hashing the patient id (every row of a patient on the
    same side) or, without patient ids, the file name. The choice depends on the data, the
    fraction and the seed only, not on row order.
    """
    if any(split is not None for split in splits):
        mask = torch.tensor([split == "test" for split in splits], dtype=torch.bool)
        if patient_ids is not None:
            sides: dict[str, set] = {}
            for patient, held in zip(patient_ids, mask.tolist(), strict=True):
                sides.setdefault(patient, set()).add(held)
            mixed = [p for p, s in sides.items() if len(s) == 2]
            if mixed:
                log.warning("%d patient(s) have rows in both the train and the test split, e.g. %r", len(mixed), mixed[0])
        return mask
    if not 0.0 <= fraction < 1.0:
        raise SiteDataError(f"eval.site_fraction must be in [0, 1), got {fraction}")
    units = list(patient_ids) if patient_ids is not None else list(files)
    rows_of: dict[str, list[int]] = {}
    for row, unit in enumerate(units):
        rows_of.setdefault(unit, []).append(row)
    order = sorted(rows_of, key=lambda unit: hashlib.sha256(f"{seed}\0{unit}".encode()).digest())
    target = round(fraction * num_rows)
    mask = torch.zeros(num_rows, dtype=torch.bool)
    taken = 0
    for unit in order:
        if taken >= target:
            break
        mask[rows_of[unit]] = True
        taken += len(rows_of[unit])
    return mask
