"""``graftfl prepare-sites``: write a registry dataset out as one folder per site, for demos and tests.

``graftfl prepare-sites dataset=digits num_clients=3 partition=dirichlet out=sites/`` partitions
the dataset's training split with the run's partitioner (as ``graftfl sim`` would) and writes

- ``sites/site-<i>/<label>/<patient_id>-<k>.png``: raw pixels, not standardised;
- ``sites/site-<i>/manifest.csv``: ``path,label,patient_id,split`` with synthetic patient ids
  (several images per patient) and a held-out ``test`` part per site, chosen by patient;
- ``sites/sites.json``: what was written and the run overrides that declare it (``dataset=site ...``).

``--duplicate-fraction F`` copies a fraction ``F`` of all patients (same ``patient_id``, same
images) into one other site, every third of them into two other sites, and writes the truth
to ``sites/duplicates.json``. That file exists for tests only; nothing reads it during a run.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

TRUTH_NAME = "duplicates.json"
SUMMARY_NAME = "sites.json"


class PrepareError(ValueError):
    """Bad arguments for prepare-sites; the message says what is valid."""


def _patients_of(indices: np.ndarray, labels: np.ndarray, images_per_patient: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Cut a site's images into patients of 1 .. 2*images_per_patient-1 images (mean images_per_patient).

    A patient's images share one label (one diagnosis per patient), so holding out by
    patient does not hold out whole classes.
    """
    patients = []
    for label in np.unique(labels[indices]):
        order = rng.permutation(indices[labels[indices] == label])
        start = 0
        while start < len(order):
            size = int(rng.integers(1, 2 * images_per_patient)) if images_per_patient > 1 else 1
            patients.append(order[start : start + size])
            start += size
    return [patients[i] for i in rng.permutation(len(patients))]


def _new_ids(count: int, rng: np.random.Generator) -> list[str]:
    """``count`` distinct random-looking ids, reproducible from ``rng`` (dict order, not set order)."""
    ids: dict[str, None] = {}
    while len(ids) < count:
        ids.update((f"P{int(v):010X}", None) for v in rng.integers(0, 16**10, size=count - len(ids)))
    return list(ids)


def plan_sites(labels: np.ndarray, site_indices: list[np.ndarray], test_fraction: float, images_per_patient: int, duplicate_fraction: float, seed: int):
    """Rows per site ``(index, patient_id, split)`` and the duplicate truth, without touching disk."""
    if not 0.0 <= test_fraction < 1.0:
        raise PrepareError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if not 0.0 <= duplicate_fraction <= 1.0:
        raise PrepareError(f"--duplicate-fraction must be in [0, 1], got {duplicate_fraction}")
    if images_per_patient < 1:
        raise PrepareError(f"--images-per-patient must be >= 1, got {images_per_patient}")
    num_sites = len(site_indices)
    if duplicate_fraction > 0 and num_sites < 2:
        raise PrepareError("--duplicate-fraction needs num_clients >= 2 (a duplicate patient is held by two sites)")
    rng = np.random.default_rng(seed)
    per_site = [_patients_of(indices, labels, images_per_patient, rng) for indices in site_indices]
    ids = iter(_new_ids(sum(len(p) for p in per_site), rng))
    rows: list[list[tuple[int, str, str]]] = []
    patients: list[tuple[int, str, np.ndarray]] = []  # (origin site, id, image indices)
    for site, groups in enumerate(per_site):
        held = set(rng.permutation(len(groups))[: round(test_fraction * len(groups))].tolist())
        site_rows = []
        for number, group in enumerate(groups):
            patient = next(ids)
            patients.append((site, patient, group))
            site_rows.extend((int(i), patient, "test" if number in held else "train") for i in group)
        rows.append(site_rows)
    truth: dict = {"duplicate_fraction": duplicate_fraction, "seed": seed, "patients": {}, "pairs": {}}
    chosen = rng.permutation(len(patients))[: round(duplicate_fraction * len(patients))]
    for number, pick in enumerate(chosen.tolist()):
        origin, patient, group = patients[pick]
        copies = 2 if number % 3 == 2 and num_sites >= 3 else 1  # every third duplicate goes to two other sites
        others = [s for s in range(num_sites) if s != origin]
        targets = sorted(rng.choice(others, size=copies, replace=False).tolist())
        for target in targets:
            split = "test" if rng.random() < test_fraction else "train"
            rows[target].extend((int(i), patient, split) for i in group)
        holders = sorted([origin, *targets])
        truth["patients"][patient] = {"sites": [f"site-{s}" for s in holders], "origin": f"site-{origin}", "images": len(group)}
        for a, b in combinations(holders, 2):
            key = f"site-{a},site-{b}"
            truth["pairs"][key] = truth["pairs"].get(key, 0) + 1
    return rows, truth


def _to_image(pixels: np.ndarray) -> np.ndarray:
    return pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)


