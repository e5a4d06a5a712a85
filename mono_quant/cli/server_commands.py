"""``monoquant serve`` and ``monoquant submit``: the CLI side of the HTTP service.

The library never imports the service package: ``serve`` hands uvicorn an import string, and
``submit`` loads the HTTP client by name only when it runs (``pip install mono-quant[server]``).
"""

from __future__ import annotations

import importlib

import click

from mono_quant.api.exceptions import InputError
from mono_quant.cli.main import cli


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InputError(
            f"this command needs the service package ({exc.name} is missing)",
            suggestion="pip install 'mono-quant[server]' (from a checkout of the project).",
        ) from None


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--reload", is_flag=True, help="Restart on code changes (development).")
def serve(host: str, port: int, reload: bool) -> None:
    """Run the HTTP service (configuration: MONOQUANT_* environment variables)."""
    uvicorn = _load("uvicorn")
    _load("app.main")
    uvicorn.run("app.main:create_app", factory=True, host=host, port=port, reload=reload)
