"""A run config as a site reads it: plain data, read-only, with attribute access.

The server sends its resolved config as JSON (:func:`graftfl.clients.utils.config_of`). An
OmegaConf ``DictConfig`` of it took 8-16 µs per read (at every level: its node, interpolation
and missing-value checks), and one client message reads its config 40 to 75 times: about half
a millisecond of a 60-image LeNet round at a site. A :class:`FrozenConfig` reads a dict.

It has nothing to resolve (a site never evaluates interpolations), it cannot be changed (one
object serves every message of a run in a simulation worker) and it answers as a read-only
``DictConfig`` does: attribute and item access, ``get``, ``in``, iteration, ``dict(...)``,
``==``; a missing key is an ``AttributeError`` / ``KeyError`` that names the keys there are.
Lists become tuples.
"""

from __future__ import annotations

from collections.abc import Mapping


class ReadOnlyConfig(TypeError):
    """A write to a :class:`FrozenConfig`."""


class FrozenConfig(Mapping):
    """Read-only mapping of plain config data (nested mappings are FrozenConfigs, lists tuples).

    Parameters
    ----------
    data : Mapping
        Plain data: mappings, lists, tuples and scalars (as ``json.loads`` returns them).
    """

    __slots__ = ("_values",)

    def __init__(self, data: Mapping):
        object.__setattr__(self, "_values", {key: frozen(value) for key, value in data.items()})

    def __getattr__(self, name: str):
        try:
            return object.__getattribute__(self, "_values")[name]
        except (KeyError, AttributeError):
            if name.startswith("__") or name == "_values":  # copy and pickle probe for optional methods
                raise AttributeError(name) from None
            raise AttributeError(f"config key '{name}' is missing; keys here: {sorted(self._values)}") from None

    def __getitem__(self, key):
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __setattr__(self, name: str, value) -> None:
        raise ReadOnlyConfig(f"the run config is read-only (tried to set '{name}')")

    def __delattr__(self, name: str) -> None:
        raise ReadOnlyConfig(f"the run config is read-only (tried to delete '{name}')")

    def __reduce__(self):
        return FrozenConfig, (plain(self),)

    def __repr__(self) -> str:
        return f"FrozenConfig({plain(self)!r})"


def frozen(value):
    """``value`` with every mapping a :class:`FrozenConfig` and every list a tuple."""
    if isinstance(value, Mapping):
        return value if isinstance(value, FrozenConfig) else FrozenConfig(value)
    if isinstance(value, (list, tuple)):
        return tuple(frozen(item) for item in value)
    return value


def plain(value):
    """The inverse of :func:`frozen`: dicts and lists (for JSON, OmegaConf or a copy to change)."""
    if isinstance(value, FrozenConfig):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [plain(item) for item in value]
    return value
