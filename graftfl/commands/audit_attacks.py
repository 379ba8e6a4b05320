"""The attacks ``graftfl audit`` runs on one recorded run, per protocol (the library is :mod:`graftfl.audit`).

Each ``audit_<protocol>`` function takes the run's config, its recording index, the audit
settings and the attacker's auxiliary data, and returns ``(figures, images)``: a JSON-ready
dict and, where an inversion ran, ``(originals, reconstructions)`` for the picture.
Attacks see only what the server recorded, the models it holds and the auxiliary data;
the true rows come from :mod:`graftfl.commands.audit_data` for scoring only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from graftfl.audit import label_leakage, membership, metrics, split_inversion
from graftfl.audit.gradient_inversion import analytic_fc_input, invert_gradients, present_labels, upload_to_gradients
from graftfl.audit.record import load_entry
from graftfl.commands.audit_data import NotAuditable, recorded_rows, site_train_rows
from graftfl.core.codec import assign_flat_parameters
from graftfl.core.data import make_loader
from graftfl.core.models import model_from_config
from graftfl.core.selective import Upload
from graftfl.core.split import model_parts
from graftfl.core.train import make_optimizer, seed_everything, train
from graftfl.core.weights_file import load_weights_file

logger = logging.getLogger(__name__)


def _entries(index: dict, kind: str) -> list[dict]:
    return [entry for entry in index["entries"] if entry["kind"] == kind]


def _last_round(entries: list[dict]) -> list[dict]:
    last = max(entry["round"] for entry in entries)
    return sorted((e for e in entries if e["round"] == last), key=lambda e: e["partition"])


def _bottom_builder(cfg, input_shape, num_classes: int):
    """A fresh bottom of the run's (public) architecture, cut where the run cuts: the attacker's surrogate."""
    head_stages = int(cfg.protocol.head_stages) if cfg.protocol.name == "ushaped" else None
    counter = iter(range(10_000))

    def make_bottom() -> torch.nn.Module:
        torch.manual_seed(1_000 + next(counter))  # not the run's seed: the attacker does not know the sites' start
        return model_parts(model_from_config(cfg, input_shape, num_classes), cfg.protocol.cut_stage, head_stages)[0]

    return make_bottom


def split_inversion_figures(cfg, run_dir: Path, index: dict, settings, aux: dict, kind: str = "train") -> tuple[dict, tuple]:
    """Inputs from cut activations: tier (b) UnSplit and shadow bottom, and dCor; tier (a) when the server holds the bottom."""
    entries = _entries(index, "split_turn")
    if not entries:
        raise NotAuditable("the recording holds no split turn")
    entry = _last_round(entries)[0]  # the last round: the most trained bottom
    tensors = load_entry(run_dir, entry)
    targets = int(settings.targets)
    # the turn's last rows: computed by the bottom closest to the one a site hands back at the end of its turn (tier (a))
    observed = tensors["activations"][-targets:].float()
    originals, _ = recorded_rows(cfg, entry, tensors, kind)
    originals = originals[-targets:]
    make_bottom = _bottom_builder(cfg, aux["input_shape"], aux["num_classes"])
    unsplit = split_inversion.unsplit(make_bottom, observed, aux["input_shape"], rounds=int(settings.unsplit_rounds),
                                     tv_weight=float(settings.get("unsplit_tv_weight", 0.0)), aux_x=aux["x"])
    _shadow, decoder = split_inversion.train_shadow_decoder(make_bottom, observed, aux["x"], epochs=int(settings.decoder_epochs))
    shadow = split_inversion.reconstruct(decoder, observed)
    reports = {"unsplit": metrics.reconstruction_report(unsplit, originals, aux["x"]),
               "shadow_bottom": metrics.reconstruction_report(shadow, originals, aux["x"])}
    reconstructions = {"unsplit": unsplit, "shadow_bottom": shadow}
    parts = [e for e in _entries(index, "client_parts") if (e["round"], e["partition"]) == (entry["round"], entry["partition"])]
    if parts:  # handoff=average: the server holds the bottom this site handed back after the turn
        bottom = make_bottom()
        bottom.load_state_dict({key[len("bottom."):]: value for key, value in load_entry(run_dir, parts[0]).items() if key.startswith("bottom.")})
        decoder = split_inversion.train_query_decoder(bottom.eval(), aux["x"], epochs=int(settings.decoder_epochs))
        reconstructions["query_decoder"] = split_inversion.reconstruct(decoder, observed)
        reports["query_decoder"] = metrics.reconstruction_report(reconstructions["query_decoder"], originals, aux["x"])
        tier_a = {"applies": True, **reports["query_decoder"]}
    else:
        tier_a = {"applies": False, "why": f"protocol.handoff={cfg.protocol.handoff}: the server never holds the site's bottom weights "
                  "(relay: only a ciphertext; local: they stay at the site; with average it receives them and tier (a) runs)"}
    best = max(reports, key=lambda name: reports[name]["ssim"])
    cut = cfg.protocol.cut_stage or make_bottom().stage_names[-1]
    figures = {
        "cut_stage": cut,
        "recorded_from": {"round": entry["round"], "partition": entry["partition"], "rows": len(observed)},
        "tier_a_query_decoder": tier_a,
        "tier_b": {name: reports[name] for name in ("unsplit", "shadow_bottom")},
        "best_attack": best,
        "ssim": reports[best]["ssim"],
        "psnr": reports[best]["psnr"],
        "guess_ssim": reports[best]["guess_ssim"],
        "distance_correlation": metrics.distance_correlation(originals.flatten(1), observed.flatten(1)),
    }
    return figures, (originals, reconstructions[best])


def ushaped_label_figures(cfg, run_dir: Path, index: dict, settings) -> dict:
    """Labels from the gradients the site sends back (Li et al.): norm and direction AUC, clustering accuracy."""
    gradients, labels = [], []
    for entry in _last_round(_entries(index, "split_turn")):
        tensors = load_entry(run_dir, entry)
        if "gradient" not in tensors:
            continue
        _, y = recorded_rows(cfg, entry, tensors, "backward")
        gradients.append(tensors["gradient"].float().flatten(1))
        labels.append(y)
    if not gradients:
        raise NotAuditable("the recording holds no backward gradients")
    gradients, labels = torch.cat(gradients), torch.cat(labels)
    positive = int(torch.bincount(labels).argmin())  # the rarest class: the imbalanced one-vs-rest task
    binary = (labels == positive).long()
    reference = int(binary.nonzero()[0, 0]) if binary.any() else 0  # one gradient whose label the attacker knows
    num_classes = int(labels.max()) + 1
    figures = {
        "rows": len(labels),
        "positive_class": positive,
        "positive_share": float(binary.float().mean()),
        "norm_auc": label_leakage.norm_attack_auc(gradients, binary),
        "direction_auc": label_leakage.direction_attack_auc(gradients, binary, reference),
        "cluster_accuracy": label_leakage.cluster_label_accuracy(gradients, labels, num_classes),
        "cluster_chance": label_leakage.chance_cluster_accuracy(labels),
    }
    figures["auc"] = max(figures["norm_auc"], figures["direction_auc"])
    return figures


def _best_match_ssim(candidates: torch.Tensor, pool: torch.Tensor) -> float:
    """Mean over ``candidates`` of the best SSIM against any image of ``pool`` (the same rule for attack and guess)."""
    best = []
    for candidate in candidates:
        best.append(float(metrics.ssim_per_image(candidate.expand_as(pool), pool, data_range=float(pool.max() - pool.min())).max()))
    return sum(best) / len(best)


def _first_upload(cfg, run_dir: Path, index: dict, aux: dict) -> tuple[dict, torch.nn.Module, Upload]:
    """The first recorded upload (DSSGD) or update (FedAvg, round 1), the model it was computed from, as an Upload."""
    kind = "dssgd_upload" if cfg.protocol.name == "dssgd" else "fedavg_update"
    entries = sorted(_entries(index, kind), key=lambda e: (e["round"], e["partition"]))
    if not entries or entries[0]["round"] != 1 and kind == "fedavg_update":
        raise NotAuditable(f"the recording holds no {kind} (of round 1 for fedavg)")
    entry, tensors = entries[0], load_entry(run_dir, entries[0])
    seed_everything(int(cfg.seed), bool(cfg.deterministic))  # the server's own initial global model (it chose the seed)
    model = model_from_config(cfg, aux["input_shape"], aux["num_classes"])
    if kind == "fedavg_update":  # a dense update: every coordinate uploaded
        values = torch.cat([tensors[name].flatten().float() for name, _ in model.named_parameters()])
        return entry, model, Upload(indices=torch.arange(len(values)), values=values)
    if "params" in tensors:
        assign_flat_parameters(model, tensors["params"])
    return entry, model, Upload(indices=tensors.get("indices", torch.arange(len(tensors["values"]))), values=tensors["values"])


def upload_figures(cfg, run_dir: Path, index: dict, settings, aux: dict) -> tuple[dict, tuple]:
    """DSSGD uploads / FedAvg updates: iDLG present labels, analytic FC input (first layer dense), restricted gradient inversion."""
    entry, model, upload = _first_upload(cfg, run_dir, index, aux)
    gradients, masks = upload_to_gradients(model, upload, float(cfg.train.lr))
    site_x, site_y = site_train_rows(cfg, entry["partition"])  # evaluator only
    truth = sorted(set(site_y.tolist()))
    found = present_labels(gradients[-1], masks[-1])
    figures = {"upload": {"round": entry["round"], "partition": entry["partition"], "coordinates": int(upload.values.numel())},
               "idlg_present_labels": {"found": found, "true": truth,
                                       "precision": len(set(found) & set(truth)) / len(found) if found else None,
                                       "recall": len(set(found) & set(truth)) / len(truth)}}
    pool = site_x[: int(settings.targets) * 4]
    guess = _best_match_ssim(aux["x"][:4], pool)
    first = next(module for module in model.modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)))
    if isinstance(first, torch.nn.Linear) and first.bias is not None:
        estimate, recovered = analytic_fc_input(gradients[0], gradients[1], masks[0], masks[1])
        image = estimate.reshape(1, *aux["input_shape"])
        figures["analytic_fc"] = {"recovered_share": float(recovered.float().mean()), "best_match_ssim": _best_match_ssim(image, pool), "guess_ssim": guess}
    else:
        figures["analytic_fc"] = {"applies": False, "why": f"model {cfg.model.name} does not start with a dense layer"}
    label = torch.tensor([found[0] if found else int(torch.argmin(gradients[-1]))])
    dummy = invert_gradients(model, gradients, label, aux["input_shape"], masks=masks, iterations=int(settings.inversion_steps))
    dummy = split_inversion.calibrate_to_aux(dummy, aux["x"])
    figures["gradient_inversion"] = {"best_match_ssim": _best_match_ssim(dummy, pool), "guess_ssim": guess,
                                     "note": "one dummy image against an upload that sums a whole local round; scored as its best match among the site's rows, as is the guess"}
    figures["ssim"], figures["guess_ssim"] = figures["gradient_inversion"]["best_match_ssim"], guess
    if figures["analytic_fc"].get("best_match_ssim") is not None:
        figures["ssim"] = max(figures["ssim"], figures["analytic_fc"]["best_match_ssim"])
    nearest = pool[metrics.ssim_per_image(dummy.expand_as(pool), pool, data_range=float(pool.max() - pool.min())).argmax()][None]
    return figures, (nearest, dummy)


def _train_shadow(cfg, settings, input_shape, num_classes: int):
    def train_fn(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = model_from_config(cfg, input_shape, num_classes)
        optimizer = make_optimizer(cfg.train.optimizer, model.parameters(), float(cfg.train.lr), float(cfg.train.momentum))
        train(model, make_loader(x, y, int(cfg.train.batch_size), shuffle=True, seed=seed), optimizer, device=torch.device("cpu"),
              epochs=int(settings.shadow_epochs))
        return model.eval()

    return train_fn


def membership_figures(cfg, run_dir: Path, settings, aux: dict) -> dict:
    """Loss threshold and offline LiRA on the final global model (``checkpoint.pt``): the sites' rows vs public non-members."""
    if cfg.protocol.name in ("split", "ushaped", "semisup"):
        return {"applies": False, "why": "the server holds only its part of the model (the bottom stays with the sites), so it cannot query the whole model"}
    if cfg.protocol.name == "features":
        return {"applies": False, "why": "the server's classifier works on latents, not on the sites' records"}
    checkpoint = load_weights_file(run_dir / "checkpoint.pt")
    model = model_from_config(cfg, aux["input_shape"], aux["num_classes"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    nonmember_x, nonmember_y = aux["nonmember_x"], aux["nonmember_y"]
    members = [site_train_rows(cfg, partition) for partition in range(int(cfg.num_clients))]  # evaluator only
    member_x, member_y = torch.cat([m[0] for m in members]), torch.cat([m[1] for m in members])
    pick = torch.randperm(len(member_y), generator=torch.Generator().manual_seed(0))[: len(nonmember_y)]
    member_x, member_y = member_x[pick], member_y[pick]
    with torch.no_grad():
        loss = membership.membership_report(membership.loss_threshold_scores(model, member_x, member_y),
                                            membership.loss_threshold_scores(model, nonmember_x, nonmember_y))
    shadows = membership.train_shadow_models(_train_shadow(cfg, settings, aux["input_shape"], aux["num_classes"]), aux["x"], aux["y"],
                                             num_shadows=int(settings.shadows))
    with torch.no_grad():
        lira = membership.membership_report(membership.offline_lira_scores(model, shadows, member_x, member_y),
                                            membership.offline_lira_scores(model, shadows, nonmember_x, nonmember_y))
    return {"members": len(member_y), "nonmembers": len(nonmember_y), "loss_threshold": loss, "offline_lira": lira,
            "auc": max(loss["auc"], lira["auc"])}
