"""GPU benchmarks (CUDA only; prints one ``skipped`` line and exits 0 elsewhere).

1. Quantization time of Llama-7B-shaped bf16 weights: per layer four 4096x4096 (q, k, v, o),
   two 11008x4096 (gate, up) and one 4096x11008 (down) projection; 32 layers (6.5 B params,
   12.95 GB) or as many as a third of free GPU memory holds (``--quick``: 2 layers). Cases:

   * ``copy``: ``dst.copy_(w)`` into preallocated tensors, the bandwidth floor;
   * ``plain_int8``: per-channel absmax rounding in four torch ops (the reference peer);
   * ``ours_int8`` / ``ours_int4_g128``: ``mono_quant.core.schemes.quantize_weight`` (int4:
     asymmetric group 128 with ``pack_int4``), eager, and ``*_compiled`` under ``torch.compile``
     when it works (compile time reported apart, never inside the timing);
   * ``ours_int4_g128_clip16``: int4 with the library's default MSE clipping search (eager).

2. Matmuls (weights rotated through more than the L2 cache, so each call reads HBM):
   ``torch._weight_int4pack_mm`` (tinygemm, group 128) vs bf16 at batch 1 and 32, and
   ``torch._int_mm`` (int8 x int8 -> int32) vs bf16 at batch 32 and 128, on 4096x4096 and
   11008x4096 weights; the int4 result's cosine vs the bf16 product on the dequantized weight
   checks the packing.

Timing: CUDA events, one warm-up then alternating rounds, medians. Every case runs in its own
try/except and prints an ``error`` line instead of stopping the script.

Usage: ``python bench/gpu.py [--quick] [--layers N] [--rounds R]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the repo, when not installed

from _common import emit, emit_error, log  # noqa: E402

BENCH = "gpu"
HIDDEN, INTERMEDIATE = 4096, 11008
LAYER_SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(INTERMEDIATE, HIDDEN)] * 2 + [(HIDDEN, INTERMEDIATE)]
GROUP = 128


def cuda_time(fn: Callable[[], object], inner: int = 1) -> float:
    """Seconds per call of ``fn`` between two CUDA events (``inner`` calls back to back)."""
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / 1e3 / inner


def alternate(cases: dict[str, Callable[[], object]], rounds: int, inner: int = 1) -> dict[str, list[float]]:
    """One warm-up call each, then ``rounds`` alternating timed rounds."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    torch.cuda.synchronize()
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(cuda_time(fn, inner))
    return samples


# -- quantization -------------------------------------------------------------------------------
def plain_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1, keepdim=True).float().div_(127).clamp_(min=1e-12)
    return torch.round(w.float() / scale).clamp_(-127, 127).to(torch.int8), scale


def ours_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from mono_quant.core.schemes import INT8_SYMMETRIC, PerChannel, quantize_weight

    qt = quantize_weight(w, INT8_SYMMETRIC, PerChannel(0))
    return qt.qdata, qt.scale


def ours_int4(w: torch.Tensor, clip_search_steps: int = 0) -> tuple[torch.Tensor, ...]:
    from mono_quant.core.schemes import INT4_ASYMMETRIC, PerGroup, pack_int4, quantize_weight

    qt = quantize_weight(w, INT4_ASYMMETRIC, PerGroup(GROUP), clip_search_steps)
    return pack_int4(qt.qdata), qt.scale, qt.zero_point


