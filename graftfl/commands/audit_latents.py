"""``graftfl audit`` for the features protocol (latents in the feature store) and the labels split sends.

Kept apart from :mod:`graftfl.commands.audit_attacks` to keep both modules small.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from graftfl.audit import features_inversion, metrics
from graftfl.audit.record import load_entry
from graftfl.commands.audit_data import NotAuditable, recorded_rows, site_train_rows
from graftfl.core.autoencoder import conv_ae
from graftfl.core.models import cut_model

NOISY_SCAN_STD = 0.3  # the "second scan" of a known patient: the record plus Gaussian noise (as in docs/audit.md)


def stored_latents(store_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``client_id -> (row indices, labels, latents)`` of the learning-mode rows in the feature store."""
    connection = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    try:
        rows = connection.execute("SELECT client_id, row_index, label, vector FROM features WHERE mode = 'learning' ORDER BY client_id, row_index").fetchall()
    finally:
        connection.close()
    grouped: dict[str, list] = defaultdict(list)
    for client_id, row_index, label, vector in rows:
        grouped[client_id].append((row_index, label, np.frombuffer(vector, dtype=np.float32)))
    return {client: (np.array([r[0] for r in items]), np.array([r[1] for r in items]), np.stack([r[2] for r in items])) for client, items in grouped.items()}


def _partition_of(cfg, labels: np.ndarray, rows: np.ndarray) -> int:
    """Evaluator only: the partition whose training labels the stored labels are (the store names nodes, not partitions)."""
    for partition in range(int(cfg.num_clients)):
        _, y = site_train_rows(cfg, partition)
        if len(y) > int(rows.max()) and np.array_equal(y.numpy()[rows], labels):
            return partition
    raise NotAuditable("no site's training labels match the stored latents' labels: the evaluator cannot score this store")


def features_figures(cfg, run_dir: Path, index: dict, settings, aux: dict) -> tuple[dict, tuple]:
    """Inputs from uploaded latents: the server's decoder (federated/public) or a shadow encoder (local); re-identification."""
    store = run_dir / str(index["pointers"].get("feature_store", "features.db"))
    if not store.exists():
        raise NotAuditable(f"the feature store {store} is missing")
    sites = stored_latents(store)
    if not sites:
        raise NotAuditable("the feature store holds no learning-mode latents")
    client = sorted(sites)[0]
    rows, labels, latents = sites[client]
    partition = _partition_of(cfg, labels, rows)
    site_x, _ = site_train_rows(cfg, partition)  # evaluator only
    targets = int(settings.targets)
    observed, originals = torch.from_numpy(latents[:targets]).float(), site_x[torch.from_numpy(rows[:targets]).long()]
    autoencoder = conv_ae(aux["input_shape"], 0, latent_dim=int(cfg.protocol.latent_dim), channels=int(cfg.protocol.conv_channels))
    kept = [entry for entry in index["entries"] if entry["kind"] == "model" and entry.get("name") == "autoencoder"]
    figures = {"site": client, "rows": len(observed), "ae_training": cfg.protocol.autoencoder.training,
               "distance_correlation": metrics.distance_correlation(originals.flatten(1), observed)}
    if kept:  # federated / public: the server holds the whole autoencoder
        autoencoder.load_state_dict(load_entry(run_dir, kept[0]))
        encoder, decoder = cut_model(autoencoder.eval(), ["encoder"])
        reconstruction = features_inversion.decode_latents(decoder, observed)
        figures["attack"] = "server holds the decoder"
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            scans = site_x[torch.from_numpy(rows).long()]
            query = encoder(scans + NOISY_SCAN_STD * torch.randn(scans.shape, generator=generator))
        ids = rows.tolist()
        figures["reidentification"] = {"rate": features_inversion.reidentification_rate(query, ids, torch.from_numpy(latents), ids),
                                       "chance": features_inversion.chance_reidentification_rate(ids, ids), "noise_std": NOISY_SCAN_STD}
    else:  # local: a shadow encoder of the public architecture
        def make_encoder() -> torch.nn.Module:
            return cut_model(conv_ae(aux["input_shape"], 0, latent_dim=int(cfg.protocol.latent_dim),
                                         channels=int(cfg.protocol.conv_channels)), ["encoder"])[0]

        reconstruction = features_inversion.surrogate_encoder_attack(make_encoder, observed, aux["x"], method="shadow", epochs=int(settings.decoder_epochs))
        figures["attack"] = "shadow encoder (autoencoder.training=local: the server holds no part of the autoencoder)"
        figures["reidentification"] = {"applies": False, "why": "local autoencoders: the attacker cannot encode a known record"}
    report = metrics.reconstruction_report(reconstruction, originals, aux["x"])
    figures.update({"ssim": report["ssim"], "psnr": report["psnr"], "guess_ssim": report["guess_ssim"]})
    return figures, (originals, reconstruction)


def split_label_figures(cfg, run_dir: Path, index: dict) -> dict:
    """``split`` / ``semisup`` send labels: how well the received labels tell the rarest class (1.0 when sent in clear)."""
    received, truth = [], []
    for entry in (e for e in index["entries"] if e["kind"] == "split_turn"):
        tensors = load_entry(run_dir, entry)
        if "labels" not in tensors:
            continue
        _, y = recorded_rows(cfg, entry, tensors, "train")
        received.append(tensors["labels"].long())
        truth.append(y)
    if not received:
        raise NotAuditable("the recording holds no labels")
    received, truth = torch.cat(received), torch.cat(truth)
    positive = int(torch.bincount(truth).argmin())
    binary = (truth == positive).long()
    return {"rows": len(truth), "positive_class": positive, "agreement": float((received == truth).float().mean()),
            "auc": metrics.roc_auc(binary.numpy(), (received == positive).float().numpy()),
            "note": "labels travel to the server with every training batch; AUC of 'received label is the rarest class' against the truth"}
