"""Shared test helpers (importable as ``tests.helpers``): the one in-process Flower grid."""

from tests.helpers.grid import FakeGrid

__all__ = ["FakeGrid"]
