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
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

SERVER_ATTRIBUTE = "SERVER_PROTOCOL"
CLIENT_ATTRIBUTE = "CLIENT_PROTOCOL"
SERVER_PHASE_ATTRIBUTE = "SERVER_PHASE"
CLIENT_PHASE_ATTRIBUTE = "CLIENT_PHASE"
HANDLER_CATEGORIES = ("train", "evaluate", "query")


class ProtocolError(RuntimeError):
    """A protocol or phase is unknown or its module breaks the contract; the message says what is missing."""


def _require_callable(owner: str, part: str, value: Any, arity: int) -> None:
    """Raise :class:`ProtocolError` unless ``value`` is callable with ``arity`` positional arguments."""
    if not callable(value):
        raise ProtocolError(f"{owner}: '{part}' must be a callable taking {arity} argument(s), got {value!r}")
    try:
        inspect.signature(value).bind(*range(arity))
    except TypeError as err:
        raise ProtocolError(f"{owner}: '{part}' must accept {arity} positional argument(s): {err}") from err
    except ValueError:  # builtins without a signature: trust them
        pass


def _require_name(owner: str, name: str) -> None:
    # Flower routes "<category>.<action>" and requires the action to be an identifier.
    if not isinstance(name, str) or not name.isidentifier():
        raise ProtocolError(f"{owner}: name must be a Python identifier (Flower message types are '<category>.<name>'), got {name!r}")


@dataclass(frozen=True)
class ServerProtocol:
    """The server side of a protocol: what ``graftfl/strategies/<name>.py`` declares as ``SERVER_PROTOCOL``.

    Parameters
    ----------
    name : str
        The protocol name (``protocol.name`` in the config).
    run : callable
        ``run(grid, run: ServerRun) -> dict | None``: the remaining rounds; extra summary fields.
    validate_config : callable
        ``validate_config(cfg)``: raise ``ValueError`` naming what is valid.
    federated : bool
        ``False`` for baselines that run without Flower (``grid`` is ``None``).
    """

    name: str
    run: Callable[[Any, Any], dict | None]
    validate_config: Callable[[Any], None]
    federated: bool = True

    def __post_init__(self) -> None:
        owner = f"ServerProtocol '{self.name}'"
        _require_name(owner, self.name)
        _require_callable(owner, "run", self.run, 2)
        _require_callable(owner, "validate_config", self.validate_config, 1)
        if not isinstance(self.federated, bool):
            raise ProtocolError(f"{owner}: 'federated' must be True or False, got {self.federated!r}")


@dataclass(frozen=True)
class ClientProtocol:
    """The site side of a protocol: what ``graftfl/clients/<name>.py`` declares as ``CLIENT_PROTOCOL``.

    Each handler ``(message, context) -> Message`` answers ``<category>.<name>``;
    at least one is required.
    """

    name: str
    train: Callable[[Any, Any], Any] | None = None
    evaluate: Callable[[Any, Any], Any] | None = None
    query: Callable[[Any, Any], Any] | None = None

    def __post_init__(self) -> None:
        owner = f"ClientProtocol '{self.name}'"
        _require_name(owner, self.name)
        if not self.handlers():
            raise ProtocolError(f"{owner}: needs at least one handler among {list(HANDLER_CATEGORIES)}")
        for category, handler in self.handlers().items():
            _require_callable(owner, category, handler, 2)

    def handlers(self) -> dict[str, Callable]:
        """``{message type: handler}``, e.g. ``{"train.split": train}``."""
        return {f"{category}.{self.name}": getattr(self, category) for category in HANDLER_CATEGORIES if getattr(self, category) is not None}


@dataclass(frozen=True)
class ServerPhase:
    """The server side of a pre-training phase.

    ``run(grid, run: ServerRun, node_ids: list[int]) -> dict`` sends the sites
    ``query.<name>`` messages and returns summary fields. ``validate_config``
    (optional) checks the config when a run lists the phase.
    """

    name: str
    run: Callable[[Any, Any, list[int]], dict | None]
    validate_config: Callable[[Any], None] | None = None

    def __post_init__(self) -> None:
        owner = f"ServerPhase '{self.name}'"
        _require_name(owner, self.name)
        _require_callable(owner, "run", self.run, 3)
        if self.validate_config is not None:
            _require_callable(owner, "validate_config", self.validate_config, 1)


@dataclass(frozen=True)
class ClientPhase:
    """The site side of a pre-training phase: ``query(message, context) -> Message`` answers ``query.<name>``."""

    name: str
    query: Callable[[Any, Any], Any]

    def __post_init__(self) -> None:
        owner = f"ClientPhase '{self.name}'"
        _require_name(owner, self.name)
        _require_callable(owner, "query", self.query, 2)

    def handlers(self) -> dict[str, Callable]:
        """The ClientApp message handlers of this phase, by message type."""
        return {f"query.{self.name}": self.query}


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


def load_protocol(name: str) -> ServerProtocol:
    """The checked server side of protocol ``name`` (imports its strategy module)."""
    entry = _entry(_PROTOCOLS, "protocol", name)
    if "server" not in entry.loaded:
        server = _declaration("protocol", name, entry.server, SERVER_ATTRIBUTE, ServerProtocol)
        if server.federated and entry.client is None:
            raise ProtocolError(f"protocol '{name}' is federated but registers no client module")
        entry.loaded["server"] = server
    return entry.loaded["server"]


def load_client_protocol(name: str) -> ClientProtocol | None:
    """The checked site side of protocol ``name``; ``None`` for a protocol without one."""
    entry = _entry(_PROTOCOLS, "protocol", name)
    if entry.client is None:
        return None
    if "client" not in entry.loaded:
        entry.loaded["client"] = _declaration("protocol", name, entry.client, CLIENT_ATTRIBUTE, ClientProtocol)
    return entry.loaded["client"]


def load_phase(name: str) -> ServerPhase:
    """The checked server side of phase ``name``."""
    entry = _entry(_PHASES, "phase", name)
    if "server" not in entry.loaded:
        entry.loaded["server"] = _declaration("phase", name, entry.server, SERVER_PHASE_ATTRIBUTE, ServerPhase)
    return entry.loaded["server"]


def load_client_phase(name: str) -> ClientPhase | None:
    """The checked site side of phase ``name``; ``None`` when it has none."""
    entry = _entry(_PHASES, "phase", name)
    if entry.client is None:
        return None
    if "client" not in entry.loaded:
        entry.loaded["client"] = _declaration("phase", name, entry.client, CLIENT_PHASE_ATTRIBUTE, ClientPhase)
    return entry.loaded["client"]


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
}

for _name, _parts in BUILTIN_PROTOCOLS.items():
    register_protocol(_name, **_parts)
for _name, _parts in BUILTIN_PHASES.items():
    register_phase(_name, **_parts)
