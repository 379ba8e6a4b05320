"""Compose, sweep and validate the Hydra config.

The CLI, the simulation and the deployed ServerApp all go through
:func:`compose_config`, so every path ends in the same resolved config.
Errors name the valid choices before any training starts.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf

from graftfl.core.frozen_config import FrozenConfig, plain
from graftfl.core.wire import max_frame_rows
from graftfl.protocols import load_phase, load_protocol, phase_names, protocol_names

GROUPS = ("protocol", "dataset", "model", "privacy", "partition", "dedup", "experiment")


class ConfigError(ValueError):
    """A config value or override is invalid; the message says what is valid."""


def conf_dir() -> Path:
    """The ``conf/`` tree: ``$GRAFTFL_CONF``, else beside the package (also inside a FAB)."""
    env = os.environ.get("GRAFTFL_CONF")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parent
    beside = package.parent / "conf"  # a checkout, or a FAB
    return beside if beside.is_dir() else package / "_conf"  # a wheel install


def group_options(group: str) -> list[str]:
    """The option names of config group ``group`` (the YAML files under ``conf/<group>/``)."""
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _parse(overrides: Iterable[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise ConfigError(str(err)) from err


def _check_group_choices(overrides: Iterable[str]) -> None:
    """Reject an unknown protocol/dataset/... with the list of valid choices."""
    for override in _parse(overrides):
        key = override.key_or_group
        if key in GROUPS:
            values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
            for value in values:
                if value is not None and str(value) not in group_options(key):
                    raise ConfigError(f"unknown {key} '{value}'; valid {key} choices: {group_options(key)}")


def _check_override_keys(overrides: Iterable[str], base: DictConfig) -> None:
    """Reject unknown keys with a message that lists the valid keys at that level."""
    for override in _parse(overrides):
        key = override.key_or_group
        if override.is_add() or override.is_force_add() or key in GROUPS:
            continue  # '+key=value' deliberately adds a key
        parts = key.split(".")
        node, depth = base, 0
        while depth < len(parts) and isinstance(node, DictConfig) and parts[depth] in node:
            node, depth = node[parts[depth]], depth + 1
        if depth < len(parts):  # parts[depth] is the first name that does not exist
            parent = ".".join(parts[:depth])
            valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
            where = f"'{parent}'" if parent else "the top level"
            raise ConfigError(f"unknown config key '{key}'; valid keys at {where}: {valid}")


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except HydraException as err:
        raise ConfigError(str(err)) from err


def compose_config(overrides: Iterable[str] = (), validate_values: bool = True) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra ``overrides`` and validate the result."""
    overrides = list(overrides)
    _check_group_choices(overrides)
    groups_only = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in GROUPS]
    _check_override_keys(overrides, _compose(groups_only))
    cfg = _with_target_epsilon_noise(_compose(overrides))
    if validate_values:
        validate(cfg)
    return cfg


def _with_target_epsilon_noise(cfg: DictConfig) -> DictConfig:
    """``privacy.target_epsilon`` decides the noise: it replaces the default ``noise_multiplier``."""
    if cfg.privacy.name == "dpsgd" and cfg.privacy.get("target_epsilon") is not None:
        cfg.privacy.noise_multiplier = None
    return cfg


def resolve_job_config(overrides: Iterable[str]) -> DictConfig:
    """Compose one job's config; ``resume=runs/<id>`` reuses that run's stored config.

    Plain ``key=value`` overrides given with ``resume`` still apply on top (e.g.
    ``rounds=10`` to extend a finished run); config-group choices do not.
    """
    overrides = list(overrides)
    cfg = compose_config(overrides)
    if not cfg.resume:
        return cfg
    stored = Path(cfg.resume) / "config.yaml"
    if not stored.exists():
        raise ConfigError(f"resume={cfg.resume}: no config.yaml there (not a graftfl run directory)")
    plain = [o for o in overrides if o.split("=", 1)[0] not in (*GROUPS, "resume")]
    resumed = _with_target_epsilon_noise(OmegaConf.merge(OmegaConf.load(stored), OmegaConf.from_dotlist(plain)))
    resumed.resume = cfg.resume
    validate(resumed)  # the stored protocol's own checks, e.g. whether it can resume at all
    return resumed


