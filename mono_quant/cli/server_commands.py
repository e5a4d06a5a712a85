"""``monoquant serve`` and ``monoquant submit``: the CLI side of the HTTP service.

The library never imports the service package: ``serve`` hands uvicorn an import string, and
``submit`` uses :mod:`mono_quant.client` (httpx, from ``pip install mono-quant[server]``).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from mono_quant.cli.main import cli
from mono_quant.cli.options import collect_options, options_for, quantize_options
from mono_quant.errors import InputError


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


@cli.command()
@click.argument("model_path", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--server", default="http://127.0.0.1:8000", show_default=True, help="Base URL of the service.")
@click.option("--api-key", envvar="MONOQUANT_API_KEY", help="Bearer key (or MONOQUANT_API_KEY).")
@click.option("--model-id", help="A model uploaded before (POST /v1/models) instead of MODEL_PATH.")
@click.option("--calibration", type=click.Path(exists=True, path_type=Path), help="Calibration tensors file.")
@click.option("--dataset-id", help="Calibration data uploaded before (POST /v1/datasets).")
@quantize_options
@click.option("--wait/--no-wait", default=False, help="Wait for the job (progress bar) and download the result.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where --wait saves model.safetensors.")
@click.option("--timeout", type=float, default=None, help="Seconds --wait waits at most.")
def submit(model_path, server, api_key, model_id, calibration, dataset_id, wait, output, timeout, **flags):
    """Run a quantization job on a remote mono_quant service."""
    from mono_quant import client as client_module

    if (model_path is None) == (model_id is None):
        raise InputError("give either MODEL_PATH or --model-id", suggestion="monoquant submit model.safetensors ...")
    params = collect_options(flags)
    # the library's rules before anything is uploaded (the service applies the same ones)
    options_for(params, has_calibration=calibration is not None or dataset_id is not None)
    try:
        with client_module.MonoQuantClient(server, api_key=api_key) as client:
            job = client.submit(model_path, model_id=model_id, calibration=calibration, dataset_id=dataset_id, **params)
            click.echo(f"job {job['id']} {job['status']}")
            if not wait:
                return
            job = client.wait(job["id"], timeout=timeout, progress=True)
            target = client.download(job["id"], "model.safetensors", output or Path(f"{job['id']}.safetensors"))
            click.echo(f"job {job['id']} {job['status']}; wrote {target}")
    except client_module.ApiError as exc:
        click.secho(f"Error ({exc.status or 'connection'}): {exc.detail}", fg="red", err=True)
        if exc.suggestion:
            click.echo(f"Suggestion: {exc.suggestion}", err=True)
        sys.exit(2 if 400 <= (exc.status or 0) < 500 else 1)
