"""Helpers shared by the client side of every protocol.

Client state that must outlive one message lives in ``context.state`` (weights as
ArrayRecords, accountant history as ConfigRecord strings): module globals are
shared between virtual clients in simulation and lost in deployment.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.common.constant import SType
from omegaconf import DictConfig

from graftfl.config import to_container
from graftfl.core.codec import npy_array
from graftfl.core.data import raw_from_config
from graftfl.core.denormals import flush_denormals
from graftfl.core.frozen_config import FrozenConfig
from graftfl.core.local_round import train_round
from graftfl.core.meter import train_flops_per_sample
from graftfl.core.models import model_from_config
from graftfl.core.privacy import history_from_json, history_to_json
from graftfl.core.train import deterministic_kernels, resolve_device
from graftfl.core.wire import (
    CONFIG_KEY,
    CONFIG_RECORD,
    NODE_DEVICE,
    NODE_NUM_PARTITIONS,
    NODE_PARTITION_ID,
    NUM_EXAMPLES,
    PRIVACY_HISTORIES,
)

PRIVACY_STATE_KEY = "privacy"
R = TypeVar("R")


class ServerConfigRefused(ValueError):
    """The server's config holds something a site never evaluates (an interpolation or resolver)."""


def refuse_interpolations(data, path: str = "") -> None:
    """Raise :class:`ServerConfigRefused` when any key or string value (recursively) contains ``${``.

    The server sends its config *resolved*; an interpolation left in it could only
    make the site evaluate something (``${oc.env:...}`` reads the site's environment).
    """
    if isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if "${" in str(key):
                raise ServerConfigRefused(f"server-sent config key '{where}' contains '${{': a site never evaluates interpolations or resolvers")
            refuse_interpolations(value, where)
    elif isinstance(data, list):
        for index, value in enumerate(data):
            refuse_interpolations(value, f"{path}[{index}]")
    elif isinstance(data, str) and "${" in data:
        raise ServerConfigRefused(
            f"server-sent config value at '{path}' contains '${{': a site never evaluates interpolations or resolvers "
            "(the server must send its resolved config as plain data)"
        )


_CONFIGS: dict[str, FrozenConfig] = {}  # the server's config JSON -> its parsed, read-only config (a few, newest last)
_CONFIGS_KEPT = 8
_CONFIGS_LOCK = threading.Lock()


def config_of(message: Message) -> FrozenConfig:
    """The resolved run config the server sent with ``message``: plain data, never evaluated here.

    The config is read-only plain data (:class:`~graftfl.core.frozen_config.FrozenConfig`:
    nothing to resolve, a dict read per key instead of OmegaConf's 8-16 µs). Parsing it costs
    about as much as a few local SGD steps of a small model, so a process that handles many
    messages of one run (a simulation worker) parses each distinct config text once.
    """
    record = message.content[CONFIG_RECORD]
    if CONFIG_KEY not in record:
        raise ValueError(f"message '{message.metadata.message_type}' carries no {CONFIG_KEY}")
    text = record[CONFIG_KEY]
    with _CONFIGS_LOCK:
        cached = _CONFIGS.get(text) if isinstance(text, str) else None
    if cached is not None:
        return cached
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ServerConfigRefused(f"{CONFIG_KEY} must be a JSON object, got {type(data).__name__}")
    refuse_interpolations(data)
    cfg = FrozenConfig(data)
    if isinstance(text, str):
        with _CONFIGS_LOCK:
            while len(_CONFIGS) >= _CONFIGS_KEPT:
                _CONFIGS.pop(next(iter(_CONFIGS)), None)
            _CONFIGS[text] = cfg
    return cfg


