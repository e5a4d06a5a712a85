"""QuantizedLinear: int8 / int4 weights, weight-only, dynamic or static int8 activations."""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core.schemes import INT8_ASYMMETRIC, INT8_SYMMETRIC, QuantSpec, regroup
from mono_quant.modules.base import LayerQuantConfig, QuantizedModule, register_quantized_module
from mono_quant.modules.kernels import (
    INT8_ENGINES,
    CpuInt8Weight,
    cpu_int4_dense_choice,
    cpu_int4_dense_linear,
    cpu_int4_dense_qparams,
    cpu_int4_linear,
    cpu_int4_supported,
    cpu_int8_dense_linear,
    cpu_int8_dense_min_rows,
    cpu_int8_engine,
    cpu_int8_linear,
    cpu_int8_static_linear,
    from_cpu_int4_layout,
    int4_grouped_linear,
    int4_scales_and_zeros,
    int8_linear,
    int_mm_supported,
    kernel_group_size,
    quantize_per_token,
    quantize_per_token_asymmetric,
    tinygemm_linear,
    tinygemm_pack,
    to_cpu_int4_layout,
)

__all__ = ["QuantizedLinear", "packed_together"]

_KERNEL_CACHES = (
    "_int8_cache",
    "_int8_dense_cache",
    "_int8_pending",
    "_tinygemm_cache",
    "_scales_and_zeros_cache",
    "_dense_qparams_cache",
    "_row_sums_cache",
)
# Serialises the deferred int8 packing (see _adopt_kernel_layout) when threads share a layer.
_PACK_LOCK = threading.Lock()


class _PackGroup:
    """The int8 layers built together (one model's quantization or load) whose packing waits
    for a first forward: the first of them to run packs every member still waiting, on
    ``torch.get_num_threads()`` threads at once.

    Packing is the cold cost of running an int8 model: fbgemm's ``PackBMatrix`` on Zen 4 and
    oneDNN's AMX reorder each take 40-80 ms per 4096 x 4096 weight in a generic loop that
    uses one core (16 such layers: 1.2-1.5 s on the first forward, against 0.2-0.7 s for
    quantizing them). The ops release the GIL, so layers pack side by side: 2 threads on
    2 cores, 72-80 -> 45-48 ms per layer (Zen 4).
    """

    __slots__ = ("members",)

    def __init__(self) -> None:
        self.members: list[weakref.ref] = []

    def take_waiting(self) -> list[QuantizedLinear]:
        """The members still waiting to be packed; the group forgets them all."""
        alive = (ref() for ref in self.members)
        waiting = [layer for layer in alive if layer is not None and layer.__dict__.get("_int8_pending") is self]
        self.members.clear()
        return waiting


_PACK_GROUP: contextvars.ContextVar[_PackGroup | None] = contextvars.ContextVar("mono_quant_pack_group", default=None)


@contextlib.contextmanager
def packed_together() -> Iterator[None]:
    """Within this block, int8 layers that defer their packing join one group: the first
    forward of any of them packs them all, in parallel (see :class:`_PackGroup`). Used around
    building one model (``quantize()``, ``load_quantized``); layers built outside any group,
    or moved, copied or unpickled later, pack alone on their own first forward."""
    token = _PACK_GROUP.set(_PackGroup())
    try:
        yield
    finally:
        _PACK_GROUP.reset(token)


def _pack_waiting(layers: list[QuantizedLinear]) -> None:
    """Pack the deferred int8 weight of each of ``layers`` (the caller holds ``_PACK_LOCK``),
    side by side on up to ``torch.get_num_threads()`` threads."""

    def pack(layer: QuantizedLinear) -> None:
        with torch.inference_mode(False), torch.no_grad():  # grad modes are per thread
            if layer.qweight_layout == "packed":
                layer._pack_int8()
            layer.__dict__.pop("_int8_pending", None)  # last: see _int8_weight

    workers = min(len(layers), torch.get_num_threads())
    if workers <= 1:
        for layer in layers:
            pack(layer)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mono_quant-pack") as pool:
        for _ in pool.map(pack, layers):  # re-raises what a worker raised
            pass


