"""The protocol contract and the one registry that loads protocols and pre-training phases.

Everything that needs a protocol -- config validation, the ServerApp, the
ClientApp and the ``graftfl`` command -- goes through :func:`load_protocol`,
:func:`load_client_protocol` and :func:`protocol_commands`, in the way Opacus
creates accountants with ``register_accountant`` / ``create_accountant``.
The registry maps names to *module paths* and imports lazily, so importing
this module imports neither Flower nor torch (``graftfl.config`` needs it).

Adding a protocol
-----------------
1. ``conf/protocol/<name>.yaml`` with ``name: <name>`` and the protocol's keys.
2. ``graftfl/strategies/<name>.py`` (the server side) ending in::

       SERVER_PROTOCOL = ServerProtocol(name="<name>", run=run, validate_config=validate_config)

   ``run(grid, run: ServerRun) -> dict | None`` runs the remaining rounds and
   returns extra summary fields; ``validate_config(cfg)`` raises ``ValueError``
   naming what is valid (write one that does nothing when there is nothing to
   check). ``federated=False`` for a baseline that runs without Flower
   (``grid`` is ``None`` then). ``add_commands`` is not a field: CLI commands
   are named by module path in the registry so that ``graftfl --help`` imports
   no protocol.
3. ``graftfl/clients/<name>.py`` (the site side) ending in::

       CLIENT_PROTOCOL = ClientProtocol(name="<name>", train=train, evaluate=evaluate)

   Each handler ``(message, context) -> Message`` answers the Flower messages
   ``<category>.<name>``.
4. One ``register_protocol("<name>", server=..., client=...)`` line in
   :data:`BUILTIN_PROTOCOLS` below (or a call from your own package).

:func:`load_protocol` checks all of it when the protocol is loaded -- a
missing or misspelt part (``validate_confg``, no ``run``, a handler that is not
callable, a name that does not match) raises :class:`ProtocolError` naming the
module and what the contract needs, instead of being skipped.

Pre-training phases
-------------------
A phase (dedup, federated normalization, ...) runs once, before any protocol's
own rounds, for every federated protocol. A run lists its phases in the config
key ``phases`` (``phases=[dedup]``), in order. Register one with
:func:`register_phase`; its server side is a :class:`ServerPhase` whose
``run(grid, run, node_ids) -> dict`` sends ``query.<phase>`` messages and
returns summary fields (written to ``summary.json`` under ``phases.<name>``);
its site side is a :class:`ClientPhase` whose ``query`` handler answers them
and may keep results for the protocol's later messages in
``context.state[phase_state_key(name)]`` (see :func:`phase_state_key`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

SERVER_ATTRIBUTE = "SERVER_PROTOCOL"
CLIENT_ATTRIBUTE = "CLIENT_PROTOCOL"
SERVER_PHASE_ATTRIBUTE = "SERVER_PHASE"
CLIENT_PHASE_ATTRIBUTE = "CLIENT_PHASE"
from graftfl.protocol_contract import (  # noqa: F401  (the contract is part of this module's API)
    HANDLER_CATEGORIES,
    ClientPhase,
    ClientProtocol,
    ProtocolError,
    ServerPhase,
    ServerProtocol,
    require_callable as _require_callable,
    require_name as _require_name,
)


@dataclass
class _Entry:
    server: Any  # module path (str) or a declaration object
    client: Any = None
    commands: str | None = None
    loaded: dict = field(default_factory=dict)


_PROTOCOLS: dict[str, _Entry] = {}
_PHASES: dict[str, _Entry] = {}


def register_protocol(name: str, server: str | ServerProtocol, client: str | ClientProtocol | None = None, commands: str | None = None) -> None:
    """Make protocol ``name`` loadable.

    Parameters
    ----------
    name : str
        ``protocol.name``; a Python identifier, not also a phase name.
    server : str or ServerProtocol
        Module path whose ``SERVER_PROTOCOL`` is the server side (imported on first
        load), or the declaration itself.
    client : str or ClientProtocol, optional
        The same for the site side (``CLIENT_PROTOCOL``); required for a federated protocol.
    commands : str, optional
        Module path of a module with ``add_commands(subparsers)`` adding ``graftfl`` commands.
    """
    _require_name(f"register_protocol('{name}')", name)
    if name in _PHASES:
        raise ProtocolError(f"register_protocol('{name}'): a phase already has that name")
    _PROTOCOLS[name] = _Entry(server, client, commands)


def register_phase(name: str, server: str | ServerPhase, client: str | ClientPhase | None = None) -> None:
    """Make pre-training phase ``name`` loadable (``SERVER_PHASE`` / ``CLIENT_PHASE`` in the modules)."""
    _require_name(f"register_phase('{name}')", name)
    if name in _PROTOCOLS:
        raise ProtocolError(f"register_phase('{name}'): a protocol already has that name")
    _PHASES[name] = _Entry(server, client)


def unregister(name: str) -> None:
    """Forget protocol or phase ``name`` (for tests that register their own)."""
    _PROTOCOLS.pop(name, None)
    _PHASES.pop(name, None)


def protocol_names() -> list[str]:
    """Names of the registered protocols."""
    return sorted(_PROTOCOLS)


def phase_names() -> list[str]:
    """Names of the registered pre-training phases."""
    return sorted(_PHASES)


def phase_state_key(name: str) -> str:
    """The ``context.state`` key under which a site keeps phase ``name``'s results."""
    return f"phase-{name}"


