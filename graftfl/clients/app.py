"""The one ClientApp: routes ``<category>.<name>`` messages to the protocols' and phases' handlers.

The handlers come from the registry (:mod:`graftfl.protocols`): each protocol's
``graftfl/clients/<protocol>.py`` declares a ``ClientProtocol`` and each
pre-training phase a ``ClientPhase``, so adding either touches no other protocol.
Every handler is wrapped by :func:`graftfl.clients.guard.guarded`: a failure's text
returns without the site's secrets.

A protocol's client module is imported when the first message for it arrives, not
when the app is built. In deployment every message runs in a fresh ``flwr-clientapp``
process that imports this module, so importing all protocols (and what they import)
for every message would cost seconds that no message needs. A module that breaks the
contract fails that first message, with the registry's error as the reply's reason.
"""

from __future__ import annotations

from typing import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from graftfl.clients.guard import guarded
from graftfl.core.allocator import keep_freed_memory
from graftfl.protocols import HANDLER_CATEGORIES, load_client_phase, load_client_protocol, phase_names, protocol_names


class LazyHandler:
    """The handler of ``<category>.<name>``, loaded from the registry on its first call.

    Parameters
    ----------
    category : str
        ``train``, ``evaluate`` or ``query``.
    name : str
        The protocol or phase name.
    load : callable
        ``load(name)`` returns the declaration (``ClientProtocol`` / ``ClientPhase``) or ``None``.
    """

    def __init__(self, category: str, name: str, load: Callable[[str], object]):
        self.category, self.name, self.load = category, name, load
        self.message_type = f"{category}.{name}"

    def __call__(self, message: Message, context: Context) -> Message:
        """Load the declaration (once per process) and answer ``message`` with its handler."""
        declaration = self.load(self.name)
        handler = declaration.handlers().get(self.message_type) if declaration is not None else None
        if handler is None:  # the words Flower uses for a message type no function is registered for
            raise ValueError(f"No {self.category} function registered with name '{self.name}'")
        return handler(message, context)


def message_types() -> dict[str, LazyHandler]:
    """One lazy handler per message type the registry can answer: every category of every protocol, ``query`` of every phase."""
    handlers = {}
    for name in protocol_names():
        for category in HANDLER_CATEGORIES:
            handlers[f"{category}.{name}"] = LazyHandler(category, name, load_client_protocol)
    for name in phase_names():
        handlers[f"query.{name}"] = LazyHandler("query", name, load_client_phase)
    return handlers


def build_client_app() -> ClientApp:
    """A ClientApp with one route per registered message type (``train.split``, ``query.<phase>``, ...).

    The process that builds it hosts sites (a Ray worker, a deployed ``flwr-clientapp``):
    it keeps freed memory for the next message's buffers (:mod:`graftfl.core.allocator`).
    """
    keep_freed_memory()
    client_app = ClientApp()
    for message_type, handler in message_types().items():
        category, name = message_type.split(".")
        getattr(client_app, category)(name)(guarded(handler))
    return client_app


app = build_client_app()