@register_quantized_module(nn.Linear)
class QuantizedLinear(QuantizedModule):
    """A Linear layer with int8 (per channel or group) or int4 (group-wise) weights.

    Forward by ``config.activation``:

    * ``"none"`` (weight-only): activations are not quantized to int8. On the CPU the product
      still runs on ``torch._int_mm`` with each activation row split into two int8 terms
      (about 16-bit precision), which is faster than fp32 and as accurate as dequantizing.
    * ``"dynamic"``: activations quantized per token to int8 at run time, ``_int_mm``.
    * ``"static"``: activations quantized with the calibrated per-tensor ``input_scale`` /
      ``input_zero_point``, ``_int_mm``, zero-point corrections folded in exactly.

    Example:
        >>> layer = QuantizedLinear.from_float(nn.Linear(64, 32), LayerQuantConfig(bits=8))
        >>> layer(torch.randn(4, 64)).shape
        torch.Size([4, 32])
    """

    def __init__(self, in_features: int, out_features: int, config: LayerQuantConfig) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        self.qweight_layout = "packed"  # see "weight layouts" below

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_float(
        cls,
        module: nn.Linear,
        config: LayerQuantConfig,
        input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
        weight_tensors: dict[str, torch.Tensor] | None = None,
        input_smoothing: torch.Tensor | None = None,
    ) -> QuantizedLinear:
        """``weight_tensors``: the weight already in the stored layout (a tied layer's, or what
        GPTQ / HQQ chose); quantized from ``module.weight`` when None. ``input_smoothing``
        (``config.smoothed_input``): the SmoothQuant scale ``s [in_features]`` the input is
        divided by before it is quantized (the weight already holds ``W * s``)."""
        layer = cls(module.in_features, module.out_features, config)
        layer._store_weight(module.weight, config, weight_tensors)
        layer._finish(module.bias, input_qparams, input_smoothing)
        return layer

    @classmethod
    def empty_like(cls, module: nn.Linear, config: LayerQuantConfig) -> QuantizedLinear:
        layer = cls(module.in_features, module.out_features, config)
        device = module.weight.device if module.weight.device.type != "meta" else None
        layer._register_empty((module.out_features, module.in_features), config, device)
        bias = None
        if module.bias is not None:
            bias = torch.zeros(module.out_features, dtype=torch.float32, device=device)
        zeros = (torch.ones((), device=device), torch.zeros((), dtype=torch.int32, device=device))
        smoothing = torch.ones(module.in_features, device=device) if config.smoothed_input else None
        layer._finish(bias, zeros if config.activation == "static" else None, smoothing)
        return layer

    def _finish(self, bias: torch.Tensor | None, input_qparams, input_smoothing=None) -> None:
        bias = None if bias is None else bias.detach().clone().float()
        self.register_buffer("bias", bias)
        if self.config.smoothed_input:
            if input_smoothing is None:
                raise ValueError("a smoothed QuantizedLinear needs its input_smoothing scale")  # internal use
            # stored as the multiplier 1 / s: one multiply fused before the activation quantization
            self.register_buffer("input_smoothing", (1.0 / input_smoothing.detach().float()).clone())
        if self.config.activation == "static":
            if input_qparams is None:
                raise ValueError("static QuantizedLinear needs input qparams")  # internal use
            scale, zero_point = input_qparams
            self.register_buffer("input_scale", scale.detach().float().reshape(()).clone())
            self.register_buffer("input_zero_point", zero_point.detach().to(torch.int32).reshape(()).clone())
            # sum_k w_nk, needed to fold the activation zero point out of the integer product
            self.register_buffer("weight_col_sum", self.qweight.sum(dim=1, dtype=torch.int32), persistent=False)
        self._adopt_kernel_layout()

    # -- weight layouts ----------------------------------------------------------------------
    # ``qweight_layout`` says what ``qweight`` holds in memory:
    #   "packed"    the documented layout (int8 [N, K], or int4 two per byte [N, K // 2]);
    #   "cpu_int4"  int4 in the block layout of torch's CPU int4 kernel (same size);
    #   "onednn" / "fbgemm"
    #               int8 prepacked for that engine's GEMM (kernels.cpu_int8_engine), kept in
    #               ``_int8_cache`` (a CpuInt8Weight); ``qweight`` is then an empty placeholder,
    #               so the weight is held once, not twice. Packed on the first forward, not at
    #               construction (see _adopt_kernel_layout).
    # state_dict(), dequantized_weight(), pickling and device moves always see the documented
    # layout; the kernel layout is (re)adopted after construction, loading and moves.
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._materialize()  # copy into a buffer of the documented shape
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.config.activation == "static":
            self.weight_col_sum = self.qweight.sum(dim=1, dtype=torch.int32)
        self._adopt_kernel_layout()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qweight_layout != "packed":
            destination[prefix + "qweight"] = self._canonical_qweight()

    def _apply(self, fn, recurse=True):
        self._materialize()
        result = super()._apply(fn, recurse)
        self._adopt_kernel_layout()
        return result

    def __getstate__(self):
        state = super().__getstate__().copy()
        for name in _KERNEL_CACHES:
            state.pop(name, None)  # opaque kernel tensors cannot be copied or pickled
        if self.qweight_layout != "packed":
            state["_buffers"] = {**state["_buffers"], "qweight": self._canonical_qweight()}
            state["qweight_layout"] = "packed"
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._adopt_kernel_layout()

    def kernel_nbytes(self) -> int:
        packed = self.__dict__.get("_int8_cache")
        dense = self.__dict__.get("_int8_dense_cache")
        return (packed.nbytes if packed else 0) + (dense.numel() if dense is not None else 0)

    def _drop_kernel_caches(self) -> None:
        for name in _KERNEL_CACHES:
            self.__dict__.pop(name, None)

    def _materialize(self) -> None:
        """Back to the documented layout (undoing :meth:`_adopt_kernel_layout`)."""
        if self.qweight_layout != "packed":
            self.qweight = self._canonical_qweight()
            self.qweight_layout = "packed"
        self._drop_kernel_caches()

    @property
    def kernel_group(self) -> int | None:
        """The group size the int4 kernels run with: ``group_size``, or a smaller power of two
        when a partial last group leaves ``in_features`` indivisible (qparams restated per
        kernel group, exactly); None: no kernel fits, dequantize."""
        return kernel_group_size(self.config.group_size, self.in_features) if self.config.group_size else None

    def _kernel_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scales, zero points)`` per kernel group ``[N, K // kernel_group]``."""
        group, kernel = self.config.group_size, self.kernel_group
        if kernel == group:
            return self.weight_scale, self.weight_zero_point
        return (
            regroup(self.weight_scale, group, kernel, self.in_features),
            regroup(self.weight_zero_point, group, kernel, self.in_features),
        )

    def _cpu_int4_eligible(self) -> bool:
        return (
            self.config.bits == 4
            and self.config.activation == "none"
            and self.kernel_group is not None
            and cpu_int4_supported(self.out_features, self.in_features, self.kernel_group)
        )

    def _int8_kernel_eligible(self) -> bool:
        return self.config.bits == 8 and self.weight_zero_point is None and cpu_int8_engine() is not None

    def _adopt_kernel_layout(self) -> None:
        """On the CPU, hold the weight in the layout of the kernel that runs it (same size).

        int4 converts now. int8 is only marked here and packed by the first forward
        (:meth:`_int8_weight`): on AMX CPUs oneDNN reorders into its AMX layout with a generic
        loop, ~90 ms for a 4096x4096 weight, four times the quantization itself (fbgemm's
        packing on Zen 4: ~100 ms), and twice the memory while both forms exist. A model that
        is quantized and saved (the service's path) never pays it; one that runs pays it once,
        on its first batch, for every layer built with it at once (:func:`packed_together`).
        """
        if self.qweight_layout != "packed" or self.qweight.device.type != "cpu":
            return
        if self._cpu_int4_eligible():
            self.qweight = to_cpu_int4_layout(self.qweight)
            self.qweight_layout = "cpu_int4"
        elif self._int8_kernel_eligible():
            group = _PACK_GROUP.get()
            object.__setattr__(self, "_int8_pending", True if group is None else group)
            if group is not None:
                group.members.append(weakref.ref(self))

    def _pack_int8(self) -> None:
        if self.config.activation == "dynamic" and not self.config.activation_symmetric:
            self._weight_row_sums()  # from the plain codes, before they go into the packed form
        engine = cpu_int8_engine()
        try:
            packed = CpuInt8Weight(self.qweight, self.weight_scale, engine)
        except RuntimeError:  # this build's kernel refuses the shape: stay on _int_mm
            return
        object.__setattr__(self, "_int8_cache", packed)
        self.qweight = torch.empty(0, dtype=torch.int8)
        self.qweight_layout = engine

    def _int8_weight(self) -> CpuInt8Weight | None:
        """The prepacked weight when an int8 kernel layout is in use, packing the weight first if
        that is still pending."""
        if "_int8_pending" in self.__dict__:
            # Another thread arriving meanwhile waits for the packed weight (the flag goes last)
            # rather than running on a qweight that is being replaced.
            with _PACK_LOCK:
                group = self.__dict__.get("_int8_pending")
                if group is not None:
                    others = group.take_waiting() if isinstance(group, _PackGroup) else []
                    _pack_waiting([self, *(layer for layer in others if layer is not self)])
        return self.__dict__.get("_int8_cache") if self.qweight_layout in INT8_ENGINES else None

    def _int8_dense_codes(self, packed: CpuInt8Weight) -> torch.Tensor:
        """The plain int8 codes ``[N, K]`` beside the packed weight, for weight-only int8's dense
        path on CPUs without VNNI (:func:`cpu_int8_dense_min_rows`): derived once, on the first
        call with that many rows (one byte per weight more; a process that only decodes one
        token at a time never holds it)."""
        codes = self.__dict__.get("_int8_dense_cache")
        if codes is None:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in any mode later
                codes = packed.to_dense()
            object.__setattr__(self, "_int8_dense_cache", codes)
        return codes

    def _canonical_qweight(self) -> torch.Tensor:
        if self.qweight_layout == "cpu_int4":
            return from_cpu_int4_layout(self.qweight)
        if self.qweight_layout in INT8_ENGINES:
            return self._int8_cache.to_dense()
        return self.qweight

    def _scales_and_zeros(self) -> torch.Tensor:
        """bf16 ``[G, N, 2]`` qparams of the int4 kernels (derived, cached per tensor)."""
        key = (self.weight_scale.device, self.weight_scale.data_ptr(), self.weight_zero_point.data_ptr())
        cached = getattr(self, "_scales_and_zeros_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, int4_scales_and_zeros(*self._kernel_qparams()))
            object.__setattr__(self, "_scales_and_zeros_cache", cached)
        return cached[1]

    def _dense_qparams(self, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The qparams of :func:`cpu_int4_dense_linear` for a ``dtype`` GEMM (derived, cached per
        tensor like :meth:`_scales_and_zeros`)."""
        key = (self.weight_scale.device, self.weight_scale.data_ptr(), self.weight_zero_point.data_ptr(), dtype)
        cached = getattr(self, "_dense_qparams_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, cpu_int4_dense_qparams(*self._kernel_qparams(), dtype))
            object.__setattr__(self, "_dense_qparams_cache", cached)
        return cached[1]

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 2-D float32 input (a batch of vectors) skips the reshapes and the cast: at batch 1 the
        # layer's fixed cost is a handful of such microsecond ops around a ~0.1 ms kernel.
        flat = x.dim() == 2
        x2d = x if flat else x.reshape(-1, self.in_features)
        config = self.config
        smoothing = self.input_smoothing if config.smoothed_input else None
        if config.activation == "static":
            out = self._forward_static(x2d, smoothing)
        elif config.bits == 4:
            out = self._forward_int4(x2d if smoothing is None else x2d * smoothing)
        else:  # int8 folds the smoothing into its per-token quantization (one pass less)
            out = self._forward_int8(x2d, smoothing)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out if flat else out.reshape(*x.shape[:-1], self.out_features)

    def _forward_int8(self, x2d: torch.Tensor, smoothing: torch.Tensor | None = None) -> torch.Tensor:
        """int8 weights, weight-only or dynamic; ``smoothing``: the input multiplier (1 / s), or None."""
        dynamic = self.config.activation == "dynamic"
        terms = 1 if dynamic else 2
        asymmetric = dynamic and not self.config.activation_symmetric
        if x2d.is_cpu and self.config.group_size is None:
            packed = self._int8_weight()
            if packed:
                dense_rows = None if dynamic else cpu_int8_dense_min_rows(packed.engine)
                if dense_rows is not None and x2d.shape[0] >= dense_rows:
                    codes = self._int8_dense_codes(packed)
                    return cpu_int8_dense_linear(x2d, codes, self.weight_scale, self.bias, smoothing)
                row_sums = self._weight_row_sums() if asymmetric else None
                return cpu_int8_linear(x2d, packed, self.weight_scale, self.bias, terms, smoothing, row_sums)
        use_int_mm = self.config.group_size is None and int_mm_supported(
            x2d.shape[0], self.in_features, self.out_features, x2d.device
        )
        if use_int_mm and (dynamic or x2d.is_cpu):
            zp = self.weight_zero_point
            return int8_linear(
                x2d,
                self.qweight.t(),
                self.weight_scale,
                None if zp is None else zp.to(torch.int32),
                self.bias,
                terms=terms,
                multiplier=smoothing,
                row_sums=self._weight_row_sums() if asymmetric else None,
            )
        return self._forward_dequantized(x2d if smoothing is None else x2d * smoothing)

    def _weight_row_sums(self) -> torch.Tensor:
        """The dequantized weight's sums over its inputs, fp32 ``[N]``: what asymmetric dynamic
        activations' zero points contribute per output (derived once, cached per tensor)."""
        key = (self.weight_scale.device, self.weight_scale.data_ptr())
        cached = self.__dict__.get("_row_sums_cache")
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in any mode later
                cached = (key, self.dequantized_weight().float().sum(dim=1))
            object.__setattr__(self, "_row_sums_cache", cached)
        return cached[1]

    def _forward_int4(self, x2d: torch.Tensor) -> torch.Tensor:
        if x2d.is_cuda and x2d.dtype == torch.bfloat16:
            packed = self._tinygemm_weight()
            if packed is not None:
                return tinygemm_linear(x2d, *packed, self.kernel_group, self.bias)
        if not x2d.is_cpu or self.kernel_group is None:
            return self._forward_dequantized(x2d)
        if self.qweight_layout == "cpu_int4":
            # many rows: the int4 kernel is compute-bound there, dequantize for the dense GEMM
            dense = cpu_int4_dense_choice()
            if dense is not None and x2d.shape[0] >= dense[0]:
                qparams = self._dense_qparams(dense[1])
                return cpu_int4_dense_linear(x2d, self.qweight, qparams, self.kernel_group, self.bias)
            return cpu_int4_linear(x2d, self.qweight, self._scales_and_zeros(), self.kernel_group, self.bias)
        terms = 1 if self.config.activation == "dynamic" else 2
        scales, zero_points = self._kernel_qparams()
        return int4_grouped_linear(
            x2d, self._canonical_qweight(), scales, zero_points, self.kernel_group, self.bias, terms
        )

    def _tinygemm_weight(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The weight repacked for CUDA's int4 kernel, made once per device and weight.

        A derived cache, not state: it is rebuilt when the weight or its device changes, and
        None (dequantize instead) when the shape does not fit the kernel.
        """
        key = (self.qweight.device, self.qweight.data_ptr(), self.weight_scale.data_ptr())
        cached = getattr(self, "_tinygemm_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        packed = None
        if self.out_features % 8 == 0 and self.kernel_group in (32, 64, 128, 256):
            try:
                packed = tinygemm_pack(self._canonical_qweight(), *self._kernel_qparams(), self.kernel_group)
            except (RuntimeError, StopIteration):
                packed = None  # this torch build / shape has no tinygemm: dequantize instead
        object.__setattr__(self, "_tinygemm_cache", (key, packed))
        return packed

    def _forward_dequantized(self, x2d: torch.Tensor) -> torch.Tensor:
        compute_dtype = x2d.dtype if x2d.is_floating_point() else torch.float32
        weight = self.dequantized_weight().to(compute_dtype)
        if self.config.activation == "dynamic":
            # Same numerics as the _int_mm path: quantize the activations per token.
            if self.config.activation_symmetric:
                q, scale = quantize_per_token(x2d, 1)
                x2d = (q.float() * scale).to(compute_dtype)
            else:
                q, scale, zero = quantize_per_token_asymmetric(x2d)
                x2d = ((q.float() - zero) * scale).to(compute_dtype)
        bias = None if self.bias is None else self.bias.to(compute_dtype)
        return F.linear(x2d.to(compute_dtype), weight, bias)

    def _forward_static(self, x2d: torch.Tensor, smoothing: torch.Tensor | None = None) -> torch.Tensor:
        """Static int8 activations; ``smoothing``: the input multiplier (1 / s), or None, folded
        into the division by the activation scale (one pass, as without it)."""
        spec: QuantSpec = INT8_SYMMETRIC if self.config.activation_symmetric else INT8_ASYMMETRIC
        scale, zp = self.input_scale, self.input_zero_point
        if smoothing is None:
            scaled = torch.div(x2d.float(), scale)
        else:
            scaled = torch.mul(x2d.float(), smoothing / scale)
        rounded = scaled.round_().add_(zp).clamp_(spec.qmin, spec.qmax)
        if x2d.device.type == "cpu":
            packed = self._int8_weight()
            if packed:
                return cpu_int8_static_linear(rounded, float(scale), int(zp), packed, self.weight_scale, self.bias)
        xq = rounded.to(torch.int8)
        if (
            self.config.bits == 8
            and self.config.group_size is None
            and int_mm_supported(xq.shape[0], self.in_features, self.out_features, xq.device)
        ):
            acc = torch._int_mm(xq, self.qweight.t())
            # sum_k (x_k - zx)(w_nk - zw_n)
            #   = sum x w - zx sum_k w_nk - zw_n sum_k x_k + K zx zw_n
            acc -= zp * self.weight_col_sum
            if self.weight_zero_point is not None:
                zw = self.weight_zero_point.to(torch.int32)
                acc -= xq.sum(dim=1, keepdim=True, dtype=torch.int32) * zw
                acc += self.in_features * zp * zw
            out = acc.float().mul_(scale * self.weight_scale)
            if self.bias is not None:
                out.add_(self.bias)
            return out
        x_hat = (xq.float() - zp) * scale
        weight = self.dequantized_weight()
        return F.linear(x_hat, weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()
