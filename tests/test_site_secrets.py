"""What a site treats as a secret when it scrubs an error it returns to the server."""

from __future__ import annotations

from flwr.app import Context, RecordDict

from graftfl.clients.guard import REDACTED, scrub, site_secrets


def context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_the_dedup_salt_is_a_secret_in_node_config_and_environment(monkeypatch):
    node_salt, env_salt = "node-salt-0123456789abcdef", "env-salt-fedcba9876543210"
    monkeypatch.setenv("GRAFTFL_DEDUP_SALT", env_salt)
    secrets = site_secrets(context({"partition-id": 0, "dedup-salt": node_salt, "data-path": "/data/site-0"}))
    text = scrub(f"PSI failed with salt {node_salt} (env {env_salt}) reading /data/site-0", secrets)
    assert node_salt not in text and env_salt not in text and text.count(REDACTED) == 2
    assert "/data/site-0" in text  # an ordinary path is not a secret