def bench_quantize(layers: int, rounds: int, try_compile: bool) -> None:
    weights = [
        torch.randn(shape, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(layers) for shape in LAYER_SHAPES
    ]
    numel = sum(w.numel() for w in weights)
    bf16_bytes = numel * 2
    log(f"{BENCH}: {layers} Llama-7B layers, {numel / 1e9:.2f} B params, {bf16_bytes / 1e9:.2f} GB bf16")
    targets = [torch.empty_like(w) for w in weights]

    def over_all(fn: Callable[[torch.Tensor], object]) -> Callable[[], None]:
        def run() -> None:
            for w in weights:
                fn(w)

        return run

    def copy() -> None:
        for dst, src in zip(targets, weights, strict=True):
            dst.copy_(src)

    cases: dict[str, Callable[[], None]] = {
        "copy": copy,
        "plain_int8": over_all(plain_int8),
        "ours_int8": over_all(ours_int8),
        "ours_int4_g128": over_all(ours_int4),
    }
    compile_s: dict[str, float] = {}
    checks: dict[str, dict[str, float]] = {}
    errors: dict[str, BaseException] = {}
    if try_compile:
        for name, fn in (("plain_int8", plain_int8), ("ours_int8", ours_int8), ("ours_int4_g128", ours_int4)):
            try:
                compiled = torch.compile(fn, dynamic=False)
                start = time.perf_counter()
                for shape in sorted(set(LAYER_SHAPES)):
                    compiled(torch.randn(shape, dtype=torch.bfloat16, device="cuda"))
                torch.cuda.synchronize()
                compile_s[f"{name}_compiled"] = time.perf_counter() - start
                checks[f"{name}_compiled"] = check_compiled(fn, compiled, weights[0])
                cases[f"{name}_compiled"] = over_all(compiled)
            except Exception as exc:  # noqa: BLE001 - torch.compile fails in many ways; report it
                errors[f"{name}_compiled"] = exc
    # Each case is warmed up and timed in its own try so one failure leaves the others.
    working: dict[str, Callable[[], None]] = {}
    for name, fn in cases.items():
        try:
            fn()
            torch.cuda.synchronize()
            working[name] = fn
        except Exception as exc:  # noqa: BLE001
            errors[name] = exc
    samples = alternate(working, rounds)
    try:
        start = time.perf_counter()
        clip = over_all(lambda w: ours_int4(w, 16))
        samples["ours_int4_g128_clip16"] = [cuda_time(clip) for _ in range(max(1, rounds // 2))]
        log(f"{BENCH}: clip16 took {time.perf_counter() - start:.1f} s")
    except Exception as exc:  # noqa: BLE001
        errors["ours_int4_g128_clip16"] = exc
    medians = {name: statistics.median(v) for name, v in samples.items()}
    floor = medians.get("copy")
    for name, seconds in medians.items():
        fields = {
            "layers": layers,
            "params": numel,
            "bf16_bytes": bf16_bytes,
            "median_ms": seconds * 1e3,
            "samples_ms": [s * 1e3 for s in samples[name]],
            "bf16_gb_per_s": bf16_bytes / seconds / 1e9,
            "x_copy_floor": None if floor is None else seconds / floor,
            "x_plain_int8": seconds / medians["plain_int8"] if "plain_int8" in medians else None,
        }
        if name in compile_s:
            fields["compile_s"] = compile_s[name]
            fields["vs_eager"] = checks.get(name)
        if name == "copy":
            fields["read_write_tb_per_s"] = 2 * bf16_bytes / seconds / 1e12
        emit(BENCH, f"quantize_{name}", **fields)
    for name, exc in errors.items():
        emit_error(BENCH, f"quantize_{name}", exc, layers=layers)


def check_compiled(eager: Callable, compiled: Callable, w: torch.Tensor) -> dict[str, float]:
    """Compare the compiled result with eager (a quiet miscompile would flatter the timing).

    Fused kernels may round a scale or zero point differently in the last bit (or divide
    where eager multiplies by the inverse), which moves values sitting on a rounding boundary
    by a step: with int4's 16 levels about 0.3% of them differ on an H100. So the check is on
    what matters: the weight SQNR of the compiled result must be within 0.05 dB of eager's.
    The fraction of differing integers is reported in ``vs_eager``.
    """
    from mono_quant.core.schemes import sqnr, unpack_int4

    def dequant(out: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if len(out) == 2:  # int8: (q [N, K], scale [N] or [N, 1])
            return out[0].float() * out[1].float().reshape(-1, 1)
        packed, scale, zero_point = out  # int4: packed [N, K/2], scale / zp [N, K/g]
        q = unpack_int4(packed).float().view(scale.shape[0], scale.shape[1], -1)
        return ((q - zero_point.float().unsqueeze(2)) * scale.float().unsqueeze(2)).view(w.shape)

    got, want = compiled(w), eager(w)
    diff = (got[0].int() - want[0].int()).abs()
    report = {
        "mismatch_frac": (diff > 0).float().mean().item(),
        "sqnr_db": sqnr(w.float(), dequant(got)),
        "eager_sqnr_db": sqnr(w.float(), dequant(want)),
    }
    if not abs(report["sqnr_db"] - report["eager_sqnr_db"]) <= 0.05:
        raise RuntimeError(f"torch.compile result differs from eager: {report}")
    return report


# -- matmuls ------------------------------------------------------------------------------------
def tinygemm_operands(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed weight, scales_and_zeros [K/g, N, 2] bf16, dequantized weight)`` for
    ``torch._weight_int4pack_mm``, from our asymmetric group-128 quantization.

    tinygemm computes ``w = (q - 8) * scale + zero``; ours is ``(q - zp) * scale``, so
    ``zero = (8 - zp) * scale``. Its packing wants ``[N, K/2]`` uint8 with the even element
    in the high nibble (torch >= 2.5; older versions take int32 ``[N, K]``).
    """
    from mono_quant.core.schemes import INT4_ASYMMETRIC, PerGroup, dequantize_weight, quantize_weight

    qt = quantize_weight(w, INT4_ASYMMETRIC, PerGroup(GROUP))
    q = qt.qdata
    try:
        packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
    except RuntimeError:
        packed = torch._convert_weight_to_int4pack(q.to(torch.int32), 8)
    scale = qt.scale.float()
    zeros = (8 - qt.zero_point.float()) * scale
    scales_and_zeros = torch.stack([scale.t(), zeros.t()], dim=2).contiguous().to(torch.bfloat16)
    return packed, scales_and_zeros, dequantize_weight(qt, torch.bfloat16)


def bench_matmul(rounds: int, quick: bool) -> None:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    for n, k in ((HIDDEN, HIDDEN), (INTERMEDIATE, HIDDEN)):
        bench_matmul_shape(n, k, rounds, quick, l2)
        torch.cuda.empty_cache()


def bench_matmul_shape(n: int, k: int, rounds: int, quick: bool, l2: int) -> None:
    copies = max(2, int(4 * l2 // (n * k * 2)) + 1)  # bf16 set > 4x L2: every call reads HBM
    weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]
    shape = f"{n}x{k}"
    try:
        int4 = [tinygemm_operands(w) for w in weights]
    except Exception as exc:  # noqa: BLE001
        emit_error(BENCH, f"int4pack_mm_{shape}", exc)
        int4 = None
    for batch in (1, 32):
        case = f"int4pack_mm_{shape}_b{batch}"
        try:
            if int4 is None:
                raise RuntimeError("no int4 operands (see the error above)")
            x = torch.randn(batch, k, dtype=torch.bfloat16, device="cuda")
            packed, sz, dq = int4[0]
            got = torch._weight_int4pack_mm(x, packed, GROUP, sz)
            cosine = torch.nn.functional.cosine_similarity(got.float().flatten(), (x @ dq.t()).float().flatten(), dim=0)
            state = {"i": 0}

            def bf16(x=x, state=state):
                state["i"] = (state["i"] + 1) % copies
                return x @ weights[state["i"]].t()

            def tiny(x=x, state=state):
                state["i"] = (state["i"] + 1) % copies
                p, s, _ = int4[state["i"]]
                return torch._weight_int4pack_mm(x, p, GROUP, s)

            samples = alternate({"bf16": bf16, "int4": tiny}, rounds, inner=20 if quick else 100)
            bf, i4 = statistics.median(samples["bf16"]), statistics.median(samples["int4"])
            emit(
                BENCH,
                case,
                weight=shape,
                batch=batch,
                bf16_us=bf * 1e6,
                int4_us=i4 * 1e6,
                speedup_vs_bf16=bf / i4,
                cosine_vs_dequant_bf16=float(cosine),
            )
        except Exception as exc:  # noqa: BLE001
            emit_error(BENCH, case, exc, weight=shape, batch=batch)
    for batch in (32, 128):
        case = f"int_mm_{shape}_b{batch}"
        try:
            w8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda") for _ in range(copies)]
            x8 = torch.randint(-127, 128, (batch, k), dtype=torch.int8, device="cuda")
            xb = torch.randn(batch, k, dtype=torch.bfloat16, device="cuda")
            state = {"i": 0}

            def bf16(xb=xb, state=state):
                state["i"] = (state["i"] + 1) % copies
                return xb @ weights[state["i"]].t()

            def int8(x8=x8, w8=w8, state=state):
                state["i"] = (state["i"] + 1) % copies
                return torch._int_mm(x8, w8[state["i"]].t())

            samples = alternate({"bf16": bf16, "int8": int8}, rounds, inner=20 if quick else 100)
            bf, i8 = statistics.median(samples["bf16"]), statistics.median(samples["int8"])
            emit(
                BENCH,
                case,
                weight=shape,
                batch=batch,
                bf16_us=bf * 1e6,
                int_mm_us=i8 * 1e6,
                speedup_vs_bf16=bf / i8,
            )
        except Exception as exc:  # noqa: BLE001
            emit_error(BENCH, case, exc, weight=shape, batch=batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, short timings")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    parser.add_argument("--only", choices=("quantize", "matmul"), default=None, help="run one part")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        emit(BENCH, "all", skipped="CUDA is not available", torch=torch.__version__)
        return
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    per_layer = sum(n * k for n, k in LAYER_SHAPES) * 2
    # weights + copy targets + the int8 results and temporaries: about 3x the bf16 set
    fit = max(1, int(free / 3 // per_layer))
    layers = args.layers or (2 if args.quick else min(32, fit))
    rounds = args.rounds or (2 if args.quick else 5)
    emit(
        BENCH,
        "device",
        name=props.name,
        total_gib=total / 2**30,
        free_gib=free / 2**30,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        layers=layers,
        rounds=rounds,
    )
    if args.only in (None, "quantize"):
        try:
            bench_quantize(layers, rounds, try_compile=not args.no_compile)
        except Exception as exc:  # noqa: BLE001
            emit_error(BENCH, "quantize", exc, layers=layers)
        torch.cuda.empty_cache()
    if args.only in (None, "matmul"):
        try:
            bench_matmul(rounds, args.quick)
        except Exception as exc:  # noqa: BLE001
            emit_error(BENCH, "matmul", exc)


if __name__ == "__main__":
    main()
