"""The protocols' own ``graftfl`` commands (the cli layer), e.g. ``serve`` and ``predict``.

A module here offers ``add_commands(subparsers)``; :mod:`graftfl.cli` adds its
commands to the ``graftfl`` parser. These modules work on finished run directories
and may import any lower layer (``strategies``, ``core``).
"""
