"""`loraplex serve`: an OpenAI-compatible HTTP API over a run's base model and every adapter of the run.

`app(run_dir, ...)` is the ASGI app (FastAPI); `serve(run_dir, host, port, ...)` runs it with uvicorn.
"""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Callable

from ..errors import LoraplexError
from ..run import stale_merge


# asyncio and h11 whatever else is installed (uvicorn picks uvloop and httptools when present, as trackio's
# uvicorn[standard] brings them): with either, a finished request stayed referenced after its answer was sent
EVENT_LOOP = {"loop": "asyncio", "http": "h11"}


def _needs_extra():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise LoraplexError("serving needs FastAPI and uvicorn: pip install 'loraplex[serve]'") from None


def app(run_dir: str | Path, merged: tuple | list = (), api_key: str | None = None, **options):
    """The server as an ASGI app; `options` go to `loraplex.serving.api.app` (limits, batch size)."""
    _needs_extra()
    from .api import app as build

    return build(run_dir, merged, api_key, **options)


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, merged: tuple | list = (),
          api_key: str | None = None, log=print, **options) -> None:
    """Load the run, then answer on http://host:port/v1 until interrupted."""
    _needs_extra()
    import uvicorn

    asgi = app(run_dir, merged, api_key, **options)
    for folder in merged:
        stale = stale_merge(Path(folder), Path(run_dir))
        if stale:
            log(f"warning: {folder} is stale: {stale}; merge again to refresh it")
    log(f"serving {', '.join(e['id'] for e in _model_ids(asgi))} on http://{host}:{port}/v1")
    uvicorn.run(asgi, host=host, port=port, log_level="warning", **EVENT_LOOP)


def start_in_thread(asgi, timeout: float = 30.0) -> tuple[str, Callable[[], None]]:
    """Serve `asgi` on a free 127.0.0.1 port from a background thread (notebooks, tests, benchmarks).

    Returns the API's base URL (`http://127.0.0.1:PORT/v1`) and a function that stops the server.
    """
    _needs_extra()
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(asgi, log_level="warning", lifespan="on", **EVENT_LOOP))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise LoraplexError("the server did not start")
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=timeout)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}/v1", stop


def _model_ids(asgi) -> list[dict]:
    entries = [e.describe() for e in asgi.state.engine.entries.values()]
    return entries + ([asgi.state.router.describe()] if asgi.state.router is not None else [])


__all__ = ["app", "serve", "start_in_thread"]
