"""``graftfl audit --run runs/<id>``: what an honest-but-curious server recovers from a recorded run.

Reads the run's resolved ``config.yaml`` and its recording (``audit.record=true``, see
:mod:`graftfl.audit.record`), runs the attacks that fit the run's protocol
(:mod:`graftfl.commands.audit_attacks`) and writes ``privacy.json``, ``privacy.png``
(originals beside reconstructions) and one summary line. A run that recorded nothing is
refused with a message that names ``audit.record``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from graftfl.audit.record import load_index

logger = logging.getLogger(__name__)

PRIVACY_FILE = "privacy.json"
PICTURE_FILE = "privacy.png"
DEFAULT_SETTINGS = {"aux_size": 400, "targets": 64, "decoder_epochs": 30, "unsplit_rounds": 20, "unsplit_tv_weight": 0.0, "inversion_steps": 200,
                    "shadows": 4, "shadow_epochs": 10}
EVALUATOR_NOTE = ("Attacks see only what the server recorded, the models it holds and the auxiliary data. To score them, the "
                  "evaluator re-derives the sites' rows from the run's config (the site's seeded partition and batch order); "
                  "that is the evaluator's privilege, not the attacker's.")


class NothingRecorded(RuntimeError):
    """The run has no recording: it ran without ``audit.record=true``."""


def _settings(cfg, overrides: list[str]):
    settings = OmegaConf.merge(OmegaConf.create(DEFAULT_SETTINGS), cfg.get("audit") or {})
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.removeprefix("audit.")
        if key not in DEFAULT_SETTINGS or not value:
            raise ValueError(f"unknown audit setting '{override}'; valid: {', '.join(f'audit.{k}=<number>' for k in DEFAULT_SETTINGS)}")
        try:
            settings[key] = type(DEFAULT_SETTINGS[key])(value)
        except ValueError as err:
            raise ValueError(f"audit.{key} must be a {type(DEFAULT_SETTINGS[key]).__name__}, got '{value}'") from err
    return settings


def _epsilon(run_dir: Path) -> float | None:
    """The run's cumulative ε when DP was on (the last ``epsilon`` in metrics.jsonl), else None."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    values = [json.loads(line).get("epsilon") for line in path.read_text().splitlines() if line.strip()]
    values = [v for v in values if v is not None]
    return float(values[-1]) if values else None