def expand_sweep(overrides: Iterable[str]) -> list[list[str]]:
    """Expand Hydra sweep syntax (``a=1,2 b=x,y``) into one override list per job.

    Sweeps declared by the composed config's ``sweep`` mapping (set by an
    ``experiment/`` overlay) are expanded too, after the command-line ones.
    """
    overrides = list(overrides)
    parsed = _parse(overrides)
    declared = compose_config([o for o, p in zip(overrides, parsed, strict=True) if not p.is_sweep_override()], validate_values=False).sweep
    axes: list[list[str]] = []
    for text, override in zip(overrides, parsed, strict=True):
        if override.is_sweep_override():
            prefix = text.split("=", 1)[0]
            axes.append([f"{prefix}={value}" for value in override.sweep_string_iterator()])
        else:
            axes.append([text])
    swept = {p.key_or_group for p in parsed}
    for key, values in (declared or {}).items():
        if key not in swept:
            axes.append([f"{key}={value.strip()}" for value in str(values).split(",")])
    return [list(job) for job in itertools.product(*axes)]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: DictConfig) -> None:
    """Range checks shared by every protocol, then the protocol's own checks."""
    _require(cfg.num_clients >= 1, f"num_clients must be >= 1, got {cfg.num_clients}")
    _require(cfg.rounds >= 1, f"rounds must be >= 1, got {cfg.rounds}")
    _require(cfg.train.lr > 0, f"train.lr must be > 0, got {cfg.train.lr}")
    _require(cfg.train.batch_size >= 1, f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
    _require(cfg.train.local_epochs >= 1, f"train.local_epochs must be >= 1, got {cfg.train.local_epochs}")
    _require(cfg.train.local_steps is None or cfg.train.local_steps >= 1, "train.local_steps must be >= 1 or null")
    _require(cfg.train.optimizer in ("sgd", "adam"), f"train.optimizer must be one of ['adam', 'sgd'], got '{cfg.train.optimizer}'")
    _require(
        cfg.device == "auto" or str(cfg.device).split(":")[0] in ("cpu", "cuda"),
        f"device must be auto, cpu, cuda or cuda:N, got '{cfg.device}'",
    )
    for key in ("deterministic", "flush_denormal"):  # bool("false") would be True
        _require(isinstance(cfg.get(key, False), bool), f"{key} must be true or false, got {cfg.get(key)!r}")
    for key, value in _fractions(cfg):
        _require(0 < value <= 1, f"{key} must be in (0, 1], got {value}")
    if cfg.privacy.name == "dpsgd":
        _require(cfg.privacy.max_grad_norm > 0, "privacy.max_grad_norm must be > 0")
        _require(0 < cfg.privacy.delta < 1, "privacy.delta must be in (0, 1)")
        _require(
            cfg.privacy.target_epsilon is not None or (cfg.privacy.noise_multiplier or 0) > 0,
            "privacy=dpsgd needs privacy.noise_multiplier > 0 or privacy.target_epsilon",
        )
    import graftfl.core.autoencoder  # noqa: F401  registers conv_ae in MODELS
    from graftfl.core.partition import PARTITIONERS
    from graftfl.core.models import MODELS

    _require(cfg.partition.name in PARTITIONERS, f"unknown partition '{cfg.partition.name}'; valid: {list(PARTITIONERS)}")
    _require(cfg.model.name in MODELS, f"unknown model '{cfg.model.name}'; valid models: {sorted(MODELS)}")
    _require(cfg.protocol.name in group_options("protocol"), f"unknown protocol '{cfg.protocol.name}'; valid: {group_options('protocol')}")
    _require(cfg.protocol.name in protocol_names(), f"protocol '{cfg.protocol.name}' has a config file but is not registered; registered: {protocol_names()}")
    protocol = load_protocol(cfg.protocol.name)  # a module that breaks the contract fails here, loudly
    _require(str((cfg.get("eval") or {}).get("where", "auto")) in EVAL_WHERE_CHOICES,
             f"eval.where must be one of {list(EVAL_WHERE_CHOICES)}, got '{(cfg.get('eval') or {}).get('where')}'")
    if is_site_dataset(cfg):
        _validate_site_dataset(cfg, protocol.federated)
    _validate_normalization(cfg, protocol.federated)
    _checked(protocol.validate_config, cfg)
    _validate_defences(cfg)
    _validate_phases(cfg, protocol.federated)


# Protocols whose evaluation has always run at the sites (their server holds no whole model).
SITE_EVAL_PROTOCOLS = ("split", "ushaped", "semisup")
EVAL_WHERE_CHOICES = ("auto", "site", "server")
NORMALIZATIONS = ("fixed", "federated")


def is_site_dataset(cfg: DictConfig) -> bool:
    """``dataset=site``: every site reads its own files (node-config ``data-path``); the server none."""
    return str(cfg.dataset.get("name")) == "site"


def eval_where(cfg: DictConfig) -> str:
    """Where a run evaluates: ``site`` (each site on its held-out rows) or ``server`` (the server's test set).

    ``eval.where=auto`` (the default): ``site`` for ``dataset=site`` (the server holds no data)
    and for the split protocols; ``server`` for registry datasets on the other protocols.
    """
    where = str((cfg.get("eval") or {}).get("where", "auto") or "auto")
    if where != "auto":
        return where
    return "site" if is_site_dataset(cfg) or cfg.protocol.name in SITE_EVAL_PROTOCOLS else "server"


def normalization_of(cfg: DictConfig) -> str:
    """``dataset.normalization``: ``federated`` (the normalize phase over the sites' own training rows) or
    ``fixed`` (``dataset.mean`` / ``dataset.std``); the default, when a config has no such key, is ``fixed``."""
    return str(cfg.dataset.get("normalization") or "fixed")


def _validate_normalization(cfg: DictConfig, federated: bool) -> None:
    """``dataset.normalization`` for every dataset: a valid name, and ``federated`` only where sites run."""
    _require(normalization_of(cfg) in NORMALIZATIONS, f"dataset.normalization must be one of {list(NORMALIZATIONS)}, got '{normalization_of(cfg)}'")
    _require(normalization_of(cfg) != "federated" or federated,
             f"dataset.normalization=federated needs a federated protocol (the sites compute it); protocol '{cfg.protocol.name}' "
             "runs without sites: use dataset.normalization=fixed")
    if is_site_dataset(cfg):
        return  # checked against the declared channels in _validate_site_dataset
    for key in ("mean", "std"):
        values = cfg.dataset.get(key)
        _require(values is None or (OmegaConf.is_list(values) and len(values) > 0),
                 f"dataset.{key} must be a list with one value or one per channel (or null), got {values}")
    _require((cfg.dataset.get("mean") is None) == (cfg.dataset.get("std") is None),
             "dataset.mean and dataset.std go together: set both (or neither: images stay in [0, 1])")
    _require(not any(float(v) <= 0 for v in (cfg.dataset.get("std") or [])), "dataset.std values must be > 0")


def _validate_site_dataset(cfg: DictConfig, federated: bool) -> None:
    from graftfl.core.sitedata import SiteDataError, SiteDeclaration

    _require(federated, f"dataset=site needs a federated protocol: protocol '{cfg.protocol.name}' would pool the sites' data at the server")
    try:
        SiteDeclaration.from_config(cfg.dataset)
    except SiteDataError as err:
        raise ConfigError(str(err)) from err
    _require(eval_where(cfg) == "site", "dataset=site: the server holds no test set; use eval.where=site (or auto)")
    for key in ("mean", "std"):
        values = cfg.dataset.get(key)
        _require(values is None or len(values) == int(cfg.dataset.input_shape[0]),
                 f"dataset.{key} needs one value per channel ({cfg.dataset.input_shape[0]}), got {values}")
    _require(not any(float(v) <= 0 for v in (cfg.dataset.get("std") or [])), "dataset.std values must be > 0")


def _validate_defences(cfg: DictConfig) -> None:
    """The ``defence`` block: valid values, each key only for the protocols it applies to (named in the error)."""
    from graftfl.core.defences import DEFENCE_PROTOCOLS, SPLIT_PROTOCOLS, DefenceConfig

    try:
        defences = DefenceConfig.from_config(cfg)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err
    name = cfg.protocol.name
    for key in defences.enabled():
        valid = DEFENCE_PROTOCOLS[key]
        why = " (with ushaped the labels never leave the site)" if key == "label_rr_epsilon" and name == "ushaped" else ""
        _require(name in valid, f"defence.{key} applies to protocols {list(valid)}, not protocol '{name}'{why}; leave it at its default")
    if cfg.privacy.name == "dpsgd" and name in SPLIT_PROTOCOLS:
        # dCor couples the rows of a batch: a per-sample clip no longer bounds one record's influence.
        _require(defences.nopeek == 0, "defence.nopeek cannot be combined with privacy=dpsgd: the distance-correlation term couples "
                 "the rows of a batch, so DP-SGD's per-sample clipping would not bound one record's influence")
        _require_poisson_batches_fit(cfg)


def _require_poisson_batches_fit(cfg: DictConfig) -> None:
    """DP-SGD draws Poisson batches; the split data plane takes at most max(train, eval) batch size rows per frame."""
    from scipy.stats import poisson

    expected, cap = int(cfg.train.batch_size), max_frame_rows(cfg)
    _require(float(poisson.sf(cap, expected)) < 1e-9,
             f"privacy=dpsgd draws Poisson batches of train.batch_size={expected} rows on average, and the data plane refuses a "
             f"frame of more than max(train.batch_size, eval.batch_size)={cap} rows; raise eval.batch_size (e.g. to {4 * expected + 64})")


def _checked(check, cfg: DictConfig) -> None:
    """Run a protocol's or phase's ``validate_config``; its ``ValueError`` becomes a :class:`ConfigError`."""
    try:
        check(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _validate_phases(cfg: DictConfig, federated: bool) -> None:
    """The run's phases (``phases`` and those its groups add, e.g. ``dedup=psi``): registered names,
    each once, only for a protocol that runs through Flower."""
    phases = list(cfg.get("phases") or [])
    for name in phases:
        _require(isinstance(name, str) and name in phase_names(), f"unknown phase '{name}' in phases; valid phases: {phase_names()}")
    _require(len(set(phases)) == len(phases), f"phases lists a phase twice: {phases}")
    # The phases config groups add (graftfl.server_app.app.phase_plan orders them; config sits below server_app).
    added = ["dedup"] if (cfg.get("dedup") or {}).get("name") == "psi" else []
    _require(not set(added) & set(phases), f"phases={phases} repeats a phase the config already adds ({added}); "
             "dedup runs with dedup=psi, not by listing it in phases")
    planned = added + phases
    _require(not planned or federated, f"pre-training phases {planned} (from phases and dedup=psi) need a federated protocol; "
             f"protocol '{cfg.protocol.name}' runs without sites")
    for name in planned:
        phase = load_phase(name)
        if phase.validate_config is not None:
            _checked(phase.validate_config, cfg)


def _fractions(cfg: DictConfig):
    """Every ``fraction_*`` / ``theta_*`` value of the protocol group."""
    for key, value in cfg.protocol.items():
        if (key.startswith("fraction") or key.startswith("theta")) and value is not None:
            yield f"protocol.{key}", float(value)


def to_yaml(cfg: DictConfig) -> str:
    """The config as YAML with interpolations resolved."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_container(cfg: DictConfig | FrozenConfig) -> dict:
    """The config as plain dicts and lists with interpolations resolved (a site's :class:`FrozenConfig` has none)."""
    if isinstance(cfg, FrozenConfig):
        return plain(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def from_container(data: dict) -> DictConfig:
    """A config from plain dicts and lists (the inverse of :func:`to_container`)."""
    return OmegaConf.create(data)
