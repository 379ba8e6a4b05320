"""The files a local Flower deployment is driven by: ``$FLWR_HOME/config.toml``, the run config, TLS overrides.

``flwr run`` reads its SuperLink connection from ``config.toml`` and the ServerApp's
run config from a TOML file; the ServerApp composes its Hydra config from the
``overrides`` string written here, so the quoting below keeps paths with spaces,
commas, ``=`` or quotes one value all the way through.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from graftfl.tls import TlsFiles

CONNECTION = "graftfl-local"


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string (JSON string escapes are valid TOML escapes)."""
    return json.dumps(text)


def hydra_quote(value: object) -> str:
    """``value`` as a quoted Hydra override value (paths with spaces, commas or ``=`` stay one string).

    Hydra reads backslashes literally except in runs that precede a quote, which it halves.
    """
    text = re.sub(r"(\\+)(?='|$)", lambda run: run.group(1) * 2, str(value))
    return "'" + text.replace("'", "\\'") + "'"


def tls_overrides(files: TlsFiles) -> list[str]:
    """Hydra overrides that point ``cfg.tls`` at the generated files (the split data plane uses them)."""
    return [f"tls.ca_cert={hydra_quote(files.ca_cert)}", f"tls.server_cert={hydra_quote(files.server_cert)}",
            f"tls.server_key={hydra_quote(files.server_key)}"]


def run_config_overrides(overrides: list[str], run_id: str, output_dir: Path, extra: list[str] = ()) -> str:
    """The ``overrides`` run-config value: the ServerApp ``shlex.split``s it back into the list.

    ``run_id`` and the absolute ``output_dir`` make the ServerApp, another process started
    by the SuperLink, write the run directory this command reports.
    """
    return shlex.join([*overrides, *extra, f"run_id={hydra_quote(run_id)}", f"output_dir={hydra_quote(output_dir)}"])


def write_run_config(path: Path, overrides: str) -> Path:
    """A ``flwr run --run-config`` TOML file; unlike ``key="value"`` arguments it keeps any quoting."""
    path.write_text(f"overrides = {toml_string(overrides)}\n")
    return path


def write_flower_config(flwr_home: Path, port: int, ca_cert: Path | None) -> Path:
    """``$FLWR_HOME/config.toml`` with one default SuperLink connection named ``CONNECTION``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f"default = {toml_string(CONNECTION)}", "", f"[superlink.{CONNECTION}]",
             f"address = {toml_string(f'127.0.0.1:{port}')}"]
    lines.append(f"root-certificates = {toml_string(str(ca_cert))}" if ca_cert else "insecure = true")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
