"""Matmul kernels behind the quantized layers' forward, chosen per device.

Measured on Zen 4 (AVX-512 VNNI and BF16, no AMX; torch 2.13, 2 threads) on a 4096x4096
layer, batch 1 / 32 / 256 (fp32: 3.5 / 12.8 / 55 ms); figures marked AMX Xeon are from an
Intel Xeon with AMX (2 vCPUs shared with other work: 1 thread, CPU time, ratios only):

* int8 x int8 -> oneDNN's ``qlinear_pointwise`` or fbgemm's GEMM (:func:`cpu_int8_engine`
  picks one per process by CPU kind), with the weight prepacked once: oneDNN 0.16 / 1.36 /
  10.5 ms. ``torch._int_mm`` reaches 0.9 / 2.1 / 13.8 ms (it re-packs the weight on every
  call), ``torch._weight_int8pack_mm`` is 2-40x slower than fp32, and dequantizing an int8
  weight to float costs more than the fp32 matmul itself.
    - dynamic:     activations quantized per token to int8 (one term).
    - weight-only: activations split per token into two int8 terms, ``x ~ s (a + b / 254)``,
                   stacked into one call: about 1/64000 of the row maximum, so the only error
                   left is the weights'.
    - static:      the calibrated per-tensor qparams, zero point passed to the kernel.
* int4 -> ``torch._weight_int4pack_mm_for_cpu`` with bf16 activations, the weight held in
  that kernel's block layout: 0.46 / 6.3 / 50 ms (with fp32 activations the same kernel is
  ~70x slower, which is what earlier notes measured). From a few dozen rows on, where that
  kernel is compute-bound, :func:`cpu_int4_dense_linear` dequantizes the weight per call into
  bf16 for the dense GEMM instead (fp32 on AVX2-only CPUs; rows and dtype by CPU kind,
  :func:`cpu_int4_dense_choice`).
  Shapes the kernel cannot take fall back to :func:`int4_grouped_linear` on ``_int_mm``.

Choices that depend on the CPU read :func:`mono_quant.modules.cpu_features.cpu_features`
(AMX, AVX-512 VNNI / BF16, AVX2), detected once; where they are unknown the generic paths
run (the int4 kernel at every size, oneDNN / ``_int_mm`` for int8).

At batch 1 oneDNN's int8 kernel is the gap to fbgemm on Zen 4: 4096x4096, 1 thread, CPU time,
the kernel call alone 0.8-1.1 ms warm (1.7-1.85 cold) against 0.4-0.55 (1.1-1.25) for all of
``quantize_dynamic``'s layer, whatever the source zero point or the prepack's shape hint. Holding
fbgemm's packed copy beside oneDNN's would double the int8 weight's memory, so a process uses
one engine for every layer (see :func:`cpu_int8_engine` for which, and how to override it).

``_int_mm`` (:func:`int8_linear`) remains the fallback for asymmetric int8 weights and torch
builds without either engine. On CUDA, int8 x int8 uses ``_int_mm`` where its shape rules hold
(M > 16, K and N multiples of 8), int4 uses tinygemm (``_weight_int4pack_mm``) for bf16
inputs, and the rest dequantize to the activation dtype for the tensor-core matmul.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from mono_quant.core.scratch import scratch
from mono_quant.errors import ConfigurationError
from mono_quant.modules.cpu_features import CpuFeatures, aten_capability, cpu_features

__all__ = [
    "CpuInt8Weight",
    "cpu_int4_block",
    "cpu_int4_dense_choice",
    "cpu_int4_dense_linear",
    "cpu_int4_dense_min_rows",
    "cpu_int4_dense_qparams",
    "cpu_int8_engine",
    "cpu_int8_linear",
    "cpu_int8_static_linear",
    "kernel_group_size",
    "quantize_per_token",
    "quantize_per_token_asymmetric",
    "subtract_zero_share",
    "int8_linear",
    "int4_grouped_linear",
    "int_mm_supported",
]

# Second-term multiplier for the two-term activation split: the residual of the first
# rounding lies in [-0.5, 0.5], so 254 maps it onto [-127, 127].
_RESIDUAL_STEPS = 254.0

# Adding 1.5 * 2**23 to an fp32 value in (-2**22, 2**22) rounds it to an integer, half to even as
# torch.round, and leaves that integer (plus 2**22) in the low mantissa bits: the low byte of the
# sum's bits is then the int8 code, as two's complement, or code + offset for an even offset
# (the parity, so the rounding of ties, is unchanged). One add and an int32 -> int8 / uint8 cast
# (which keeps the low byte) replace round, cast and shift: 10-20% of the per-token
# quantization on Zen 4 (1 thread; 256 x 4096: 0.50 against 0.60 ms), the same codes.
_ROUNDING_MAGIC = 12582912.0


def int_mm_supported(x_rows: int, in_features: int, out_features: int, device: torch.device) -> bool:
    """Whether ``torch._int_mm`` takes this shape on this device."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return x_rows > 16 and in_features % 8 == 0 and out_features % 8 == 0
    return False


