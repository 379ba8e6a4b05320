"""``graftfl serve`` / ``graftfl predict`` as an attacker meets them: bearer tokens per site, HTTPS, nothing secret in the run dir."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from graftfl.cli import main
from graftfl.core.autoencoder import conv_ae, save_autoencoder, save_classifier, train_classifier
from graftfl.service_auth import HASH_FILE, TOKEN_ENV, TokenTable, token_hash
from graftfl.tls import generate_tls_files

ROOT = Path(__file__).resolve().parent.parent
LATENT = 16


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished features run as `graftfl serve` and `graftfl predict` find it: classifier, config, a site's encoder."""
    run = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, LATENT)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    classifier, _ = train_classifier(torch.from_numpy(x), torch.from_numpy(y), 2, epochs=2, hidden=[8])
    save_classifier(run / "classifier.pt", classifier, LATENT, 2, [8])
    (run / "config.yaml").write_text("protocol:\n  name: features\nnum_clients: 2\n")
    torch.manual_seed(0)
    save_autoencoder(run / "sites" / "site-0" / "autoencoder.pt", conv_ae((1, 8, 8), latent_dim=LATENT, channels=2), (1, 8, 8), 2, ([0.5], [0.25]))
    return run


@pytest.fixture
def images(tmp_path) -> list[Path]:
    paths = []
    for number in range(2):
        path = tmp_path / f"image{number}.png"
        Image.fromarray(np.random.default_rng(number).integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(path)
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Serve:
    """The real ``graftfl serve`` in a subprocess; stdout lines until it says it is serving."""

    def __init__(self, *args: str, cwd: Path):
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "graftfl.cli", "serve", "--port", str(self.port), *args],
                                     cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"graftfl serve exited: {''.join(self.lines)}")
            self.lines.append(line)
            if line.startswith("serving "):
                break
        self.url = self.lines[-1].split(" at ")[1].split("/predict")[0]
        bound_by = time.monotonic() + 60  # uvicorn binds right after the announcement (slowly on a loaded machine)
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > bound_by or self.proc.poll() is not None:
                    raise AssertionError(f"graftfl serve never accepted connections on {self.port}: {''.join(self.lines)}") from None
                time.sleep(0.1)

    def tokens(self) -> dict[str, str]:
        return {line.split()[1]: line.split()[2] for line in self.lines if line.startswith("token ")}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def message(client_id="site-0") -> dict:
    return {"message": {"clientID": client_id, "value": [0.5] * LATENT, "mode": "service"}}


def files_text(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file())


@pytest.mark.slow  # starts the real `graftfl serve` in a subprocess
def test_serve_answers_only_requests_with_their_sites_token(run_dir, tmp_path):
    with Serve("--run", str(run_dir), cwd=tmp_path) as service:
        tokens = service.tokens()
        assert sorted(tokens) == ["site-0", "site-1"] and tokens["site-0"] != tokens["site-1"]
        with httpx.Client(base_url=service.url) as client:
            missing = client.post("/predict", json=message())
            assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
            assert "missing bearer token" in missing.json()["detail"]
            for wrong in ("Bearer " + tokens["site-0"][:-1] + "x", "Bearer  nothing", "Basic " + tokens["site-0"], tokens["site-0"]):
                answer = client.post("/predict", json=message(), headers={"Authorization": wrong})
                assert answer.status_code == 401, wrong
            for path in ("/health", "/docs", "/openapi.json"):  # nothing is answered without a token
                assert client.get(path).status_code == 401
            # a site's token does not let it speak for another site
            other = client.post("/predict", json=message("site-1"), headers={"Authorization": f"Bearer {tokens['site-0']}"})
            assert other.status_code == 403 and "site-0" in other.json()["detail"]
            right = client.post("/predict", json=message(), headers={"Authorization": f"Bearer {tokens['site-0']}"})
            assert right.status_code == 200 and right.json()["message"]["label"] in (0, 1)
            assert client.post("/predict", json=message(1), headers={"Authorization": f"Bearer {tokens['site-1']}"}).status_code == 200
    # only hashes reach the run directory
    stored = json.loads((run_dir / HASH_FILE).read_text())["sites"]
    assert stored == {site: token_hash(token) for site, token in tokens.items()}
    everything = files_text(run_dir)
    assert not any(token.encode() in everything for token in tokens.values())


