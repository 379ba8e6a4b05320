"""``graftfl serve`` (the prediction service) and ``graftfl predict`` (a site's client for it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEFAULT_PORT = 8765


def add_commands(subparsers) -> None:
    """Add the ``serve`` and ``predict`` subcommands (``protocol=features``) to the ``graftfl`` parser."""
    serve = subparsers.add_parser(
        "serve",
        help="serve a protocol=features run's classifier over HTTP (POST /predict)",
        description="Answers the paper's service-mode JSON {\"message\": {\"clientID\", \"value\", \"mode\": \"service\", \"timestamp\"}}.",
    )
    serve.add_argument("--run", required=True, type=Path, help="runs/<run-id> of a finished protocol=features run")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get HTTP 413 (default 1 MiB)")
    serve.add_argument("--tokens", type=Path, default=None, help='site tokens to accept: a JSON file {"site-0": "<token>", ...} you keep (mode 0600); '
                       "default: issue fresh tokens at start")
    serve.add_argument("--write-tokens", type=Path, default=None, help="write the issued tokens to this new file (mode 0600) instead of printing them once")
    serve.add_argument("--sites", default=None, help="comma-separated site names to issue tokens for (default: site-0..site-N-1 of the run's num_clients)")
    serve.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate: serve HTTPS (with --tls-key)")
    serve.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    serve.set_defaults(handler=cmd_serve)

    predict = subparsers.add_parser(
        "predict",
        help="encode images with a site's own encoder and ask the prediction service for their labels",
        description="Only the latent vectors leave the site; the images and the encoder stay local.",
    )
    predict.add_argument("--run", required=True, type=Path, help="runs/<run-id> (finds <run>/sites/site-<id>/autoencoder.pt)")
    predict.add_argument("--client-id", required=True, help="the site: its partition id (0) or name (site-0)")
    predict.add_argument("--site-dir", type=Path, default=None, help="the site's folder holding autoencoder.pt (default <run>/sites/site-<id>)")
    predict.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_PORT}", help="the prediction service (graftfl serve)")
    predict.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    predict.add_argument("--token", default=None, help="this site's service token (default: $GRAFTFL_SERVICE_TOKEN; the variable keeps it out of `ps`)")
    predict.add_argument("--ca-cert", type=Path, default=None, help="PEM of the CA that signed the service's certificate (https URLs)")
    predict.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    predict.set_defaults(handler=cmd_predict)


def run_sites(run_dir: Path, sites: str | None) -> list[str]:
    """Sites to issue tokens for: ``--sites``, else site-0..site-N-1 from the run's ``config.yaml``."""
    if sites:
        return [name.strip() for name in sites.split(",") if name.strip()]
    import yaml

    config = run_dir / "config.yaml"
    if not config.exists():
        raise FileNotFoundError(f"{config} not found: name the sites with --sites site-0,site-1 or pass --tokens FILE")
    return [f"site-{index}" for index in range(int(yaml.safe_load(config.read_text())["num_clients"]))]


def cmd_serve(args: argparse.Namespace) -> int:
    """``graftfl serve``: serve a finished features run's classifier over HTTP(S) with per-site bearer tokens."""
    from graftfl.commands.feature_service import run_service
    from graftfl.core.autoencoder import load_classifier
    from graftfl.core.weights_file import UnsafeWeightsFile
    from graftfl.service_auth import TokenFileError, TokenTable, issue_tokens, read_tokens_file, write_tokens_file
    from graftfl.strategies.features.classifier import CLASSIFIER_FILE

    try:
        if not (args.run / CLASSIFIER_FILE).exists():
            raise FileNotFoundError(f"{args.run / CLASSIFIER_FILE} not found: is {args.run} a finished protocol=features run?")
        load_classifier(args.run / CLASSIFIER_FILE)  # refuse an unsafe file before any token is issued
        if bool(args.tls_cert) != bool(args.tls_key):
            raise ValueError("HTTPS needs both --tls-cert and --tls-key")
        if args.tokens and (args.write_tokens or args.sites):
            raise ValueError("--tokens reads existing tokens; --write-tokens and --sites are for issuing new ones")
        if args.write_tokens and args.write_tokens.exists():
            raise TokenFileError(f"{args.write_tokens} exists: choose a new file for the issued tokens (or serve with --tokens {args.write_tokens})")
        issued = None if args.tokens else issue_tokens(run_sites(args.run, args.sites))
        table = TokenTable.from_tokens(read_tokens_file(args.tokens) if args.tokens else issued)

        def announce(url: str) -> None:  # the classifier loaded: record the hashes, hand out new tokens once
            table.save_hashes(args.run)
            if issued and args.write_tokens:
                write_tokens_file(args.write_tokens, issued)
                print(f"issued tokens for {sorted(issued)} written to {args.write_tokens} (mode 0600)", flush=True)
            elif issued:
                print("issued site tokens (shown once; give each site its own, e.g. as $GRAFTFL_SERVICE_TOKEN):", flush=True)
                for site, token in issued.items():
                    print(f"token {site} {token}", flush=True)
            print(f"serving {args.run} at {url}/predict ({len(table.hashes)} site tokens; hashes in {args.run}/service_tokens.json)", flush=True)

        run_service(args.run, args.host, args.port, args.max_body_bytes, on_start=announce, tokens=table,
                    ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key)
    except (FileNotFoundError, UnsafeWeightsFile, ValueError) as err:  # TokenFileError is a ValueError
        print(f"graftfl serve: {err}", file=sys.stderr)
        return 2
    return 0