def write_sites(out: Path, train_x: np.ndarray, train_y: np.ndarray, rows: list[list[tuple[int, str, str]]], truth: dict | None) -> list[dict]:
    """Write each site's PNGs and manifest; returns per-site counts."""
    from PIL import Image

    counts = []
    for site, site_rows in enumerate(rows):
        folder = out / f"site-{site}"
        seen: dict[str, int] = {}
        manifest = []
        for index, patient, split in site_rows:
            label = int(train_y[index])
            number = seen.get(patient, 0)
            seen[patient] = number + 1
            relative = f"{label}/{patient}-{number}.png"
            (folder / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(_to_image(train_x[index])).save(folder / relative)
            manifest.append({"path": relative, "label": label, "patient_id": patient, "split": split})
        with open(folder / "manifest.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient_id", "split"])
            writer.writeheader()
            writer.writerows(manifest)
        counts.append({"site": f"site-{site}", "images": len(manifest), "patients": len(seen), "test_images": sum(r["split"] == "test" for r in manifest)})
    if truth is not None:
        (out / TRUTH_NAME).write_text(json.dumps(truth, indent=1) + "\n")
    return counts


def _clear(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not force:
            raise PrepareError(f"out={out} is not empty; choose another folder or pass --force to replace its site-* folders")
        for old in out.glob("site-*"):
            shutil.rmtree(old)
        for name in (TRUTH_NAME, SUMMARY_NAME):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def prepare_sites(overrides: list[str], out: Path, test_fraction: float = 0.2, images_per_patient: int = 4, duplicate_fraction: float = 0.0, force: bool = False) -> dict:
    """Compose the config from ``overrides`` (dataset, num_clients, partition, seed) and write the site folders."""
    from graftfl.config import compose_config
    from graftfl.core.data import raw_arrays_from_config
    from graftfl.core.partition import partition_indices

    cfg = compose_config(overrides)
    train_x, train_y, _test_x, _test_y = raw_arrays_from_config(cfg.dataset)
    labels = torch.from_numpy(train_y)
    site_indices = [partition_indices(labels, cfg.partition, cfg.num_clients, site, cfg.seed) for site in range(cfg.num_clients)]
    rows, truth = plan_sites(train_y, site_indices, test_fraction, images_per_patient, duplicate_fraction, cfg.seed)
    _clear(out, force)
    counts = write_sites(out, train_x, train_y, rows, truth if duplicate_fraction > 0 else None)
    shape = list(train_x.shape[1:])
    num_classes = int(max(train_y.max(), _test_y.max() if len(_test_y) else 0)) + 1
    summary = {
        "dataset": cfg.dataset.get("subset") or cfg.dataset.name,
        "input_shape": shape,
        "num_classes": num_classes,
        "num_clients": int(cfg.num_clients),
        "partition": cfg.partition.name,
        "seed": int(cfg.seed),
        "test_fraction": test_fraction,
        "duplicate_fraction": duplicate_fraction,
        "sites": counts,
        "run_overrides": f"dataset=site dataset.input_shape=[{','.join(map(str, shape))}] dataset.num_classes={num_classes} num_clients={cfg.num_clients}",
    }
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=1) + "\n")
    for count in counts:
        log.info("%s: %d images, %d patients, %d held out", count["site"], count["images"], count["patients"], count["test_images"])
    return summary


def cmd_prepare_sites(args: argparse.Namespace) -> int:
    """``graftfl prepare-sites``: write a registry dataset out as site folders; returns the exit status."""
    outs = [o for o in args.overrides if o.startswith("out=")]
    rest = [o for o in args.overrides if not o.startswith("out=")]
    if len(outs) != 1 or not outs[0][4:]:
        print("graftfl: prepare-sites needs exactly one out=<folder>, e.g. out=sites/", file=sys.stderr)
        return 2
    try:
        prepare_sites(rest, Path(outs[0][4:]), args.test_fraction, args.images_per_patient, args.duplicate_fraction, args.force)
    except PrepareError as err:
        print(f"graftfl: prepare-sites: {err}", file=sys.stderr)
        return 2
    print(f"sites: {outs[0][4:]}", flush=True)
    return 0


def add_commands(subparsers) -> None:
    """Register ``prepare-sites`` on the ``graftfl`` command's subparsers."""
    parser = subparsers.add_parser(
        "prepare-sites",
        help="write a registry dataset as one folder per site (PNG + manifest.csv), for demos and tests",
        description="e.g. graftfl prepare-sites dataset=digits num_clients=3 partition=dirichlet out=sites/",
    )
    parser.add_argument("--test-fraction", type=float, default=0.2, help="fraction of each site's patients marked split=test (default 0.2)")
    parser.add_argument("--images-per-patient", type=int, default=4, help="mean images per synthetic patient (default 4)")
    parser.add_argument("--duplicate-fraction", type=float, default=0.0, help="fraction of patients copied into other sites; truth in duplicates.json")
    parser.add_argument("--force", action="store_true", help="replace the site-* folders of a non-empty out folder")
    parser.add_argument("overrides", nargs="*", help="out=<folder> and Hydra overrides (dataset, num_clients, partition, seed)")
    parser.set_defaults(handler=cmd_prepare_sites)