def partition_id_of(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config (set by the simulation or the SuperNode)."""
    try:
        partition_id = int(context.node_config[NODE_PARTITION_ID])
        num_partitions = int(context.node_config[NODE_NUM_PARTITIONS])
    except KeyError as err:
        raise ValueError("node config needs partition-id and num-partitions (flower-supernode --node-config)") from err
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} must be in [0, num-partitions={num_partitions})")
    return partition_id, num_partitions


def client_device(cfg: DictConfig, context: Context) -> torch.device:
    """The node config's ``device`` (a local fact) wins over the run config's."""
    return resolve_device(str(context.node_config.get(NODE_DEVICE, cfg.device)))


def training_device(cfg: DictConfig, context: Context) -> torch.device:
    """:func:`client_device`, with the kernels and CPU numerics the run asks for set first.

    ``deterministic`` and ``flush_denormal`` are applied by the server in its own process; a Ray
    actor or a deployed ClientApp process trains in another, which must ask torch for itself
    (and the flush flag is per thread: set every time, off as well, since simulated sites of
    several runs may share a thread).
    """
    if cfg.get("deterministic", False):
        deterministic_kernels()
    if not flush_denormals(bool(cfg.get("flush_denormal", False))):
        warnings.warn("flush_denormal=true: this CPU cannot flush denormal floats; the site computes with them", stacklevel=2)
    return client_device(cfg, context)


def local_data(cfg: DictConfig, context: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """This site's training rows (:func:`graftfl.clients.site_data.site_rows`; held-out rows excluded)."""
    from graftfl.clients.site_data import site_rows

    x, y, _, _ = site_rows(cfg, context)
    return x, y


def num_classes_of(cfg: DictConfig, context: Context | None = None) -> int:
    """The number of classes (the declaration's for ``dataset=site``; a registry dataset read at ``data-root``)."""
    from graftfl.clients.site_data import site_num_classes

    if context is None:
        return int(cfg.dataset.num_classes) if str(cfg.dataset.get("name")) == "site" else raw_from_config(cfg.dataset).num_classes
    return site_num_classes(cfg, context)


def local_train(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: DictConfig,
    context: Context,
    seed: int,
    restored_history: str | None = None,
) -> dict[str, float]:
    """One round of local training (:func:`graftfl.core.local_round.train_round`) for a Flower client.

    With ``privacy=dpsgd`` the accountant history is read from and written back to
    ``context.state`` so the returned ``epsilon`` is cumulative over rounds. A
    fresh client process of a resumed run has no state yet: ``restored_history``
    (the history the server checkpointed for this site) is used then.
    """
    flops = train_flops_per_sample(model, x, torch.nn.functional.cross_entropy, y)
    state = context.state.get(PRIVACY_STATE_KEY, ConfigRecord())
    history = history_from_json(state.get("history", restored_history))
    metrics, history = train_round(
        model, x, y, cfg, seed=seed, device=training_device(cfg, context), history=history, show_progress=cfg.progress
    )
    if "epsilon" in metrics:  # DP-SGD ran: keep the accountant for the next round
        context.state[PRIVACY_STATE_KEY] = ConfigRecord({"history": history_to_json(history)})
    metrics["client_flops"] = flops * metrics.pop("samples")
    metrics[NUM_EXAMPLES] = len(y)
    return metrics


_BUILT = threading.local()  # per thread: the module one message leaves for the next


def load_resets(module: torch.nn.Module) -> bool:
    """Whether a strict ``load_state_dict`` sets all of ``module``'s state (no non-persistent buffers, which it skips)."""
    return not any(m._non_persistent_buffers_set for m in module.modules())


def module_holding(key, build: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor], reusable: bool = True) -> torch.nn.Module:
    """``build()``'s module with ``state`` loaded: the one the last call of this thread built, when its ``key`` is the same.

    Building a model initialises its parameters randomly (about a millisecond for LeNet)
    only for ``state`` to overwrite them all; a simulation worker paid that for every
    message. Reused only when ``state`` covers the whole module (every parameter and
    persistent buffer, checked by a strict load; no non-persistent buffers, which a load
    would not reset) and ``reusable`` (not with DP-SGD: Opacus attaches to the module).
    Its gradients are dropped: the previous site's must not meet this one's.
    """
    cached = getattr(_BUILT, "module", None)
    if reusable and cached is not None and cached[0] == key:
        module = cached[1]
    else:
        module = build()
        _BUILT.module = (key, module) if reusable and load_resets(module) else None
    module.load_state_dict(state, strict=True)
    for parameter in module.parameters():
        parameter.grad = None
    return module


_SEEDED = threading.local()  # per thread: the last seeded build, its first weights and torch's random state around it


@dataclass
class _SeededBuild:
    key: tuple
    anchor: object  # keeps alive the objects whose ids are in ``key``
    built: object
    first_weights: dict[str, dict[str, torch.Tensor]]
    rng_before: torch.Tensor
    rng_after: torch.Tensor


