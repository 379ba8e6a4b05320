"""The one ClientApp: routes ``<category>.<protocol>`` messages to per-protocol handlers.

Each module ``graftfl/clients/<protocol>.py`` declares ``PROTOCOL`` and any of
``train``, ``evaluate`` and ``query`` handlers; they are discovered here, so
adding a protocol touches no other protocol. Modules without ``PROTOCOL``
(shared helpers such as ``utils``) are not protocols. Every handler is wrapped by
:func:`graftfl.clients.guard.guarded`: a failure's text returns without the site's secrets.
"""

from __future__ import annotations

import importlib
import pkgutil

from flwr.clientapp import ClientApp

import graftfl.clients as clients_package
from graftfl.clients.guard import guarded

CATEGORIES = ("train", "evaluate", "query")


def protocol_handler_modules():
    for info in pkgutil.iter_modules(clients_package.__path__):
        if info.name != __name__.rpartition(".")[2]:  # not this module
            module = importlib.import_module(f"graftfl.clients.{info.name}")
            if hasattr(module, "PROTOCOL"):
                yield module


def build_client_app() -> ClientApp:
    client_app = ClientApp()
    for module in protocol_handler_modules():
        for category in CATEGORIES:
            handler = getattr(module, category, None)
            if handler is not None:
                getattr(client_app, category)(module.PROTOCOL)(guarded(handler))
    return client_app


app = build_client_app()
