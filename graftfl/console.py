"""Where graftfl's log records go when a person is watching: the console.

Library code logs through ``logging.getLogger(__name__)`` and never prints; the
entry points (the ``graftfl`` command, the deployed ServerApp) call
:func:`show_progress` so round progress and rejected replies still reach the
user. Records go to stderr: stdout carries the command's own output, whose last
line is ``run: runs/<run-id>``.
"""

from __future__ import annotations

import logging
import sys

PACKAGE_LOGGER = "graftfl"


class _ConsoleHandler(logging.StreamHandler):
    """A stderr handler that follows ``sys.stderr`` when it is replaced (pytest's capture, redirection)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def show_progress(level: int = logging.INFO) -> None:
    """Show graftfl's records at ``level`` and above on stderr (once per process; calling again is harmless)."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    if not any(isinstance(handler, _ConsoleHandler) for handler in logger.handlers):
        handler = _ConsoleHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