def _declaration(kind: str, name: str, source: Any, attribute: str, expected: type):
    """The declaration object behind ``source`` (a module path or the object), checked against the contract."""
    where = f"{kind} '{name}'"
    if isinstance(source, str):
        try:
            module = importlib.import_module(source)
        except ModuleNotFoundError as err:
            if err.name and source.startswith(err.name):
                raise ProtocolError(f"{where}: module '{source}' does not exist") from err
            raise
        except (ProtocolError, TypeError, NameError) as err:  # a missing or misspelt part of the declaration
            raise ProtocolError(f"{where}: module '{source}' breaks the contract: {err}") from err
        if not hasattr(module, attribute):
            raise ProtocolError(f"{where}: module '{source}' defines no {attribute} = {expected.__name__}(...) (see graftfl.protocols)")
        declared, where = getattr(module, attribute), f"{where} ({source}.{attribute})"
    else:
        declared = source
    if not isinstance(declared, expected):
        raise ProtocolError(f"{where}: expected a {expected.__name__}, got {type(declared).__name__}")
    if declared.name != name:
        raise ProtocolError(f"{where}: declares name '{declared.name}' but is registered as '{name}'")
    return declared


def _entry(table: dict[str, _Entry], kind: str, name: str) -> _Entry:
    if name not in table:
        raise ProtocolError(f"unknown {kind} '{name}'; valid: {sorted(table)}")
    return table[name]


def _loaded_part(kind: str, name: str, part: str, attribute: str, expected: type):
    """The checked ``part`` ("server" or "client") of a registered protocol or phase, imported once;
    ``None`` for a site side that is not registered."""
    entry = _entry(_PROTOCOLS if kind == "protocol" else _PHASES, kind, name)
    module_path = getattr(entry, part)
    if module_path is None:
        return None
    if part not in entry.loaded:
        entry.loaded[part] = _declaration(kind, name, module_path, attribute, expected)
    return entry.loaded[part]


def load_protocol(name: str) -> ServerProtocol:
    """The checked server side of protocol ``name`` (imports its strategy module)."""
    server = _loaded_part("protocol", name, "server", SERVER_ATTRIBUTE, ServerProtocol)
    if server.federated and _PROTOCOLS[name].client is None:
        raise ProtocolError(f"protocol '{name}' is federated but registers no client module")
    return server


def load_client_protocol(name: str) -> ClientProtocol | None:
    """The checked site side of protocol ``name``; ``None`` for a protocol without one."""
    return _loaded_part("protocol", name, "client", CLIENT_ATTRIBUTE, ClientProtocol)


def load_phase(name: str) -> ServerPhase:
    """The checked server side of phase ``name``."""
    return _loaded_part("phase", name, "server", SERVER_PHASE_ATTRIBUTE, ServerPhase)


def load_client_phase(name: str) -> ClientPhase | None:
    """The checked site side of phase ``name``; ``None`` when it has none."""
    return _loaded_part("phase", name, "client", CLIENT_PHASE_ATTRIBUTE, ClientPhase)


def client_handlers() -> dict[str, Callable]:
    """``{message type: handler}`` of every registered protocol and phase (what the ClientApp routes)."""
    handlers: dict[str, Callable] = {}
    for name in protocol_names():
        client = load_client_protocol(name)
        if client is not None:
            handlers.update(client.handlers())
    for name in phase_names():
        client = load_client_phase(name)
        if client is not None:
            handlers.update(client.handlers())
    return handlers


def protocol_commands() -> list[Callable]:
    """``add_commands(subparsers)`` of every protocol that adds ``graftfl`` commands (imports only those modules)."""
    adders = []
    for name in protocol_names():
        module_path = _PROTOCOLS[name].commands
        if module_path is None:
            continue
        adder = getattr(importlib.import_module(module_path), "add_commands", None)
        if adder is None:
            raise ProtocolError(f"protocol '{name}': commands module '{module_path}' defines no add_commands(subparsers)")
        _require_callable(f"protocol '{name}' ({module_path})", "add_commands", adder, 1)
        adders.append(adder)
    return adders


# The built-in protocols (conf/protocol/<name>.yaml). Baselines without Flower have no client module.
BUILTIN_PROTOCOLS = {
    "centralized": dict(server="graftfl.strategies.centralized"),
    "standalone": dict(server="graftfl.strategies.standalone"),
    "fedavg": dict(server="graftfl.strategies.fedavg", client="graftfl.clients.fedavg"),
    "split": dict(server="graftfl.strategies.split", client="graftfl.clients.split"),
    "ushaped": dict(server="graftfl.strategies.ushaped", client="graftfl.clients.ushaped"),
    "semisup": dict(server="graftfl.strategies.semisup", client="graftfl.clients.semisup"),
    "dssgd": dict(server="graftfl.strategies.dssgd", client="graftfl.clients.dssgd"),
    "features": dict(server="graftfl.strategies.features", client="graftfl.clients.features", commands="graftfl.commands.features_cli"),
}
# The built-in pre-training phases (which run, and in what order: graftfl.server_app.app.phase_plan).
BUILTIN_PHASES: dict[str, dict] = {
    "dedup": dict(server="graftfl.strategies.dedup", client="graftfl.clients.dedup"),  # dedup=psi
    "normalize": dict(server="graftfl.strategies.normalize", client="graftfl.clients.normalize"),
    "roster": dict(server="graftfl.strategies.roster", client="graftfl.clients.roster"),  # phases=[roster]
}

for _name, _parts in BUILTIN_PROTOCOLS.items():
    register_protocol(_name, **_parts)
for _name, _parts in BUILTIN_PHASES.items():
    register_phase(_name, **_parts)