def quantize_per_token(
    x2d: torch.Tensor,
    terms: int,
    offset: int = 0,
    dtype: torch.dtype = torch.int8,
    multiplier: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization of ``x2d [M, K]`` (times ``multiplier [K]`` when
    given: SmoothQuant's input scale) with ``terms`` (1 or 2) terms.

    Returns ``(q [terms * M, K], scale [M, 1] fp32)`` with
    ``x ~ scale * (q[:M] + q[M:] / 254)`` for two terms. ``offset=128, dtype=torch.uint8``
    gives the same values shifted into uint8 (zero point 128), which oneDNN's kernel takes;
    ``dtype=torch.float32`` the same integers as floats, which fbgemm's kernel takes.
    """
    # Integer kernels are not differentiable: keep autograd out of the scale arithmetic too.
    x, owned = _float_input(x2d, multiplier)
    # amin + amax rather than aminmax(dim=...), which is ~15x slower on the CPU (torch 2.13)
    amax = torch.maximum(x.amin(dim=1, keepdim=True).neg_(), x.amax(dim=1, keepdim=True)).clamp_(min=1e-12)
    # multiply by the inverse: a broadcast divide is slower
    scaled = x.mul_(127.0 / amax) if owned else x * (127.0 / amax)
    scale = amax.div_(127.0)
    if terms == 1:
        return _round_to_codes(scaled, offset, dtype), scale
    rows = x.shape[0]
    codes_dtype = torch.float32 if dtype == torch.float32 else torch.int8
    q = torch.empty((2 * rows, x.shape[1]), dtype=codes_dtype, device=x.device)
    first = torch.round(scaled)
    q[:rows] = first
    q[rows:] = scaled.sub_(first).mul_(_RESIDUAL_STEPS).round_()
    return _shift_codes(q, offset, dtype), scale


def quantize_per_token_asymmetric(
    x2d: torch.Tensor,
    offset: int = 0,
    dtype: torch.dtype = torch.int8,
    multiplier: torch.Tensor | None = None,
    rounded: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-row int8 quantization of ``x2d [M, K]`` (times ``multiplier [K]``): each
    row's range ``[min(x, 0), max(x, 0)]`` onto 256 levels.

    Returns ``(q [M, K], scale [M, 1], zero [M, 1])`` with ``x ~ scale * (q - zero)``: codes in
    [-128, 127] (fp32 codes: 128 where a tie rounds up at the top, for a kernel that saturates
    its uint8 conversion) and ``zero`` the row's zero point minus 128 (integer-valued fp32). ``offset`` /
    ``dtype`` as in :func:`quantize_per_token` (``128, torch.uint8``: the codes plus 128, i.e.
    ``round(x / scale) + zero point``, what oneDNN takes). A row whose values share one sign
    (BERT's post-LayerNorm rows with their large negative channels, GELU outputs) gets twice
    the resolution of the symmetric grid, which spends half its levels on the side it never uses.

    ``rounded=False`` (fp32 codes only) leaves ``x / scale + zero`` unrounded, for a kernel that
    rounds its float input itself (fbgemm's conversion to uint8: one pass fewer here).
    """
    x, owned = _float_input(x2d, multiplier)
    low = x.amin(dim=1, keepdim=True).clamp_(max=0.0)
    scale = x.amax(dim=1, keepdim=True).clamp_(min=0.0).sub_(low).clamp_(min=1e-12).div_(255.0)
    inverse = scale.reciprocal()
    zero = low.mul_(inverse).round_().neg_().sub_(128.0)  # round(-min / scale) - 128, in [-128, 127]
    # x / scale + zero, rounded: round(x / scale) + zero, as zero is an integer (a multiply and an
    # add: a broadcast addcmul is 2.5x slower on the CPU, 48 against 20 us on 512 x 384)
    scaled = (x.mul_(inverse) if owned else x * inverse).add_(zero)
    if (offset, dtype) == (0, torch.float32):
        # Not clamped: a tie at the top of a row can round to 128, which the integer kernels'
        # own conversion to uint8 saturates to 255 (the clamp's value), one pass fewer
        return (scaled.round_() if rounded else scaled), scale, zero
    if not rounded:
        raise ValueError("unrounded codes are fp32 codes (offset 0)")  # internal use
    # the clamp catches that one-step overshoot before the cast, which would wrap it
    return _round_to_codes(scaled.clamp_(-128.0, 127.0), offset, dtype), scale, zero


def subtract_zero_share(
    out: torch.Tensor, act_scale: torch.Tensor, act_zero: torch.Tensor, row_sums: torch.Tensor
) -> torch.Tensor:
    """``out -= (act_scale * act_zero) (x) row_sums`` in place: the share of asymmetric
    activations' zero points (:func:`quantize_per_token_asymmetric`) in a product whose codes
    went in without them. ``row_sums [N]``: the dequantized weight's sums over its inputs."""
    return out.addr_((act_scale * act_zero).view(-1), row_sums, alpha=-1.0)


def _float_input(x2d: torch.Tensor, multiplier: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """``(x2d * multiplier in fp32, out of autograd; whether that is a new tensor)``: it is new
    (the caller may scale it in place) unless ``x2d`` is fp32 and there is no multiplier.

    SmoothQuant's ``x * (1 / s)`` happens here, in the pass that makes the fp32 copy anyway, so
    the quantization scales that copy in place instead of allocating another one: on Zen 4
    (1 thread) the multiply then costs 0-40% of the quantization instead of 30-70% (512 x 1536:
    0.37 ms unsmoothed, 0.62 ms with a separate multiply, 0.40 ms folded).
    """
    x = x2d.detach()
    if multiplier is not None:
        x = x * multiplier
        return (x if x.dtype == torch.float32 else x.float()), True
    return (x, False) if x.dtype == torch.float32 else (x.float(), True)


def _round_to_codes(scaled: torch.Tensor, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """``round(scaled) + offset`` as ``dtype`` (int8 with offset 0, uint8 with 128), for fp32
    ``scaled`` in [-127, 127] that the caller owns (it is overwritten); fp32 integers for
    ``torch.float32`` (offset 0)."""
    if (offset, dtype) == (0, torch.float32):
        return scaled.round_()
    if (offset, dtype) not in ((0, torch.int8), (128, torch.uint8)):
        raise ValueError(f"unsupported activation code offset {offset} for {dtype}")  # internal use
    return scaled.add_(_ROUNDING_MAGIC + offset).view(torch.int32).to(dtype)


def _shift_codes(q: torch.Tensor, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """int8 codes in [-127, 127] as ``dtype`` shifted by ``offset`` (0 / int8 or 128 / uint8).

    +128 is the int8 byte with its sign bit flipped: one byte-wide pass, 2-2.5x faster than
    adding 128 in fp32 before the cast (AMX Xeon, 1 thread: 0.22 against 0.45 ms on [512, 1536]).
    """
    if offset == 0 and dtype in (torch.int8, torch.float32):
        return q
    if offset == 128 and dtype == torch.uint8:
        return q.view(torch.uint8).bitwise_xor_(0x80)
    raise ValueError(f"unsupported activation code offset {offset} for {dtype}")  # internal use


def _combine_terms(acc: torch.Tensor, rows: int, terms: int) -> torch.Tensor:
    """``acc [terms * M, N]`` -> float ``[M, N]`` = first + second / 254."""
    out = acc[:rows].float()
    if terms == 2:
        out.add_(acc[rows:].float(), alpha=1.0 / _RESIDUAL_STEPS)
    return out


def int8_linear(
    x2d: torch.Tensor,
    weight_kn: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    terms: int,
    multiplier: torch.Tensor | None = None,
    row_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(x2d [M, K] * multiplier) @ dequant(weight)^T`` with per-token int8 activations on
    ``_int_mm``.

    ``weight_kn`` is the int8 weight as ``[K, N]`` (a transposed view of the ``[N, K]``
    weight); ``weight_scale`` / ``weight_zero_point`` are per output channel ``[N]``;
    ``multiplier [K]``: SmoothQuant's input scale, or None; ``row_sums [N]`` (the dequantized
    weight's, one term only): asymmetric activations, None: symmetric.
    """
    rows = x2d.shape[0]
    if row_sums is None:
        q, act_scale = quantize_per_token(x2d, terms, multiplier=multiplier)
    else:
        q, act_scale, act_zero = quantize_per_token_asymmetric(x2d, multiplier=multiplier)
    acc = torch._int_mm(q, weight_kn)
    if weight_zero_point is not None:
        # sum_k x_k (w_nk - z_n) = sum_k x_k w_nk - z_n sum_k x_k
        acc -= q.sum(dim=1, keepdim=True, dtype=torch.int32) * weight_zero_point
    out = _combine_terms(acc, rows, terms)
    out.mul_(act_scale).mul_(weight_scale)
    if row_sums is not None:
        subtract_zero_share(out, act_scale, act_zero, row_sums)
    if bias is not None:
        out.add_(bias)
    return out


def int4_grouped_linear(
    x2d: torch.Tensor,
    qweight_packed: torch.Tensor,
    group_scales: torch.Tensor,
    group_zero_points: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    terms: int = 2,
) -> torch.Tensor:
    """Group-wise int4 weight matmul on ``_int_mm``, straight from the packed weight.

    ``qweight_packed [N, K // 2]`` holds input feature ``2j`` in the low nibble of byte ``j``
    and ``2j + 1`` in the high one, so ``packed & 15`` and ``packed >> 4`` are the weights of
    the even and odd input features: multiplying them by the even and odd activation columns
    needs no unpacking or interleaving of the weight. Per group (``g`` input features):

        y[m, n] = a[m] * (sum_g s[n, g] * acc_g[m, n]  -  sum_g xs[m, g] * s[n, g] * z[n, g])

    with ``acc_g`` the integer product of the group and ``xs`` the group sums of the
    quantized activations; the zero-point term is one small ``[M, G] x [G, N]`` matmul.
    ``group_scales`` / ``group_zero_points`` are ``[N, G]``.
    """
    rows, in_features = x2d.shape
    out_features = qweight_packed.shape[0]
    groups = in_features // group_size
    half = group_size // 2
    q, act_scale = quantize_per_token(x2d, terms)
    stacked = q.shape[0]
    q_groups = q.view(stacked, groups, half, 2).permute(3, 1, 0, 2).contiguous()  # [2, G, R, g/2]
    low = (qweight_packed & 0x0F).view(torch.int8)
    high = (qweight_packed >> 4).view(torch.int8)
    scales_t = group_scales.t().contiguous()  # [G, N]
    out = torch.zeros((rows, out_features), dtype=torch.float32, device=x2d.device)
    for g in range(groups):
        cols = slice(g * half, (g + 1) * half)
        acc = torch._int_mm(q_groups[0, g], low[:, cols].t())
        acc += torch._int_mm(q_groups[1, g], high[:, cols].t())
        out.addcmul_(_combine_terms(acc, rows, terms), scales_t[g])
    group_sums = q.view(stacked, groups, group_size).sum(dim=2, dtype=torch.int32)
    group_sums = _combine_terms(group_sums, rows, terms)  # [M, G]
    out.sub_(group_sums @ (group_scales * group_zero_points.float()).t())
    out.mul_(act_scale)
    if bias is not None:
        out.add_(bias)
    return out


def tinygemm_pack(
    qweight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repack a group-wise int4 weight for ``torch._weight_int4pack_mm`` (CUDA "tinygemm").

    ``qweight_packed [N, K // 2]`` (our layout: element 2i in the low nibble), scales and
    integer zero points ``[N, K // g]``. tinygemm dequantizes ``(q - 8) * scale + zero`` with
    a float zero, so ``zero = (8 - zero_point) * scale`` gives exactly our
    ``(q - zero_point) * scale``. Returns ``(weight, scales_and_zeros [K // g, N, 2] bf16)``.
    """
    from mono_quant.core.schemes import unpack_int4

    q = unpack_int4(qweight_packed)  # [N, K], values 0..15
    k = q.shape[1]
    tinygemm_order = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8)  # tinygemm: high nibble first
    inner_k_tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
    weight = torch._convert_weight_to_int4pack(tinygemm_order.contiguous(), inner_k_tiles)
    return weight, int4_scales_and_zeros(weight_scale, weight_zero_point)


def tinygemm_linear(
    x2d: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """bf16 ``x2d [M, K]`` times a tinygemm-packed int4 weight, plus bias."""
    out = torch._weight_int4pack_mm(x2d.to(torch.bfloat16).contiguous(), weight, group_size, scales_and_zeros)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out


# torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) takes the weight in blocks of output
# rows whose size depends on the code ATen dispatches to (``aten/src/ATen/native/cpu/int4mm_kernel.cpp``,
# ``weight_to_int4pack_kernel``: ``BLOCK_N = Vectorized<float>::size() * 4``): 64 rows with AVX-512,
# 32 with AVX2. In a block of B rows, byte ``[k, i]`` holds row ``i`` of input column ``k`` in its
# low nibble and row ``i + B / 2`` in its high nibble. (The generic build pairs neighbouring rows
# instead; it is not used: those layers run on ``int4_grouped_linear``.) Measured on Zen 4 with bf16
# activations on a 4096x4096 layer: 10x faster than fp32 at batch 1, 2.3x at 32, 1.15x at 256.
_CPU_INT4_BLOCKS = {"AVX512": 64, "AVX2": 32}
_LAYOUT_CHUNK_BYTES = 1 << 20  # per buffer of to_cpu_int4_layout: cache-sized


def kernel_group_size(group_size: int, in_features: int, smallest: int = 16) -> int | None:
    """The group size an int4 kernel runs a layer with: ``group_size`` when it divides
    ``in_features``, else the largest power of two below it (down to ``smallest``) that does,
    with the qparams restated per kernel group (``schemes.regroup``, exact); None when none
    does (the layer then runs dequantized)."""
    size = group_size
    while size >= smallest:
        if in_features % size == 0:
            return size
        size //= 2
    return None


def cpu_int4_block() -> int | None:
    """Output rows per block of the CPU int4 kernel's weight layout in this process (64 where ATen
    dispatches to AVX-512, 32 with AVX2); None where we do not use that kernel."""
    return _CPU_INT4_BLOCKS.get(aten_capability().upper())


def cpu_int4_supported(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether the layer's shape fits torch's CPU int4 kernel."""
    block = cpu_int4_block()
    return (
        hasattr(torch, "_weight_int4pack_mm_for_cpu")
        and block is not None
        and out_features % block == 0
        and in_features % group_size == 0
        and group_size in (32, 64, 128, 256)
    )


def to_cpu_int4_layout(packed: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Our int4 packing ``[N, K // 2]`` (low nibble = even input feature) -> the CPU kernel's
    layout in blocks of ``block`` rows (default: this process's, :func:`cpu_int4_block`), same
    shape and size (equal to ``torch._convert_weight_to_int4pack_for_cpu`` of the unpacked values)."""
    block = block or _required_cpu_int4_block()
    # Straight from the packed bytes (2.5x faster than unpacking first, the cold int4 path):
    # rows come in blocks, whose first and second halves share each output byte; a packed
    # byte holds columns 2j (low nibble) and 2j + 1 (high nibble). A few blocks at a time through
    # two cache-sized buffers (see core/scratch.py): whole-tensor temporaries fault their pages in
    # in a fresh process, 0.46 of 0.83 s of quantizing 16 x 4096 x 4096 to int4 (Zen 4).
    rows, half = packed.shape
    blocks, width = rows // block, block // 2
    out = torch.empty((blocks, half, 2, width), dtype=torch.uint8, device=packed.device)
    step = max(1, _LAYOUT_CHUNK_BYTES // (width * half))
    shape = (min(step, blocks), width, half)
    low = scratch("to_cpu_int4_layout.low", shape, torch.uint8, packed.device)
    high = scratch("to_cpu_int4_layout.high", shape, torch.uint8, packed.device)
    for start in range(0, blocks, step):
        stop = min(start + step, blocks)
        pairs = packed[start * block : stop * block].view(stop - start, 2, width, half)
        first, second = pairs[:, 0], pairs[:, 1]
        a, b = low[: stop - start], high[: stop - start]
        # column 2j: first's low nibble, second's as high; column 2j + 1: the high nibbles
        torch.bitwise_and(first, 0x0F, out=a).bitwise_or_(torch.bitwise_left_shift(second, 4, out=b))
        out[start:stop, :, 0] = a.transpose(1, 2)
        torch.bitwise_right_shift(first, 4, out=a).bitwise_or_(torch.bitwise_and(second, 0xF0, out=b))
        out[start:stop, :, 1] = a.transpose(1, 2)
    return out.view(rows, half)


def from_cpu_int4_layout(blocked: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Inverse of :func:`to_cpu_int4_layout` (the same ``block``)."""
    from mono_quant.core.schemes import pack_int4

    block = block or _required_cpu_int4_block()
    rows, half = blocked.shape
    cols = 2 * half
    merged = blocked.view(rows // block, cols, block // 2).transpose(1, 2)
    q = torch.stack((merged & 0x0F, merged >> 4), dim=1).reshape(rows, cols)
    return pack_int4(q)


def _required_cpu_int4_block() -> int:
    block = cpu_int4_block()
    if block is None:  # internal: callers check cpu_int4_supported first
        raise RuntimeError(f"no CPU int4 kernel layout for ATen capability {aten_capability()}")
    return block


def int4_scales_and_zeros(
    weight_scale: torch.Tensor, weight_zero_point: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``[K // g, N, 2]`` (scale, zero) for the int4 kernels, which compute
    ``(q - 8) * scale + zero``: ``zero = (8 - zero_point) * scale`` is exactly our
    ``(q - zero_point) * scale``."""
    scale = weight_scale.float()
    zero = (8.0 - weight_zero_point.float()) * scale
    return torch.stack([scale.t(), zero.t()], dim=2).to(dtype).contiguous()


def cpu_int4_linear(
    x2d: torch.Tensor, blocked: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x2d [M, K]`` (computed in bf16) times a CPU-layout int4 weight, plus bias, in fp32."""
    out = torch._weight_int4pack_mm_for_cpu(x2d.to(torch.bfloat16).contiguous(), blocked, group_size, scales_and_zeros)
    out = out.float()
    if bias is not None:
        out.add_(bias)
    return out


# -- int4 at many rows: dequantize per call, dense GEMM ------------------------------------------
# ``_weight_int4pack_mm_for_cpu`` dequantizes inside its inner loop, so past a few dozen rows it
# is compute-bound and falls behind fp32 (4096x4096 at 256 rows: 1.5-1.8x fp32 on the AMX Xeon,
# 0.9x on Zen 4, 1.1-1.3x on MiniLM's layers there). There, dequantizing the weight once per
# call into bf16 and running the dense bf16 GEMM (AMX tiles / AVX-512 BF16) is faster: the
# dequantization costs a fixed ~1 ns per weight whatever the batch, and a GEMM row is ~7x
# cheaper than the int4 kernel's on AMX, ~2x on Zen 4. AMX Xeon, 1 thread, CPU time, ms on
# 4096x4096 (int4 kernel / dense / fp32; dense measured before its dequantization got ~30%
# faster):
#     32 rows  14.2 / 43 / 19.8     64 rows  28.6 / 39 / 29     128 rows  56 / 45 / 43
#     256 rows 118 / 59 / 81
# and MiniLM's layers at 512 rows: 384x384 2.1 / 0.8-1.0 / 1.1, 1536x384 8.5 / 2.3 / 4.2.
# Zen 4 (AVX-512 BF16, no AMX), 1 thread, CPU time, x fp32 (int4 kernel / dense):
#     rows        1           32          64          80          96          128         256         512
#     4096x4096   0.24/3.5    0.64/1.09   0.79/0.83   0.76/0.71   0.83/0.70   0.79/0.56   0.89/0.48   0.95/0.46
#     384->384    0.80/11.6   1.06/2.12   1.10/1.40   1.10/1.21   1.21/1.21   1.28/1.10   1.22/0.82   1.27/0.70
#     384->1536   0.60/7.4    0.98/1.44   1.08/1.09   1.16/0.93   1.17/0.93   1.22/0.81   1.15/0.70   1.12/0.59
#     1536->384   0.66/8.7    1.02/1.46   1.08/0.98   1.13/0.93   1.04/0.83   1.07/0.79   1.13/0.70   1.14/0.63
# (fp32 4096x4096: 4.1 / 24 / 38 / 51 / 55 / 77 / 133 / 252 ms). Dequantizing to fp32 for the
# fp32 GEMM is never the fastest there (1.1-1.8x fp32 at 32-512 rows). Between ~32 and ~150 rows
# MiniLM's small layers are 5-25% slower than fp32 whichever int4 path runs.
# Nothing is kept between calls: the dequantized weight lives one call, in slices of
# ``_DENSE_CHUNK_ELEMENTS`` (8 MB in bf16), so a large layer never holds all of it at once.
# Smaller slices stay in L2 (1M elements: 54 against 59 ms at 256 rows on the AMX Xeon) but cost
# more ops, and each op is a parallel region: with 2 threads on a shared machine 16 slices took
# 1.7x the time of 4.
_DENSE_CHUNK_ELEMENTS = 1 << 22

# Rows from which the dense path wins, by CPU kind (see above). AMX: measured crossover between
# 64 and 128 rows. AVX-512 BF16 without AMX (Zen 4): measured crossover 64-96 rows (64 on the
# 4096 layer and MiniLM's 384 -> 1536 / 1536 -> 384, 96 on 384 -> 384); from 80 the dense path
# is at most 10% behind the kernel (384 -> 384 at 80-95 rows) and up to 25% ahead elsewhere.
# Without bf16 hardware a bf16 GEMM is emulated (25-50x fp32): AVX2-only CPUs dequantize to fp32
# for the fp32 GEMM instead, from 64 rows; measured by emulation on Zen 4 (ATEN_CPU_CAPABILITY=avx2,
# ONEDNN_MAX_CPU_ISA=AVX2), where the int4 kernel's AVX2 code is 1.2-1.9x fp32 from 32 rows
# (4096x4096 x fp32, kernel / fp32 dense: 64 rows 1.37 / 1.34, 128: 1.44 / 1.15, 256: 1.71 / 1.04;
# MiniLM's layers at 128 rows 1.6-1.8 / 1.3-1.4). AVX-512 without BF16 (emulated the same way:
# ATen avx512, oneDNN AVX512_CORE_VNNI) keeps the int4 kernel, at most as slow as the fp32 dense
# path there (4096x4096 at 512 rows 0.90 / 0.96 x fp32, 384 -> 384 1.21 / 1.26). CPUs whose
# features are unknown (non-x86, no /proc/cpuinfo) keep the kernel too.
_DENSE_MIN_ROWS_AMX = 96
_DENSE_MIN_ROWS_AVX512_BF16 = 80
_DENSE_FP32_MIN_ROWS_AVX2 = 64


def cpu_int4_dense_choice(features: CpuFeatures | None = None) -> tuple[int, torch.dtype] | None:
    """``(rows, dtype)``: from how many rows :func:`cpu_int4_dense_linear` beats the int4 kernel on
    this CPU, and the GEMM dtype it dequantizes to; None: never."""
    features = features or cpu_features()
    if features.amx_bf16:
        return _DENSE_MIN_ROWS_AMX, torch.bfloat16
    if features.avx512_bf16:
        return _DENSE_MIN_ROWS_AVX512_BF16, torch.bfloat16
    if features.avx2 and not features.avx512:
        return _DENSE_FP32_MIN_ROWS_AVX2, torch.float32
    return None


def cpu_int4_dense_min_rows(features: CpuFeatures | None = None) -> int | None:
    """Rows from which :func:`cpu_int4_dense_linear` beats the int4 kernel on this CPU; None:
    never (see :func:`cpu_int4_dense_choice`)."""
    choice = cpu_int4_dense_choice(features)
    return None if choice is None else choice[0]


def cpu_int4_dense_qparams(
    group_scales: torch.Tensor,
    group_zero_points: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`cpu_int4_dense_linear` needs, from per-group scales and integer zero points
    ``[N, G]``: ``(scale, -8 * scale)`` in ``dtype`` (the GEMM's: bf16, or fp32 where bf16 has
    no hardware) ``[G, 1, 2, N // B, B // 2]`` for the layout's blocks of B rows (output rows in
    the order the dense path unpacks them: nibble, block, row in the half block) and
    ``offset = (8 - zero_point) * scale`` fp32 ``[G, N]`` (natural order).

    The weight is dequantized centred, ``(q - 8) * scale``, before its bf16 rounding (half the
    magnitude of ``q * scale``: ~50 dB against the fp32 product, like the int4 kernel, rather
    than ~45), and the rest, ``(8 - zero_point) * scale``, is added in fp32 from group sums of
    the activations.
    """
    block = block or _required_cpu_int4_block()
    scale = group_scales.float().t()  # [G, N]
    groups, out_features = scale.shape
    offset = ((8.0 - group_zero_points.float()) * group_scales.float()).t().contiguous()

    def unpack_order(t: torch.Tensor) -> torch.Tensor:
        # column b * B + h * B / 2 + i -> [h, b, i]
        t = t.reshape(groups, out_features // block, 2, block // 2).transpose(1, 2)
        return t.unsqueeze(1).to(dtype).contiguous()

    return unpack_order(scale), unpack_order(scale * -8.0), offset


def cpu_int4_dense_linear(
    x2d: torch.Tensor,
    blocked: torch.Tensor,
    dense_qparams: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x2d [M, K]`` times a CPU-layout int4 weight ``[N, K // 2]``, dequantized per call for
    the dense GEMM in the dtype of ``dense_qparams`` (from :func:`cpu_int4_dense_qparams`: bf16,
    the activations rounded to it too, or fp32); plus bias, fp32 ``[M, N]``.

    In the CPU layout a block of B output rows is a ``[K, B / 2]`` byte array (low nibble: row
    ``i``, high: row ``i + B / 2``; B is in the shapes of ``dense_qparams``), so the nibbles of a
    slice of blocks give its part of ``W^T`` without transposing the weight, only its columns come
    out as (nibble, block, row) rather than (block, nibble, row): the qparams are stored in that
    order and the GEMM's output goes back to the natural one in the copy that turns it to fp32.
    Per slice:

    * the slice's bytes are first copied to ``[K, blocks * B / 2]`` (one strided byte pass): every
      later pass then runs over long contiguous rows. Unpacking the nibbles straight from the
      blocked layout, 32 bytes at a time, made those passes 3-6x slower (Zen 4: the whole
      dequantization 23 against 16 ms on 4096x4096, same numbers);
    * the nibbles go to a uint8 buffer first, so that the cast and the scaling run over operands
      of one memory order (vectorised; a mixed-dtype or mixed-stride op is ~4x slower).
    """
    scale, minus_eight_scale, offset = dense_qparams
    rows, in_features = x2d.shape
    half = scale.shape[-1]
    block = 2 * half
    n_blocks = blocked.shape[0] // block
    groups = in_features // group_size
    by_block = blocked.view(n_blocks, in_features, half)
    step = min(n_blocks, max(1, _DENSE_CHUNK_ELEMENTS // (block * in_features)))
    dtype = scale.dtype
    x_gemm = x2d.detach().to(dtype)
    # buffers for one slice, reused by every slice (the last one may be partial)
    slice_bytes = in_features * step * half
    source_buf = torch.empty(slice_bytes, dtype=torch.uint8, device=x2d.device)
    nibble_buf = torch.empty(2 * slice_bytes, dtype=torch.uint8, device=x2d.device)
    weight_buf = torch.empty(2 * slice_bytes, dtype=dtype, device=x2d.device)
    out = torch.empty((rows, n_blocks * block), dtype=torch.float32, device=x2d.device)
    out_by_block = out.view(rows, n_blocks, 2, half)
    for first in range(0, n_blocks, step):
        last = min(n_blocks, first + step)
        n, size = last - first, in_features * (last - first) * half
        source = source_buf[:size].view(in_features, n * half)
        source.view(in_features, n, half).copy_(by_block[first:last].transpose(0, 1))
        nibbles = nibble_buf[: 2 * size].view(in_features, 2, n * half)  # [K, nibble, (block, row)]
        torch.bitwise_and(source, 0x0F, out=nibbles[:, 0])
        torch.bitwise_right_shift(source, 4, out=nibbles[:, 1])
        weight = weight_buf[: 2 * size].view(groups, group_size, 2, n, half)
        weight.copy_(nibbles.view(groups, group_size, 2, n, half))
        # (q - 8) * scale in one pass: -8 * scale + q * scale
        torch.addcmul(minus_eight_scale[..., first:last, :], weight, scale[..., first:last, :], out=weight)
        result = x_gemm @ weight.view(in_features, 2 * n * half)
        out_by_block[:, first:last].copy_(result.view(rows, 2, n, half).transpose(1, 2))
    # + sum_g (sum of x over group g) * (8 - z) * s, from the same activations the GEMM saw
    group_sums = x_gemm.view(rows, groups, group_size).sum(dim=2, dtype=torch.float32)
    out.addmm_(group_sums, offset)
    return out if bias is None else out.add_(bias)


# oneDNN's int8 linear with a weight packed once (``onednn::qlinear_prepack``): the CPU's fastest
# int8 x int8 kernel here. ``_int_mm`` re-packs the weight on every call; with the weight
# prepacked, a 4096x4096 layer takes 0.16 / 1.36 / 10.5 ms at batch 1 / 32 / 256 against
# 0.9 / 2.1 / 13.8 ms for ``_int_mm`` (and 0.15 / 1.4 / 12.0 ms for quantize_dynamic's fbgemm).
# It wants uint8 activations: ours are stored shifted by 128 with zero point 128.


def _has_ops(namespace: str, *names: str) -> bool:
    """Whether this torch build registers every op ``names`` under ``torch.ops.<namespace>``."""
    ops = getattr(torch.ops, namespace, None)
    return ops is not None and all(hasattr(ops, name) for name in names)


def onednn_int8_available() -> bool:
    """Whether torch has oneDNN's quantized linear (x86 CPU builds)."""
    try:
        return _has_ops("onednn", "qlinear_prepack", "qlinear_pointwise") and torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        return False


def onednn_prepack(qweight: torch.Tensor) -> torch.Tensor:
    """Pack a symmetric int8 weight ``[N, K]`` for :func:`onednn_linear` (an opaque tensor)."""
    return torch.ops.onednn.qlinear_prepack(qweight.contiguous(), None)


def onednn_linear(
    x_q: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    packed_weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x_scale * (x_q - x_zero_point) @ (weight * weight_scale)^T + bias`` in fp32, exact in
    the integer products on every CPU.

    ``x_q`` is uint8; ``weight_zero_point`` is int64 zeros ``[N]`` (symmetric weight, codes in
    [-127, 127]). Where the kernel would saturate (:func:`onednn_pairs_saturate`) the codes go in
    as two halves, stacked as rows, each at most 128: see :func:`_halve_codes`.
    """
    if not onednn_pairs_saturate():
        return _qlinear(x_q, x_scale, x_zero_point, packed_weight, weight_scale, weight_zero_point, bias)
    halves, half_zero_point = _halve_codes(x_q, x_zero_point)
    out = _qlinear(halves, x_scale, half_zero_point, packed_weight, weight_scale, weight_zero_point, None)
    rows = x_q.shape[0]
    out = out[:rows].add_(out[rows:])
    return out if bias is None else out.add_(bias)


def _qlinear(x_q, x_scale, x_zero_point, packed_weight, weight_scale, weight_zero_point, bias) -> torch.Tensor:
    return torch.ops.onednn.qlinear_pointwise(
        x_q, x_scale, x_zero_point, packed_weight, weight_scale, weight_zero_point, bias,
        1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip


# Without VNNI (AVX2-only CPUs such as AMD Zen 2 / 3, AVX-512 ones before Cascade Lake) x86 has
# no u8 x s8 dot product into int32: oneDNN (and fbgemm) use ``vpmaddubsw``, which adds each pair
# of neighbouring products into an int16 *with saturation*. Two products of uint8 codes up to 255
# and weights up to 127 reach 64770, far beyond 32767, so the sums are silently wrong (oneDNN's
# "Nuances of int8 computations"; fbgemm's answer is ``reduce_range``, 7-bit activations). Measured
# on a Zen 3 (AVX2, torch 2.13): int8 dynamic layers off by 9-13% of their output, MiniLM's
# cosine far below its floor. Halving the codes keeps every pair within 2 * 128 * 127 = 32512 and
# the sums exact, for the price of twice the rows (at batch 1, where the weight's stream is the
# cost, almost nothing).


@functools.cache
def onednn_pairs_saturate() -> bool:
    """Whether this process's oneDNN int8 kernel saturates pairs of u8 x s8 products (see above),
    probed once on the worst case: 64 codes of 255 against weights of 127, exact only where the
    kernel accumulates in int32 (VNNI, AMX)."""
    if not onednn_int8_available():
        return False
    columns, out_features = 64, 16
    weight = onednn_prepack(torch.full((out_features, columns), 127, dtype=torch.int8))
    ones, zeros = torch.ones(out_features), torch.zeros(out_features, dtype=torch.int64)
    exact = float(255 * 127 * columns)
    for rows in (1, 8):  # the single-row and the blocked kernel
        x_q = torch.full((rows, columns), 255, dtype=torch.uint8)
        if not bool((_qlinear(x_q, 1.0, 0, weight, ones, zeros, None) == exact).all()):
            return True
    return False


def _halve_codes(x_q: torch.Tensor, zero_point: int) -> tuple[torch.Tensor, int]:
    """uint8 codes ``u [M, K]`` with zero point ``z`` -> ``([a; b] [2M, K], z')`` with
    ``(a - z') + (b - z') = u - z`` and every ``a, b <= 128``.

    Even ``z``: ``a = u >> 1``, ``b = u - a``, ``z' = z / 2``. Odd ``z``: ``a = u - (u >> 1)``,
    ``b = (u >> 1) + 1``, ``z' = (z + 1) / 2`` (their sum is ``u + 1``).
    """
    rows = x_q.shape[0]
    halves = torch.empty((2 * rows, x_q.shape[1]), dtype=torch.uint8, device=x_q.device)
    first, second = halves[:rows], halves[rows:]
    torch.bitwise_right_shift(x_q, 1, out=first)
    if zero_point % 2 == 0:
        torch.sub(x_q, first, out=second)
        return halves, zero_point // 2
    torch.add(first, 1, out=second)
    torch.sub(x_q, first, out=first)
    return halves, (zero_point + 1) // 2


def _onednn_int8_linear(
    x2d: torch.Tensor,
    packed_weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor,
    bias: torch.Tensor | None,
    terms: int,
    multiplier: torch.Tensor | None = None,
    row_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`cpu_int8_linear` on oneDNN.

    A single row with one term (decoding a token: batch 1) is quantized with a plain float scale
    that the kernel applies itself together with the bias: no epilogue pass and half the small
    ops, the fixed cost that dominates batch 1 (for one row, per token is per tensor).

    The activations go in as uint8 shifted by 128 everywhere: int8 ones save the shift, but
    measured on the AMX Xeon (1 thread) the GEMM itself is then as fast or slower (MiniLM's
    384 -> 1536 layer at 512 rows: 0.54-0.84 ms against 0.44 ms), and AVX-512 VNNI only
    multiplies u8 x s8, so oneDNN would shift them itself there (on Zen 4, torch 2.13, int8
    activations even fall to a reference kernel: ~600x slower).
    """
    rows = x2d.shape[0]
    if row_sums is not None:  # asymmetric: the codes plus 128 are uint8 codes with zero point zero + 128
        q, act_scale, act_zero = quantize_per_token_asymmetric(x2d, 128, torch.uint8, multiplier)
        if rows == 1:
            point = int(act_zero) + 128
            return onednn_linear(q, float(act_scale), point, packed_weight, weight_scale, weight_zero_point, bias)
        out = onednn_linear(q, 1.0, 128, packed_weight, weight_scale, weight_zero_point, None)
        return _rescale(out, act_scale, bias, act_zero, row_sums)
    if rows == 1 and terms == 1:
        x, owned = _float_input(x2d, multiplier)
        amax = max(float(x.abs().amax()), 1e-12)  # a CPU tensor: .item() costs no sync
        q = _round_to_codes(x.mul_(127.0 / amax) if owned else x.mul(127.0 / amax), 128, torch.uint8)
        return onednn_linear(q, amax / 127.0, 128, packed_weight, weight_scale, weight_zero_point, bias)
    q, act_scale = quantize_per_token(x2d, terms, offset=128, dtype=torch.uint8, multiplier=multiplier)
    acc = onednn_linear(q, 1.0, 128, packed_weight, weight_scale, weight_zero_point, None)
    return _rescale(_combine_terms(acc, rows, terms), act_scale, bias)


def _rescale(
    out: torch.Tensor,
    act_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_zero: torch.Tensor | None = None,
    row_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """The epilogue of a per-token product ``out`` of codes: ``out * act_scale + bias``, in
    place, less the zero points' share for asymmetric activations (``act_zero``, ``row_sums``)."""
    if bias is not None:
        torch.addcmul(bias, out, act_scale, out=out)  # one pass: bias + out * scale
    else:
        out.mul_(act_scale)
    return out if act_zero is None else subtract_zero_share(out, act_scale, act_zero, row_sums)


# fbgemm, torch's own x86 int8 GEMM (what ``quantize_dynamic`` runs on), reached through
# ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``: float activations quantized with
# the scale and zero point given, fp32 out. Fed integer-valued floats with scale 1 it multiplies
# our own codes exactly (it rounds non-integers differently from torch beyond one row: it adds
# the zero point before rounding) and leaves the per-token scale to us. Without VNNI it adds
# pairs of u8 x s8 products in int16 with saturation like oneDNN (see above): halves again.


def fbgemm_int8_available() -> bool:
    """Whether torch has fbgemm's quantized linear with float output (x86 CPU builds)."""
    try:
        return (
            _has_ops("quantized", "linear_prepack", "linear_unpack", "linear_with_input_q_dq_qweight_dq_output_fp32")
            and "fbgemm" in torch.backends.quantized.supported_engines
            and torch.backends.quantized.engine in ("x86", "fbgemm")  # engines whose linear is fbgemm's
        )
    except (AttributeError, RuntimeError):
        return False


def fbgemm_prepack(qweight: torch.Tensor, weight_scale: torch.Tensor) -> torch.ScriptObject:
    """Pack a symmetric int8 weight ``[N, K]`` with its per-channel scales ``[N]`` for fbgemm
    (an opaque object; :func:`fbgemm_unpack` returns the codes)."""
    with warnings.catch_warnings():
        # torch 2.13 deprecates quantized tensors, but fbgemm's packing only takes one
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch._make_per_channel_quantized_tensor(
            qweight.contiguous(),
            weight_scale.detach().double().contiguous(),
            torch.zeros(qweight.shape[0], dtype=torch.int64),
            0,
        )
        return torch.ops.quantized.linear_prepack(quantized, None)


def fbgemm_unpack(packed: torch.ScriptObject) -> torch.Tensor:
    """The int8 codes ``[N, K]`` of a :func:`fbgemm_prepack` weight."""
    return torch.ops.quantized.linear_unpack(packed)[0].int_repr()


@functools.cache
def _fbgemm_op():
    # the overload itself: calling the packet costs ~6 us more per call (it searches the arguments
    # for tracing stand-ins first), a quarter of a small layer's whole GEMV at batch 1
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default


def _fbgemm(codes: torch.Tensor, zero_point: int, packed: torch.ScriptObject) -> torch.Tensor:
    return _fbgemm_op()(codes, 1.0, zero_point, packed)


@functools.cache
def fbgemm_pairs_saturate() -> bool:
    """Whether this process's fbgemm int8 kernel saturates pairs of u8 x s8 products, probed
    once on the worst case like :func:`onednn_pairs_saturate`."""
    if not fbgemm_int8_available():
        return False
    columns, out_features = 64, 16
    packed = fbgemm_prepack(torch.full((out_features, columns), 127, dtype=torch.int8), torch.ones(out_features))
    exact = float(127 * 127 * columns)  # codes 127 + zero point 128 = 255 against weights of 127
    outputs = (_fbgemm(torch.full((rows, columns), 127.0), 128, packed) for rows in (1, 8))  # GEMV, GEMM
    return not all(bool((out == exact).all()) for out in outputs)


def fbgemm_linear(codes: torch.Tensor, zero_point: int, packed: torch.ScriptObject) -> torch.Tensor:
    """``codes [M, K] @ (weight * weight_scale)^T`` in fp32, exact in the integer products, for
    integer-valued fp32 ``codes`` with ``codes + zero_point`` in [0, 255].

    Where the kernel saturates the codes go in as two halves stacked as rows,
    ``floor(c / 2)`` and ``c - floor(c / 2)``, with zero point ``ceil(zero_point / 2)``: each
    half plus it lies in [0, 128], for either parity (the float form of :func:`_halve_codes`).
    """
    if not fbgemm_pairs_saturate():
        return _fbgemm(codes, zero_point, packed)
    rows = codes.shape[0]
    halves = torch.empty((2 * rows, codes.shape[1]), dtype=torch.float32, device=codes.device)
    torch.floor(codes.mul(0.5), out=halves[:rows])
    torch.sub(codes, halves[:rows], out=halves[rows:])
    out = _fbgemm(halves, (zero_point + 1) // 2, packed)
    return out[:rows].add_(out[rows:])


def _fbgemm_int8_linear(
    x2d: torch.Tensor,
    packed: torch.ScriptObject,
    bias: torch.Tensor | None,
    terms: int,
    multiplier: torch.Tensor | None = None,
    row_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`cpu_int8_linear` on fbgemm: the codes as floats (no uint8 pass), zero point 128.

    One row with one term (per token is per tensor there) goes in as it is with its float
    scale, for fbgemm to round: three small ops around the GEMV instead of five (Zen 4, 1 thread,
    384 -> 1536: 50 against 69 us, the GEMV 35). Its codes can differ from ours by one step
    where a value lies within a few ulps of a rounding tie, which is as good a rounding.
    """
    rows = x2d.shape[0]
    if row_sums is not None and rows == 1 and not fbgemm_pairs_saturate():
        # one row: its zero point is the tensor's, which fbgemm applies itself (no correction pass)
        x, _ = _float_input(x2d, multiplier)
        low, high = min(float(x.amin()), 0.0), max(float(x.amax()), 0.0)
        inverse = 255.0 / max(high - low, 1e-12)
        out = _fbgemm_op()(x, 1.0 / inverse, round(-low * inverse), packed)
        return out if bias is None else out.add_(bias)
    if row_sums is not None:  # asymmetric: codes in [-128, 127], fbgemm's 128 added makes them uint8
        halves = fbgemm_pairs_saturate()  # the halves need integer codes; else fbgemm rounds them
        codes, act_scale, act_zero = quantize_per_token_asymmetric(
            x2d, dtype=torch.float32, multiplier=multiplier, rounded=halves
        )
        if halves:  # halved codes must lie in [-128, 127] (fbgemm saturates them whole)
            codes.clamp_(max=127.0)
        return _rescale(fbgemm_linear(codes, 128, packed), act_scale, bias, act_zero, row_sums)
    if rows == 1 and terms == 1 and not fbgemm_pairs_saturate():
        x, _ = _float_input(x2d, multiplier)
        amax = max(float(x.abs().amax()), 1e-12)  # a CPU tensor: .item() costs no sync
        out = _fbgemm_op()(x, amax / 127.0, 128, packed)
        return out if bias is None else out.add_(bias)
    codes, act_scale = quantize_per_token(x2d, terms, dtype=torch.float32, multiplier=multiplier)
    return _rescale(_combine_terms(fbgemm_linear(codes, 128, packed), rows, terms), act_scale, bias)


# -- the CPU's int8 GEMM -------------------------------------------------------------------------
# Measured (4096 x 4096; 1 thread, CPU time, ms at batch 1 / 32 / 256; torch's quantize_dynamic,
# which is fbgemm with 7-bit per-tensor activations, in brackets):
#   AMX Xeon:      oneDNN 0.73 at batch 1, AMX twice fbgemm's speed from 32 rows [0.64 / ...].
#   Zen 4 (VNNI):  oneDNN 0.91 / 3.95 / 23.0; fbgemm with our codes 0.44 / 4.09 / 28.4 [0.50 / 3.84 / 27.4];
#                  2 threads: oneDNN 0.41 / 2.18 / 12.4, fbgemm 0.27 / 2.36 / 14.5; MiniLM b32: a tie.
#   Zen 3 (AVX2):  oneDNN 5.09 / 16.2 / 105.5; fbgemm 1.09 / 13.7 / 110 (both with halves) [0.70 / 9.2 / 56].
# Either engine holds the weight once (the layer keeps no other copy).
INT8_ENGINE_ENV = "MONOQUANT_INT8_KERNEL"
INT8_ENGINES = ("onednn", "fbgemm")  # the prepacked engines; also the qweight_layout names
_INT8_ENGINE_CHOICES = ("auto", *INT8_ENGINES)


def available_int8_engines() -> dict[str, bool]:
    """Which of :data:`INT8_ENGINES` this torch build can run."""
    return {"onednn": onednn_int8_available(), "fbgemm": fbgemm_int8_available()}


@functools.cache
def cpu_int8_engine() -> str | None:
    """The int8 GEMM this process runs symmetric int8 layers on: "onednn", "fbgemm", or None
    (neither in this torch build: ``_int_mm``).

    ``auto`` (the default): oneDNN where AMX multiplies int8 tiles (twice fbgemm's speed from 32
    rows), fbgemm on every other x86 CPU: its single-row kernel, the step of decoding a token,
    is 1.5-2x oneDNN's on Zen 4 and 5x on AVX2-only CPUs, while oneDNN is 8-17% faster on Zen 4
    at 32-256 rows of a 4096-wide layer (the figures above). ``MONOQUANT_INT8_KERNEL=onednn``
    (or ``fbgemm``) overrides it for the process, e.g. for long prompts on Zen 4.
    """
    choice = os.environ.get(INT8_ENGINE_ENV, "auto").strip().lower() or "auto"
    if choice not in _INT8_ENGINE_CHOICES:
        raise ConfigurationError(
            f"{INT8_ENGINE_ENV}={os.environ[INT8_ENGINE_ENV]!r} is not an int8 kernel",
            suggestion=f"set {INT8_ENGINE_ENV} to one of {', '.join(_INT8_ENGINE_CHOICES)}, or unset it",
        )
    available = available_int8_engines()
    if choice == "auto":
        if available["onednn"] and (cpu_features().amx_int8 or not available["fbgemm"]):
            return "onednn"
        return "fbgemm" if available["fbgemm"] else None
    if not available[choice]:
        raise ConfigurationError(
            f"{INT8_ENGINE_ENV}={choice}, but this torch build cannot run it "
            f"(x86 CPU build needed; quantized engine now {torch.backends.quantized.engine!r})",
            suggestion=f"unset {INT8_ENGINE_ENV} to let mono_quant choose",
        )
    return choice


class CpuInt8Weight:
    """A symmetric int8 weight ``[N, K]`` prepacked once for ``engine``'s GEMM: oneDNN's opaque
    tensor (scales passed per call), or fbgemm's packed matrix (scales packed with it).

    While a layer uses it, it is the layer's only copy of the weight: :meth:`to_dense` gives the
    codes back for saving and moves.
    """

    __slots__ = ("engine", "packed", "zero_points", "shape")

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, engine: str) -> None:
        self.engine = engine
        self.shape = tuple(qweight.shape)
        if engine == "onednn":
            self.packed = onednn_prepack(qweight)
            self.zero_points = torch.zeros(qweight.shape[0], dtype=torch.int64)
        elif engine == "fbgemm":
            self.packed = fbgemm_prepack(qweight, weight_scale)
            self.zero_points = None
        else:
            raise ValueError(f"unknown int8 engine {engine!r}")  # internal use

    @property
    def nbytes(self) -> int:
        """Bytes of the packed codes (fbgemm's int32 column sums beside them, 4 per output
        channel, are left out like oneDNN's padding: a model's size does not change when its
        layers are packed)."""
        if self.engine == "onednn":
            return self.packed.numel() * self.packed.element_size()
        return self.shape[0] * self.shape[1]

    def to_dense(self) -> torch.Tensor:
        """The int8 codes ``[N, K]``."""
        if self.engine == "onednn":
            return self.packed.to_dense().t().contiguous()  # the packed tensor is [K, N]
        return fbgemm_unpack(self.packed).contiguous()


def cpu_int8_linear(
    x2d: torch.Tensor,
    weight: CpuInt8Weight,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    terms: int,
    multiplier: torch.Tensor | None = None,
    row_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token int8 activations (``terms`` terms) of ``x2d * multiplier`` (SmoothQuant's input
    scale ``[K]``, or None) times a prepacked int8 weight, fp32 out. ``row_sums [N]``, the
    dequantized weight's sums over its inputs: asymmetric activations (one term); None: symmetric."""
    if weight.engine == "fbgemm":
        return _fbgemm_int8_linear(x2d, weight.packed, bias, terms, multiplier, row_sums)
    return _onednn_int8_linear(x2d, weight.packed, weight_scale, weight.zero_points, bias, terms, multiplier, row_sums)


# Without VNNI weight-only int8 costs four int8 GEMMs (two activation terms, each halved): at 64
# rows and more it is 1.3-3.4x slower than the fp32 GEMM. From there it runs the fp32 GEMM on its
# own fp32 activations (exact: more accurate than two int8 terms) against the weight dequantized
# one slice of output channels at a time into one L2-sized buffer (never a whole fp32 copy).
# Measured on a Zen 3 (AVX2, 2 threads), ms at 1 / 64 / 512 rows, four GEMMs -> dense [fp32]:
#   384 -> 384    0.31 -> 0.27 [0.05]   0.93 -> 0.53 [0.29]   6.45 -> 1.94 [1.48]
#   1536 -> 384   0.25 -> 0.67 [0.08]   2.29 -> 1.67 [0.76]   16.4 -> 6.00 [5.55]
#   4096 -> 4096  1.36 -> 15.6 [6.22]   44.1 -> 46.2 [47.5]   351  -> 165  [179]
# (dense wins from 64 rows on every shape measured, loses below). Dynamic int8 keeps its two
# GEMMs: the same dense GEMM on its per-token codes won only from 256 rows, by 0-25%, for a
# second copy of the weight.
_DENSE_INT8_WEIGHT_ONLY_MIN_ROWS = 64
_DENSE_INT8_CHUNK_ELEMENTS = 1 << 20


def cpu_int8_dense_min_rows(engine: str) -> int | None:
    """Rows from which :func:`cpu_int8_dense_linear` beats weight-only int8 on ``engine``'s GEMM
    on this CPU: only where that GEMM saturates pairs (no VNNI, see above); None: never."""
    saturates = fbgemm_pairs_saturate() if engine == "fbgemm" else onednn_pairs_saturate()
    return _DENSE_INT8_WEIGHT_ONLY_MIN_ROWS if saturates else None


def cpu_int8_dense_linear(
    x2d: torch.Tensor,
    codes: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    multiplier: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight-only int8 in the fp32 GEMM: ``x2d * multiplier`` (SmoothQuant's input scale, or
    None) times symmetric int8 weight codes ``[N, K]`` scaled per output channel, plus bias,
    fp32 ``[M, N]``. The weight is dequantized one slice of output channels at a time into one
    reused buffer, so no fp32 copy of it is ever whole."""
    x, _ = _float_input(x2d, multiplier)
    rows, in_features = x.shape
    out_features = codes.shape[0]
    scale = weight_scale.detach().float().reshape(-1, 1)
    step = max(1, min(out_features, _DENSE_INT8_CHUNK_ELEMENTS // max(in_features, 1)))
    buffer = torch.empty(step * in_features, dtype=torch.float32, device=x.device)
    out = torch.empty((rows, out_features), dtype=torch.float32, device=x.device)
    for first in range(0, out_features, step):
        last = min(out_features, first + step)
        weight = buffer[: (last - first) * in_features].view(last - first, in_features)
        weight.copy_(codes[first:last]).mul_(scale[first:last])  # two passes within L2
        torch.mm(x, weight.t(), out=out[:, first:last])
    return out if bias is None else out.add_(bias.detach())


def cpu_int8_static_linear(
    rounded: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    weight: CpuInt8Weight,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x_scale * (rounded - x_zero_point) @ (weight * weight_scale)^T + bias`` for static int8
    activations: ``rounded`` holds their int8 codes as fp32 (zero point included), and is
    overwritten."""
    rounded = rounded.detach()  # integer codes: nothing to differentiate (the oneDNN cast drops it too)
    if weight.engine == "fbgemm":
        out = fbgemm_linear(rounded.sub_(x_zero_point), x_zero_point + 128, weight.packed)
        return out.mul_(x_scale) if bias is None else torch.add(bias, out, alpha=x_scale, out=out)
    x_u8 = rounded.add_(128).to(torch.uint8)  # uint8 activations: shift by 128, zero point with them
    return onednn_linear(x_u8, x_scale, x_zero_point + 128, weight.packed, weight_scale, weight.zero_points, bias)
