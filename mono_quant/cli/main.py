"""The ``monoquant`` command line (alias ``mq``).

    monoquant quantize model.safetensors --bits 4 -o model-int4.safetensors
    monoquant quantize ./hf-model-folder --bits 8 --calibration calib.safetensors -o q.safetensors
    monoquant info q.safetensors
    monoquant validate model.safetensors q.safetensors
    monoquant compare a.safetensors b.safetensors
    monoquant serve                        # the HTTP service (needs mono-quant[server])
    monoquant submit model.safetensors --server http://127.0.0.1:8000 --bits 8 --dynamic --wait

Errors print their message and suggestion and exit with status 2 (bad input) or 1 (failure);
``-v`` adds the traceback.
"""

from __future__ import annotations

import json
import math
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from mono_quant.cli.options import collect_options, options_for, quantize_options
from mono_quant.errors import ConfigurationError, InputError, MonoQuantError
from mono_quant.export import EXPORT_FORMATS, options_for_formats


def _fail(exc: BaseException, verbose: bool) -> None:
    if verbose:
        traceback.print_exception(exc)
    if isinstance(exc, MonoQuantError):
        click.secho(f"Error ({type(exc).__name__}): {exc.message}", fg="red", err=True)
        if exc.suggestion:
            click.echo(f"Suggestion: {exc.suggestion}", err=True)
        sys.exit(2 if isinstance(exc, (ConfigurationError, InputError)) else 1)
    click.secho(f"Error: {type(exc).__name__}: {exc}", fg="red", err=True)
    sys.exit(1)