def audit_run(run_dir: Path | str, overrides: list[str] = ()) -> dict:
    """Audit one run directory; writes ``privacy.json`` and ``privacy.png`` there and returns the report.

    Raises
    ------
    NothingRecorded
        The run recorded nothing (it ran without ``audit.record=true``).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    index = load_index(run_dir)
    if index is None or not (index["entries"] or set(index["pointers"]) - {"final_model"}):
        raise NothingRecorded(f"{run_dir} recorded nothing for the audit: run it again with audit.record=true "
                              "(e.g. graftfl sim ... audit.record=true), then graftfl audit --run <run dir>")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    settings = _settings(cfg, list(overrides))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is many times faster than two on a loaded machine
    try:
        return _audit(run_dir, cfg, index, settings)
    finally:
        torch.set_num_threads(threads)


def _audit(run_dir: Path, cfg, index: dict, settings) -> dict:
    # the attack stack (scikit-learn, scikit-image, the clients' data code) loads only when an audit runs
    from graftfl.commands import audit_attacks as attacks
    from graftfl.commands import audit_latents as latents
    from graftfl.commands.audit_data import auxiliary_data

    torch.manual_seed(0)
    started = time.monotonic()
    aux = auxiliary_data(cfg, int(settings.aux_size))
    protocol = cfg.protocol.name
    report: dict = {
        "run": str(run_dir), "protocol": protocol, "dataset": cfg.dataset.name, "model": cfg.model.name,
        "auxiliary_data": {"source": aux["source"], "size": aux["size"], "nonmembers": aux["nonmembers"]},
        "evaluator": EVALUATOR_NOTE,
        "recording": {k: index[k] for k in ("bytes", "max_bytes", "truncated", "dropped")} | {"entries": len(index["entries"])},
        "settings": OmegaConf.to_container(settings),
        "attacks": {},
    }
    found, images = report["attacks"], None
    if protocol in ("split", "semisup", "ushaped"):
        kind = "forward" if protocol == "ushaped" else "train"
        found["inversion"], images = _attempt(attacks.split_inversion_figures, cfg, run_dir, index, settings, aux, kind, pictured=True)
        if protocol == "ushaped":
            found["label_leakage"] = _attempt(attacks.ushaped_label_figures, cfg, run_dir, index, settings)
        else:
            found["label_leakage"] = _attempt(latents.split_label_figures, cfg, run_dir, index)
    elif protocol in ("dssgd", "fedavg"):
        found["inversion"], images = _attempt(attacks.upload_figures, cfg, run_dir, index, settings, aux, pictured=True)
    elif protocol == "features":
        found["inversion"], images = _attempt(latents.features_figures, cfg, run_dir, index, settings, aux, pictured=True)
    found["membership"] = _attempt(attacks.membership_figures, cfg, run_dir, settings, aux)
    report["summary"] = summary_figures(report, run_dir)
    report["seconds"] = round(time.monotonic() - started, 1)
    if images is not None:
        report["picture"] = PICTURE_FILE
        write_picture(run_dir / PICTURE_FILE, *images, title=f"{protocol} on {cfg.dataset.name}: originals (top) and reconstructions (bottom)")
    (run_dir / PRIVACY_FILE).write_text(json.dumps(report, indent=1, default=float))
    return report


def _attempt(attack, *args, pictured: bool = False):
    """Run one attack; when the recording cannot support it (:class:`NotAuditable`), say why in its place and go on.

    ``pictured``: the attack returns ``(figures, images)``; a skipped one gives ``(why, None)``.
    """
    from graftfl.commands.audit_data import NotAuditable

    try:
        return attack(*args)
    except NotAuditable as err:
        logger.warning("graftfl audit: %s skipped: %s", attack.__name__, err)
        failed = {"applies": False, "why": str(err)}
        return (failed, None) if pictured else failed


def summary_figures(report: dict, run_dir: Path) -> dict:
    """The figures the privacy table reads: accuracy, inversion SSIM (and its guess), label AUC, membership AUC, ε."""
    summary_path = run_dir / "summary.json"
    run_summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    found = report["attacks"]
    inversion, labels, member = found.get("inversion", {}), found.get("label_leakage", {}), found.get("membership", {})
    return {
        "accuracy": run_summary.get("accuracy"),
        "inversion_ssim": inversion.get("ssim"),
        "inversion_guess_ssim": inversion.get("guess_ssim"),
        "label_auc": labels.get("auc"),
        "membership_auc": member.get("auc"),
        "epsilon": _epsilon(run_dir),
    }


def summary_line(report: dict) -> str:
    """One line with the figures, ``n/a`` where an attack does not apply."""
    def show(value, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    s = report["summary"]
    return (f"privacy: {report['protocol']} on {report['dataset']}: accuracy {show(s['accuracy'])}, inversion SSIM {show(s['inversion_ssim'])} "
            f"(random guess {show(s['inversion_guess_ssim'])}), label AUC {show(s['label_auc'])}, membership AUC {show(s['membership_auc'])}, "
            f"epsilon {show(s['epsilon'], 2)} -> {Path(report['run']) / PRIVACY_FILE}")


def write_picture(path: Path, originals: torch.Tensor, reconstructions: torch.Tensor, title: str, count: int = 8) -> None:
    """Originals (top row) beside their reconstructions (bottom row), each image scaled on its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(count, len(originals), len(reconstructions))
    figure, axes = plt.subplots(2, count, figsize=(1.3 * count, 3), squeeze=False)
    for column in range(count):
        for row, images in enumerate((originals, reconstructions)):
            image = images[column].detach().float()
            image = image.permute(1, 2, 0) if image.shape[0] == 3 else image[0]
            axes[row][column].imshow(image.numpy(), cmap=None if image.dim() == 3 else "gray")
            axes[row][column].axis("off")
    figure.suptitle(title, fontsize=8)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def cmd_audit(args: argparse.Namespace) -> int:
    """``graftfl audit --run runs/<id> [audit.key=n ...]``: run the attacks, write privacy.json, print the summary line."""
    from graftfl.commands.audit_data import NotAuditable

    try:
        report = audit_run(args.run, args.settings)
    except (NothingRecorded, NotAuditable, FileNotFoundError, ValueError) as err:
        print(f"graftfl audit: {err}", file=sys.stderr)
        return 2
    print(summary_line(report), flush=True)
    return 0


def add_command(commands) -> None:
    """Register ``graftfl audit`` on the ``graftfl`` subcommands."""
    audit = commands.add_parser("audit", help="privacy audit of a recorded run (needs audit.record=true)",
                                description="Run the attacks that fit the run's protocol on what its server recorded; writes privacy.json and privacy.png.")
    audit.add_argument("--run", required=True, help="the run directory, runs/<run-id>")
    audit.add_argument("settings", nargs="*", help="attack budgets, e.g. audit.unsplit_rounds=10 audit.shadows=2")
    audit.set_defaults(handler=cmd_audit)
