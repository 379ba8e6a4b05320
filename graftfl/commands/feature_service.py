"""The HTTP prediction service (``graftfl serve``) for a finished ``protocol=features`` run.

:func:`create_app` is the FastAPI prediction service: the paper's service-mode JSON
in, ``{"message": {"clientID", "label", "timestamp"}}`` out. It answers with the
run's :class:`~graftfl.strategies.features.classifier.ServedClassifier`.
"""

import math
import socket
import threading
import time
from pathlib import Path
from typing import Annotated, Callable, Literal, Union

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from graftfl.core.autoencoder import load_classifier
from graftfl.strategies.features.classifier import CLASSIFIER_FILE, ServedClassifier
from graftfl.strategies.features.store import utc_now

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a 784-float request is ~16 KB of JSON


Number = Annotated[Union[StrictInt, StrictFloat], Field(allow_inf_nan=False)]


class ServiceMessage(BaseModel):
    """The paper's service-mode message: a site's latent vector, no label."""

    model_config = ConfigDict(extra="ignore")
    clientID: Union[StrictStr, StrictInt]
    value: list[Number]
    mode: Literal["service"]
    timestamp: Union[StrictStr, StrictInt, StrictFloat, None] = None


class ServiceRequest(BaseModel):
    """The body of ``POST /predict``: one service-mode message."""
    message: ServiceMessage



def create_app(served: ServedClassifier, latent_dim: int, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, tokens=None):
    """The FastAPI prediction service for one served classifier.

    ``POST /predict`` takes the paper's service-mode message and answers with the
    predicted label. Malformed input is answered with HTTP 422 and a message that
    says what is wrong; a body over ``max_body_bytes`` with HTTP 413.

    ``tokens`` (a :class:`graftfl.service_auth.TokenTable`): every request needs a
    site's bearer token (HTTP 401 before the body is read), and ``clientID`` must
    be that site (HTTP 403). ``graftfl serve`` always passes one; ``None`` (no
    authentication) is for in-process use only. No OpenAPI/docs pages are served.
    """
    from graftfl.service_auth import BearerAuth

    app = FastAPI(title="graftfl feature classifier", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if tokens is not None:
        app.add_middleware(BearerAuth, tokens=tokens)  # added last = outermost: runs before the body limit and parsing
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.get("/health")
    def health() -> dict:
        return {"ready": served.ready, "classifier_version": served.version, "latent_dim": latent_dim}

    @app.post("/predict")
    def predict(request: ServiceRequest, http: Request) -> dict:
        message = request.message
        site = getattr(http.state, "site", None)
        if tokens is not None and str(message.clientID) != site and f"site-{message.clientID}" != site:
            raise HTTPException(403, f"this token belongs to {site}; message.clientID {message.clientID!r} is another site")
        if len(message.value) != latent_dim:
            raise HTTPException(422, f"message.value has {len(message.value)} numbers; this classifier takes latent vectors of length {latent_dim}")
        if not all(math.isfinite(v) for v in message.value):
            raise HTTPException(422, "message.value must hold finite numbers")
        if not served.ready:
            raise HTTPException(503, "no classifier has been trained yet")
        label = int(served.predict(np.asarray([message.value], dtype=np.float32))[0])
        stamp = message.timestamp if message.timestamp is not None else utc_now()
        return {"message": {"clientID": message.clientID, "label": label, "timestamp": stamp}}

    return app


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 with one readable line per problem (the default echoes input, which may hold NaN)."""
    problems: dict[str, str] = {}
    for item in error.errors():
        if item["type"] == "json_invalid":
            problems["body"] = f"not valid JSON (at character {item['loc'][-1]})"
            continue
        where = ".".join(str(part) for part in item["loc"][1:] if part not in ("int", "float", "str")) or "body"
        if where not in problems or "number" in item["msg"]:  # a union reports once per member type: keep the number one
            problems[where] = item["msg"]
    return JSONResponse({"detail": "; ".join(f"{where}: {message}" for where, message in problems.items())}, status_code=422)


class BodySizeLimit:
    """ASGI middleware: answer 413 to bodies over ``max_bytes`` before parsing them."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        """Pass a request on, answering 413 instead when its declared or streamed body is over ``max_bytes``."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, status_code=413)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:  # chunked bodies carry no content-length
                    # FastAPI re-raises HTTPException from body reading; its handler answers 413.
                    raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return event

        return await self.app(scope, limited_receive, send)


def app_for_run(run_dir: Path, tokens, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    """The prediction service for a finished ``protocol=features`` run (``tokens``: a ``TokenTable``; required)."""
    if tokens is None:
        raise ValueError("the prediction service of a run needs site tokens (graftfl.service_auth.TokenTable)")
    path = Path(run_dir) / CLASSIFIER_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a finished protocol=features run?")
    model, stored = load_classifier(path)
    return create_app(ServedClassifier(model, version=int(stored.get("version", 1))), stored["latent_dim"], max_body_bytes, tokens=tokens)


class BackgroundServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread (tests, benchmarks); ``stop()`` ends it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, ssl_certfile: str | None = None, ssl_keyfile: str | None = None):
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = host, self.socket.getsockname()[1]
        self.scheme = "https" if ssl_certfile else "http"
        tls = {"ssl_certfile": str(ssl_certfile), "ssl_keyfile": str(ssl_keyfile)} if ssl_certfile else {}
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, **tls))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        """The base URL the service listens on."""
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "BackgroundServer":
        """Start serving in the background and wait until it accepts requests; returns ``self``."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the prediction service did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Ask the server to exit, wait for its thread and close its socket."""
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def run_service(run_dir: Path, host: str, port: int, max_body_bytes: int, on_start: Callable[[str], None] | None = None, *,
                tokens=None, ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> None:
    """Serve a run's classifier in the foreground until interrupted (``graftfl serve``).

    ``tokens``: the sites' ``TokenTable`` (required); ``ssl_certfile``/``ssl_keyfile``:
    HTTPS with uvicorn's TLS (both or neither).
    """
    import uvicorn

    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise ValueError("HTTPS needs both --tls-cert and --tls-key")
    app = app_for_run(run_dir, tokens, max_body_bytes)
    if on_start:
        on_start(f"{'https' if ssl_certfile else 'http'}://{host}:{port}")
    tls = {"ssl_certfile": str(ssl_certfile), "ssl_keyfile": str(ssl_keyfile)} if ssl_certfile else {}
    uvicorn.run(app, host=host, port=port, log_level="warning", **tls)
