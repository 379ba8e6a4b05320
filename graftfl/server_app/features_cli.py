"""``graftfl serve`` (the prediction service) and ``graftfl predict`` (a site's client for it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_PORT = 8765


def add_commands(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a protocol=features run's classifier over HTTP (POST /predict)",
        description="Answers the paper's service-mode JSON {\"message\": {\"clientID\", \"value\", \"mode\": \"service\", \"timestamp\"}}.",
    )
    serve.add_argument("--run", required=True, type=Path, help="runs/<run-id> of a finished protocol=features run")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get HTTP 413 (default 1 MiB)")
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
    predict.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    predict.set_defaults(handler=cmd_predict)


def cmd_serve(args: argparse.Namespace) -> int:
    from graftfl.core.weights_file import UnsafeWeightsFile
    from graftfl.server_app.feature_service import run_service

    try:
        run_service(args.run, args.host, args.port, args.max_body_bytes, on_start=lambda url: print(f"serving {args.run} at {url}/predict", flush=True))
    except (FileNotFoundError, UnsafeWeightsFile) as err:
        print(f"graftfl serve: {err}", file=sys.stderr)
        return 2
    return 0


def site_name_of(client_id: str) -> str:
    return client_id if client_id.startswith("site-") else f"site-{int(client_id)}"


def load_images(paths: list[Path], input_shape, normalisation) -> "torch.Tensor":
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
    import httpx

    from graftfl.core.autoencoder import encode, load_autoencoder
    from graftfl.server_app.feature_store import utc_now

    site = site_name_of(str(args.client_id))
    path = (args.site_dir or args.run / "sites" / site) / "autoencoder.pt"
    if not path.exists():
        print(f"graftfl predict: no encoder at {path} (the site saves it during the run's upload phase)", file=sys.stderr)
        return 2
    model, stored = load_autoencoder(path)
    missing = [str(p) for p in args.images if not p.exists()]
    if missing:
        print(f"graftfl predict: no such image(s): {missing}", file=sys.stderr)
        return 2
    latents = encode(model, load_images(args.images, stored["input_shape"], stored["normalisation"]))
    failures = 0
    with httpx.Client(timeout=args.timeout) as client:
        for image, latent in zip(args.images, latents):
            body = {"message": {"clientID": site, "value": latent.tolist(), "mode": "service", "timestamp": utc_now()}}
            response = client.post(f"{args.url.rstrip('/')}/predict", json=body)
            if response.status_code != 200:
                failures += 1
                print(f"{image}\terror {response.status_code}: {response.text}", flush=True)
            else:
                print(f"{image}\t{response.json()['message']['label']}", flush=True)
    return 1 if failures else 0