@pytest.mark.slow  # starts the real `graftfl serve` in a subprocess
def test_tokens_file_stays_out_of_the_run_dir_and_predict_sends_the_token(run_dir, tmp_path, images, capsys, monkeypatch):
    tokens_file = tmp_path / "operator" / "tokens.json"
    tokens_file.parent.mkdir()
    tokens = {"site-0": "s0-" + "a" * 40, "site-1": "s1-" + "b" * 40}
    tokens_file.write_text(json.dumps(tokens))
    tokens_file.chmod(0o600)
    with Serve("--run", str(run_dir), "--tokens", str(tokens_file), cwd=tmp_path) as service:
        assert service.tokens() == {}  # nothing printed: the operator already has them
        base = ["predict", "--run", str(run_dir), "--client-id", "0", "--url", service.url]
        monkeypatch.delenv(TOKEN_ENV, raising=False)
        assert main([*base, *map(str, images)]) == 2
        assert "no service token" in capsys.readouterr().err
        assert main([*base, "--token", tokens["site-1"], *map(str, images)]) == 1  # the wrong site's token: 403
        assert "error 403" in capsys.readouterr().out
        assert main([*base, "--token", tokens["site-0"], *map(str, images)]) == 0
        assert all(line.split("\t")[1] in ("0", "1") for line in capsys.readouterr().out.strip().splitlines())
        monkeypatch.setenv(TOKEN_ENV, tokens["site-0"])
        assert main([*base, *map(str, images)]) == 0
        capsys.readouterr()
    everything = files_text(run_dir)
    assert tokens_file.read_bytes() not in everything
    assert not any(token.encode() in everything for token in tokens.values())
    assert TokenTable(json.loads((run_dir / HASH_FILE).read_text())["sites"]).site_of(tokens["site-1"]) == "site-1"


@pytest.mark.slow  # starts the real `graftfl serve` in a subprocess
def test_issued_tokens_go_to_a_new_private_file(run_dir, tmp_path):
    target = tmp_path / "issued.json"
    with Serve("--run", str(run_dir), "--write-tokens", str(target), "--sites", "north,south", cwd=tmp_path) as service:
        assert service.tokens() == {}  # not printed
        issued = json.loads(target.read_text())
        assert sorted(issued) == ["north", "south"] and stat.S_IMODE(target.stat().st_mode) == 0o600
        answer = httpx.post(f"{service.url}/predict", json=message("north"), headers={"Authorization": f"Bearer {issued['north']}"})
        assert answer.status_code == 200
    assert main(["serve", "--run", str(run_dir), "--write-tokens", str(target)]) == 2  # never overwrites


@pytest.mark.slow  # starts the real `graftfl serve` in a subprocess
def test_https_with_a_throwaway_ca(run_dir, tmp_path, images, capsys):
    tls = generate_tls_files(tmp_path / "tls")
    other_ca = generate_tls_files(tmp_path / "other").ca_cert
    with Serve("--run", str(run_dir), "--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key), cwd=tmp_path) as service:
        assert service.url.startswith("https://")
        token = service.tokens()["site-0"]
        base = ["predict", "--run", str(run_dir), "--client-id", "site-0", "--url", service.url, "--token", token]
        assert main([*base, "--ca-cert", str(tls.ca_cert), *map(str, images)]) == 0
        assert len(capsys.readouterr().out.strip().splitlines()) == 2
        assert main([*base, "--ca-cert", str(other_ca), *map(str, images)]) == 1  # a server the site's CA did not sign
        assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
        with pytest.raises(httpx.HTTPError):  # plaintext to the TLS port gets nothing
            httpx.post(service.url.replace("https", "http"), json=message(), headers={"Authorization": f"Bearer {token}"})


def test_serve_refuses_half_tls_and_bad_token_files(run_dir, tmp_path, capsys):
    tls = generate_tls_files(tmp_path / "tls")
    assert main(["serve", "--run", str(run_dir), "--tls-cert", str(tls.server_cert)]) == 2
    assert "--tls-key" in capsys.readouterr().err
    weak = tmp_path / "weak.json"
    weak.write_text(json.dumps({"site-0": "1234"}))
    assert main(["serve", "--run", str(run_dir), "--tokens", str(weak)]) == 2
    assert "shorter than" in capsys.readouterr().err
    weak.write_text("[1, 2]")
    assert main(["serve", "--run", str(run_dir), "--tokens", str(weak)]) == 2
    assert "JSON object" in capsys.readouterr().err


def test_token_table_compares_every_hash():
    table = TokenTable.from_tokens({"a": "x" * 20, "b": "y" * 20})
    assert table.site_of("x" * 20) == "a" and table.site_of("y" * 20) == "b"
    assert table.site_of("z" * 20) is None and table.site_of("") is None and table.site_of(None) is None
    assert "x" * 20 not in json.dumps(table.hashes)
