"""The service-mode tables: the sites' pooled counts as Table I (δ) and Table II (accuracy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def service_tables(site_metrics: list[dict], num_classes: int) -> dict:
    """Pool the sites' counts into Table I (δ per class, Eq. 9) and Table II (accuracy per class)."""

    def pooled(key: str) -> np.ndarray:
        return np.sum([np.asarray(m[key], dtype=np.float64) for m in site_metrics], axis=0) if site_metrics else np.zeros(num_classes)

    correct, count = pooled("correct_by_class"), pooled("count_by_class")
    error_sum, error_count = pooled("error_sum_by_class"), pooled("error_count_by_class")
    ratio = lambda a, b: [float(x / y) if y else None for x, y in zip(a, b, strict=True)]  # noqa: E731
    return {
        "accuracy": float(correct.sum() / count.sum()) if count.sum() else None,
        "per_class_accuracy": ratio(correct, count),
        "test_samples": int(count.sum()),
        "per_class_test_samples": [int(c) for c in count],
        "reconstruction_error": float(error_sum.sum() / error_count.sum()) if error_count.sum() else None,
        "per_class_reconstruction_error": ratio(error_sum, error_count),
    }


def write_tables(run_dir: Path, tables: dict, cfg) -> None:
    """``tables.json`` plus Markdown Tables I (reconstruction error) and II (accuracy)."""
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    header = f"dataset {cfg.dataset.name}, {cfg.num_clients} sites, ae_training={cfg.protocol.autoencoder.training}, classifier={cfg.protocol.classifier.mode}, latent_dim={cfg.protocol.latent_dim}"
    table1 = ["# Table I: reconstruction error δ per class (Eq. 9)", "", header, "", "| class | δ |", "|---|---|"]
    table1 += [f"| {c} | {fmt(v, '.4f')} |" for c, v in enumerate(tables["per_class_reconstruction_error"])]
    table1.append(f"| **overall** | **{fmt(tables['reconstruction_error'], '.4f')}** |")
    table2 = ["# Table II: classification accuracy per class (service mode)", "", header, "", "| class | test images | accuracy |", "|---|---|---|"]
    table2 += [f"| {c} | {n} | {fmt(v, '.2%')} |" for c, (n, v) in enumerate(zip(tables["per_class_test_samples"], tables["per_class_accuracy"], strict=True))]
    table2.append(f"| **total** | **{tables['test_samples']}** | **{fmt(tables['accuracy'], '.2%')}** |")
    (run_dir / "table_reconstruction.md").write_text("\n".join(table1) + "\n")
    (run_dir / "table_accuracy.md").write_text("\n".join(table2) + "\n")
    (run_dir / "tables.json").write_text(json.dumps({"setting": header, **tables}, indent=2) + "\n")