def seeded_build(key: tuple, build: Callable[[], R], modules_of: Callable[[R], dict[str, torch.nn.Module]], *, anchor=None,
                 reusable: bool = True) -> R:
    """``build()``, or this thread's last build reset to what ``build()`` would give now.

    A split site builds its part of the model at every message from the run's seed, which
    fixes its first weights and every random draw after them; for LeNet that is about 1.5 ms
    of a 60-image turn's 18. When this thread's last call had the same ``key`` and torch's CPU
    random state was the same before it, a fresh build would repeat that one exactly. The
    last result is then returned with its first weights loaded back into every module of
    ``modules_of(built)`` (strict; gradients dropped, training mode as built) and torch's
    CPU random state set to where that build left it: the same weights and the same later
    draws as ``build()``, without building. ``anchor``: what ``key`` names by ``id``, kept
    alive so that the id is not reused. Not ``reusable`` (DP-SGD: Opacus attaches to the
    modules) or with non-persistent buffers (a load does not reset them): built every time.
    """
    rng_before = torch.get_rng_state()
    cached = getattr(_SEEDED, "entry", None)
    if reusable and cached is not None and cached.key == key and torch.equal(cached.rng_before, rng_before):
        for name, module in modules_of(cached.built).items():
            module.load_state_dict(cached.first_weights[name], strict=True)
            module.train()
            for parameter in module.parameters():
                parameter.grad = None
        torch.set_rng_state(cached.rng_after)
        return cached.built
    built = build()
    modules = modules_of(built)
    keep = reusable and all(load_resets(module) and all(m.training for m in module.modules()) for module in modules.values())
    first = {name: {k: v.detach().clone() for k, v in module.state_dict().items()} for name, module in modules.items()} if keep else {}
    _SEEDED.entry = _SeededBuild(key, anchor, built, first, rng_before, torch.get_rng_state()) if keep else None
    return built


def model_holding(cfg: DictConfig, input_shape, num_classes: int, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The run config's model with ``state`` loaded, built once per thread and architecture (:func:`module_holding`)."""
    key = (json.dumps(to_container(cfg.model), sort_keys=True), tuple(input_shape), int(num_classes))
    return module_holding(key, lambda: model_from_config(cfg, input_shape, num_classes), state, reusable=cfg.privacy.name != "dpsgd")


def privacy_history_of(context: Context) -> str | None:
    """This site's accountant history (JSON), to hand back to the server for checkpoints."""
    state = context.state.get(PRIVACY_STATE_KEY)
    return state.get("history") if state is not None else None


def restored_history_for(message: Message, partition_id: int) -> str | None:
    """The history the server checkpointed for ``partition_id`` (sent on resume), if any."""
    histories = json.loads(message.content[CONFIG_RECORD].get(PRIVACY_HISTORIES, "{}"))
    return histories.get(str(partition_id))


def state_from(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The torch state dict of an ArrayRecord: ``record.to_torch_state_dict()``, decoded faster.

    Flower's decoding parses every array's ``.npy`` header again (a third of a millisecond
    for LeNet's ten arrays, for every message); :func:`graftfl.core.codec.npy_array` parses
    each distinct header once. The tensors are writable copies, as Flower's are.
    """
    return {key: torch.from_numpy(_values(array).copy()) for key, array in record.items()}


def _values(array: Array) -> np.ndarray:
    return npy_array(array.data) if array.stype == SType.NUMPY else array.numpy()


def as_float_list(values) -> list[float]:
    """``values`` flattened into a list of Python floats (for a MetricRecord)."""
    return [float(v) for v in np.asarray(values).reshape(-1)]


def evaluate_global_model(message, context: Context, model: torch.nn.Module) -> dict:
    """Metrics of the global model the server sent (``arrays``) on this site's held-out rows.

    ``model``: a freshly built model of the run's architecture (its weights are replaced).
    """
    from graftfl.clients.site_data import held_out_metrics, site_rows

    cfg = config_of(message)
    _, _, x, y = site_rows(cfg, context)
    if y is None:
        raise ValueError(f"{message.metadata.message_type}: this run evaluates at the server (eval.where=server); the site holds nothing out")
    model.load_state_dict(state_from(message.content["arrays"]))
    return {**held_out_metrics(model, x, y, cfg, client_device(cfg, context)), NODE_PARTITION_ID: int(context.node_config[NODE_PARTITION_ID])}
