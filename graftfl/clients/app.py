"""The one ClientApp: routes ``<category>.<name>`` messages to the protocols' and phases' handlers.

The handlers come from the registry (:func:`graftfl.protocols.client_handlers`):
each protocol's ``graftfl/clients/<protocol>.py`` declares a ``ClientProtocol``
and each pre-training phase a ``ClientPhase``, so adding either touches no
other protocol and a module that breaks the contract fails when this app is built.
Every handler is wrapped by :func:`graftfl.clients.guard.guarded`: a failure's text
returns without the site's secrets.
"""

from __future__ import annotations

from flwr.clientapp import ClientApp

from graftfl.clients.guard import guarded
from graftfl.protocols import client_handlers


def build_client_app() -> ClientApp:
    """A ClientApp with one route per registered message type (``train.split``, ``query.<phase>``, ...)."""
    client_app = ClientApp()
    for message_type, handler in client_handlers().items():
        category, name = message_type.split(".")
        getattr(client_app, category)(name)(guarded(handler))
    return client_app


app = build_client_app()
