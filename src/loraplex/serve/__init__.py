"""`loraplex serve`: an OpenAI-compatible HTTP API over a run's base model and every adapter of the run.

`app(run_dir, ...)` is the ASGI app (FastAPI); `serve(run_dir, host, port, ...)` runs it with uvicorn.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import LoraplexError


def _needs_extra():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise LoraplexError("serving needs FastAPI and uvicorn: pip install 'loraplex[serve]'") from None


def app(run_dir: str | Path, merged: tuple | list = (), api_key: str | None = None, **options):
    """The server as an ASGI app; `options` go to `loraplex.serve.api.app` (limits, batch size)."""
    _needs_extra()
    from .api import app as build

    return build(run_dir, merged, api_key, **options)


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, merged: tuple | list = (),
          api_key: str | None = None, log=print, **options) -> None:
    """Load the run, then answer on http://host:port/v1 until interrupted."""
    _needs_extra()
    import uvicorn

    asgi = app(run_dir, merged, api_key, **options)
    log(f"serving {', '.join(e['id'] for e in _model_ids(asgi))} on http://{host}:{port}/v1")
    uvicorn.run(asgi, host=host, port=port, log_level="warning")


def _model_ids(asgi) -> list[dict]:
    entries = [e.describe() for e in asgi.state.engine.entries.values()]
    return entries + ([asgi.state.router.describe()] if asgi.state.router is not None else [])


__all__ = ["app", "serve"]