class _Group(click.Group):
    """Turns mono_quant errors raised by any command into a clean message + exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except BrokenPipeError:  # output piped into `head` and closed: not an error
            sys.stderr.close()
            sys.exit(0)
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            _fail(exc, bool(ctx.obj and ctx.obj.get("verbose")))


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="mono-quant")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """mono_quant: quantize PyTorch models to INT8 / INT4 / FP16."""
    ctx.obj = {"verbose": verbose}


@cli.command()
@click.argument("model_path", type=click.Path(exists=True, path_type=Path))
@quantize_options
@click.option(
    "--calibration",
    type=click.Path(exists=True, path_type=Path),
    help="Safetensors/.pt file of input tensors: static int8's ranges, GPTQ, SmoothQuant, the accuracy target.",
)
@click.option(
    "--eval",
    "eval_file",
    type=click.Path(exists=True, path_type=Path),
    help="Safetensors/.pt file of input tensors --max-accuracy-loss is measured on "
    "(default: a held-out part of --calibration).",
)
@click.option("--bf16", is_flag=True, help="Same as --dtype bf16 (with --bits 16).")
@click.option(
    "--format",
    "export_format",
    type=click.Choice(EXPORT_FORMATS),
    default=None,
    help="Write this format instead of mono_quant's safetensors (compressed-tensors: a folder).",
)
@click.option("--tokenizer", type=click.Path(exists=True, path_type=Path), help="Tokenizer folder for --format.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output file (or folder).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def quantize(model_path, calibration, eval_file, bf16, export_format, tokenizer, output, progress, **flags):
    """Quantize a weights file (.safetensors / .pt) or a Hugging Face model folder."""
    from mono_quant import quantize as run_quantize
    from mono_quant.io.formats import quantize_file
    from mono_quant.io.hf import is_hf_folder, load_calibration_file, load_hf_folder

    given = collect_options(flags)
    if bf16:
        given["dtype"] = "bf16"
    options = options_for(given, has_calibration=calibration is not None)
    if export_format is not None:  # defaults the format cannot store give way to ones it can
        options = options_for_formats(options, [export_format], has_calibration=calibration is not None)
    if eval_file is not None and options.max_accuracy_loss is None:
        raise ConfigurationError(
            "--eval is what --max-accuracy-loss is measured on, and no --max-accuracy-loss was given",
            suggestion="Add --max-accuracy-loss 0.01 (1%), or drop --eval.",
        )
    options.check_data(calibration is not None, has_eval=eval_file is not None)  # --calibration / --eval
    kwargs = options.given()
    bits, scheme, dynamic = kwargs.pop("bits", 8), kwargs.pop("scheme", None), kwargs.pop("dynamic", False)
    if is_hf_folder(model_path):
        model = load_hf_folder(model_path)
    elif model_path.suffix == ".safetensors" and calibration is None and eval_file is None and export_format is None:
        # Files stream tensor by tensor: memory stays flat whatever the model size.
        out = quantize_file(
            model_path, output, bits=bits, scheme=scheme, dynamic=dynamic, show_progress=progress, **kwargs
        )
        click.echo(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, from {model_path.stat().st_size / 1e6:.1f} MB)")
        return
    else:
        model = str(model_path)
    data = load_calibration_file(calibration) if calibration else None
    if eval_file is not None:
        kwargs["eval_data"] = load_calibration_file(eval_file)
    result = run_quantize(
        model, bits=bits, dynamic=dynamic, scheme=scheme, calibration_data=data, show_progress=progress, **kwargs
    )
    if not result:
        raise MonoQuantError("quantization failed: " + "; ".join(result.errors))
    if export_format is not None and tokenizer is None and is_hf_folder(model_path):
        tokenizer = model_path  # a Hugging Face folder carries its tokenizer files
    path = result.save(output, format=export_format, tokenizer=str(tokenizer) if tokenizer else None)
    info = result.info
    click.echo(f"quantized {len(info.selected_layers)} layers, skipped {len(info.skipped_layers)}; wrote {path}")
    for warning in result.warnings:
        click.secho(f"warning: {warning}", fg="yellow", err=True)


def _dequantized_state(path: Path) -> dict[str, Any]:
    """``{layer or tensor name: float tensor}`` of a file, quantized layers dequantized."""
    import torch

    from mono_quant.io.formats import dequantized_layer_weight, load_model, read_metadata

    meta = read_metadata(path)
    state = load_model(path)
    out: dict[str, torch.Tensor] = {}
    consumed = set()
    for layer, cfg in meta["layers"].items():
        weight = None if cfg.get("kind") == "cast" else dequantized_layer_weight(state, layer, cfg)
        if weight is None:
            continue
        out[f"{layer}.weight"] = weight
        consumed.update(f"{layer}.{k}" for k in ("qweight", "weight_scale", "weight_zero_point"))
    for name, tensor in state.items():
        if name not in consumed and tensor.is_floating_point():
            out[name] = tensor.float()
    return out


def _sqnr_table(a: Path, b: Path) -> list[tuple[str, float]]:
    from mono_quant.core.schemes import sqnr

    left, right = _dequantized_state(a), _dequantized_state(b)
    rows = []
    for name in left:
        if name in right and left[name].shape == right[name].shape and left[name].dim() >= 2:
            rows.append((name, sqnr(left[name], right[name])))
    if not rows:
        raise InputError(
            f"{a.name} and {b.name} share no weight tensors of the same shape",
            suggestion="Compare a model with its own quantized version.",
        )
    return rows


def _fmt_db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


@cli.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(path, as_json):
    """Layers, dtypes, metadata and sizes of a model file."""
    from mono_quant.io.formats import read_metadata
    from mono_quant.io.handlers import inspect_model_file

    summary = inspect_model_file(path)
    if summary.get("format") in ("safetensors", "pytorch"):  # .pt files saved by mono_quant have metadata too
        meta = read_metadata(path)
        summary["metadata"] = meta
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    click.echo(
        f"{path}: {summary['format']}, {summary.get('tensors', '?')} tensors, "
        f"{summary.get('parameters', 0):,} values, {summary['size_bytes'] / 1e6:.2f} MB"
    )
    click.echo(f"dtypes: {', '.join(summary.get('dtypes', []))}")
    meta = summary.get("metadata") or {}
    layers = meta.get("layers") or {}
    if meta.get("format"):
        click.echo(
            f"format: {meta['format']} v{meta.get('format_version')} (mono_quant {meta.get('mono_quant_version')})"
        )
    for name, cfg in layers.items():
        if cfg.get("kind") == "cast":
            click.echo(f"  {name}: {cfg['dtype']}")
        else:
            group = f" g{cfg['group_size']}" if cfg.get("group_size") else ""
            sym = "sym" if cfg.get("symmetric") else "asym"
            dynamic = cfg.get("activation") == "dynamic"
            grid = " (asymmetric per token)" if dynamic and cfg.get("activation_symmetric") is False else ""
            click.echo(f"  {name}: int{cfg.get('bits')} {sym}{group}, activation={cfg.get('activation')}{grid}")


@cli.command()
@click.argument("original", type=click.Path(exists=True, path_type=Path))
@click.argument("quantized", type=click.Path(exists=True, path_type=Path))
@click.option("--threshold", type=float, default=None, help="Minimum weight SQNR in dB (default by bit width).")
@click.option("--json", "as_json", is_flag=True)
def validate(original, quantized, threshold, as_json):
    """Check a quantized file against its original: per-layer SQNR, sizes, reload."""
    from mono_quant.io.formats import load_model, read_metadata
    from mono_quant.io.validation import validate_quantization

    meta = read_metadata(quantized)
    result = validate_quantization(
        load_model(original),
        load_model(quantized),
        on_failure="ignore",
        sqnr_threshold_db=threshold,
        layers=meta["layers"],
    )
    result.original_size_bytes = original.stat().st_size
    result.quantized_size_bytes = quantized.stat().st_size
    result.compression_ratio = result.original_size_bytes / max(result.quantized_size_bytes, 1)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(
            f"{'PASSED' if result.passed else 'FAILED'}: {len(result.layer_sqnr_db)} layers, "
            f"mean weight SQNR {_fmt_db(result.mean_weight_sqnr_db or 0)} dB, "
            f"min {_fmt_db(result.min_weight_sqnr_db or 0)} dB, "
            f"size {result.original_size_bytes / 1e6:.1f} -> {result.quantized_size_bytes / 1e6:.1f} MB "
            f"({result.compression_ratio:.2f}x), reload {'ok' if result.reload_ok else 'FAILED'}"
        )
        for message in result.errors + result.warnings:
            click.echo(f"  - {message}")
    if not result.passed:
        sys.exit(1)


@cli.command()
@click.argument("a", type=click.Path(exists=True, path_type=Path))
@click.argument("b", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def compare(a, b, as_json):
    """Per-layer SQNR (dB) between two model files (quantized ones are dequantized)."""
    rows = _sqnr_table(a, b)
    if as_json:
        click.echo(json.dumps({name: (None if math.isinf(v) else v) for name, v in rows}, indent=2))
        return
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {_fmt_db(value):>8} dB")
    finite = [v for _, v in rows if math.isfinite(v)]
    if finite:
        click.echo(f"{'mean':<{width}}  {sum(finite) / len(finite):>8.2f} dB")


def main() -> None:
    from mono_quant.cli import server_commands  # noqa: F401  (registers serve / submit)

    cli(prog_name="monoquant")


if __name__ == "__main__":
    main()
