"""The protocol contract: the declarations a protocol's or phase's modules end with.

:mod:`graftfl.protocols` (the registry) loads modules and checks that they
declare one of these; each declaration checks its own parts when it is created,
so a misspelt or missing part fails loudly with :class:`ProtocolError`.
Standard library only, like the registry.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

HANDLER_CATEGORIES = ("train", "evaluate", "query")


class ProtocolError(RuntimeError):
    """A protocol or phase is unknown or its module breaks the contract; the message says what is missing."""


def require_callable(owner: str, part: str, value: Any, arity: int) -> None:
    """Raise :class:`ProtocolError` unless ``value`` is callable with ``arity`` positional arguments."""
    if not callable(value):
        raise ProtocolError(f"{owner}: '{part}' must be a callable taking {arity} argument(s), got {value!r}")
    try:
        inspect.signature(value).bind(*range(arity))
    except TypeError as err:
        raise ProtocolError(f"{owner}: '{part}' must accept {arity} positional argument(s): {err}") from err
    except ValueError:  # builtins without a signature: trust them
        pass


def require_name(owner: str, name: str) -> None:
    """Raise :class:`ProtocolError` unless ``name`` can be a Flower message action."""
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
        require_name(owner, self.name)
        require_callable(owner, "run", self.run, 2)
        require_callable(owner, "validate_config", self.validate_config, 1)
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
        require_name(owner, self.name)
        if not self.handlers():
            raise ProtocolError(f"{owner}: needs at least one handler among {list(HANDLER_CATEGORIES)}")
        for category, handler in self.handlers().items():
            require_callable(owner, category, handler, 2)

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
        require_name(owner, self.name)
        require_callable(owner, "run", self.run, 3)
        if self.validate_config is not None:
            require_callable(owner, "validate_config", self.validate_config, 1)


@dataclass(frozen=True)
class ClientPhase:
    """The site side of a pre-training phase: ``query(message, context) -> Message`` answers ``query.<name>``."""

    name: str
    query: Callable[[Any, Any], Any]

    def __post_init__(self) -> None:
        owner = f"ClientPhase '{self.name}'"
        require_name(owner, self.name)
        require_callable(owner, "query", self.query, 2)

    def handlers(self) -> dict[str, Callable]:
        """The ClientApp message handlers of this phase, by message type."""
        return {f"query.{self.name}": self.query}