def site_name_of(client_id: str) -> str:
    """The site name of a client id: ``site-<n>`` for a number, the id itself when it already is a site name."""
    return client_id if client_id.startswith("site-") else f"site-{int(client_id)}"


def load_images(paths: list[Path], input_shape, normalisation) -> torch.Tensor:
    """Images resized to the encoder's input and standardised as its training data was."""
    import numpy as np
    import torch
    from PIL import Image

    channels, height, width = input_shape
    mean, std = normalisation or ([0.0] * channels, [1.0] * channels)
    batch = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB").resize((width, height))
            pixels = np.asarray(image, dtype=np.float32) / 255.0
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        batch.append((pixels - np.asarray(mean, dtype=np.float32)[:, None, None]) / np.asarray(std, dtype=np.float32)[:, None, None])
    return torch.from_numpy(np.stack(batch))


def cmd_predict(args: argparse.Namespace) -> int:
    """``graftfl predict``: encode images at the site and ask the service for their classes; returns the exit status."""
    import os
    import ssl
    from urllib.parse import urlsplit

    import httpx

    from graftfl.core.autoencoder import encode, load_autoencoder
    from graftfl.service_auth import TOKEN_ENV
    from graftfl.strategies.features.store import utc_now

    site = site_name_of(str(args.client_id))
    url = urlsplit(args.url)
    if url.scheme != "https" and url.hostname not in ("127.0.0.1", "localhost", "::1"):
        print(f"graftfl predict: warning: sending the token and latents to {url.hostname} without TLS (use an https URL)", file=sys.stderr)
    verify = ssl.create_default_context(cafile=str(args.ca_cert)) if args.ca_cert else True
    path = (args.site_dir or args.run / "sites" / site) / "autoencoder.pt"
    if not path.exists():
        print(f"graftfl predict: no encoder at {path} (the site saves it during the run's upload phase)", file=sys.stderr)
        return 2
    try:
        model, stored = load_autoencoder(path)
    except ValueError as err:  # UnsafeWeightsFile: a crafted encoder file runs nothing
        print(f"graftfl predict: {err}", file=sys.stderr)
        return 2
    missing = [str(p) for p in args.images if not p.exists()]
    if missing:
        print(f"graftfl predict: no such image(s): {missing}", file=sys.stderr)
        return 2
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        print(f"graftfl predict: no service token: pass --token or set ${TOKEN_ENV} (graftfl serve issued one per site)", file=sys.stderr)
        return 2
    latents = encode(model, load_images(args.images, stored["input_shape"], stored["normalisation"]))
    failures = 0
    with httpx.Client(timeout=args.timeout, verify=verify, headers={"Authorization": f"Bearer {token}"}) as client:
        for image, latent in zip(args.images, latents, strict=True):
            body = {"message": {"clientID": site, "value": latent.tolist(), "mode": "service", "timestamp": utc_now()}}
            try:
                response = client.post(f"{args.url.rstrip('/')}/predict", json=body)
            except httpx.HTTPError as err:  # unreachable, or TLS verification failed
                print(f"graftfl predict: cannot reach {args.url}: {err}", file=sys.stderr)
                return 1
            if response.status_code != 200:
                failures += 1
                print(f"{image}\terror {response.status_code}: {response.text}", flush=True)
            else:
                print(f"{image}\t{response.json()['message']['label']}", flush=True)
    return 1 if failures else 0
