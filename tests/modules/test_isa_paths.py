"""Kernels whose results depend on the instruction set: exact on every CPU kind.

Two things differ between x86 CPUs beyond speed (both found on an AVX2-only AMD Zen 3):
* oneDNN's and fbgemm's int8 kernels without VNNI sum pairs of u8 x s8 products in int16 with
  saturation; ``onednn_linear`` and ``fbgemm_linear`` halve the activation codes there
  (kernels.py).
* torch's CPU int4 kernel packs its weight in blocks of 64 rows under AVX-512 and 32 under AVX2.

The last test runs a child process with ``ONEDNN_MAX_CPU_ISA=AVX2``,
``FBGEMM_ENABLE_INSTRUCTIONS=AVX2`` and ``ATEN_CPU_CAPABILITY=avx2``, so an AVX-512 or AMX machine
runs the AVX2 code paths too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mono_quant.modules import kernels
from mono_quant.modules.cpu_features import cpu_features

needs_onednn = pytest.mark.skipif(not kernels.onednn_int8_available(), reason="this torch has no oneDNN int8 linear")


@pytest.mark.parametrize("zero_point", [0, 1, 64, 127, 128, 129, 254, 255])
def test_halved_codes_stay_in_range_and_sum_to_the_codes(zero_point):
    codes = torch.arange(256, dtype=torch.uint8).view(2, 128)
    halves, half_zero_point = kernels._halve_codes(codes, zero_point)
    assert halves.shape == (4, 128) and halves.dtype == torch.uint8
    assert int(halves.max()) <= 128  # 2 * 128 * 127 = 32512 fits an int16 pair sum
    total = halves[:2].long() + halves[2:].long() - 2 * half_zero_point
    assert torch.equal(total, codes.long() - zero_point)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 33])
@pytest.mark.parametrize("zero_point", [128, 101])
def test_onednn_linear_is_exact_on_the_worst_case_codes(rows, zero_point):
    # codes at the ends of the range against weights at +-127 of the same sign pattern: every
    # pair of products is at its largest, where a saturating kernel is off by half
    generator = torch.Generator().manual_seed(rows)
    signs = torch.randint(0, 2, (24, 256), generator=generator).bool()
    weight = torch.where(signs, 127, -127).to(torch.int8)
    x_q = torch.where(signs[:rows] if rows <= 24 else signs.repeat(2, 1)[:rows], 255, 0).to(torch.uint8)
    x_q[:, ::7] = torch.randint(0, 256, x_q[:, ::7].shape, generator=generator, dtype=torch.uint8)
    packed = kernels.onednn_prepack(weight)
    bias = torch.randn(24, generator=generator)
    out = kernels.onednn_linear(x_q, 0.5, zero_point, packed, torch.ones(24), torch.zeros(24, dtype=torch.int64), bias)
    exact = 0.5 * (x_q.double() - zero_point) @ weight.double().t() + bias.double()
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-2)


needs_fbgemm = pytest.mark.skipif(not kernels.fbgemm_int8_available(), reason="this torch has no fbgemm int8 linear")


@needs_fbgemm
@pytest.mark.parametrize("halves", [False, True], ids=["as_probed", "halves"])
@pytest.mark.parametrize("rows", [1, 3, 33])
@pytest.mark.parametrize("zero_point", [128, 101, 255])
def test_fbgemm_linear_is_exact_on_the_worst_case_codes(monkeypatch, halves, rows, zero_point):
    # as above, with float codes c (c + zero point in [0, 255]); the halves run on any CPU
    if halves:
        monkeypatch.setattr(kernels, "fbgemm_pairs_saturate", lambda: True)
    generator = torch.Generator().manual_seed(rows)
    signs = torch.randint(0, 2, (24, 256), generator=generator).bool()
    weight = torch.where(signs, 127, -127).to(torch.int8)
    picked = signs[:rows] if rows <= 24 else signs.repeat(2, 1)[:rows]
    codes = torch.where(picked, 255 - zero_point, -zero_point).float()
    codes[:, ::7] = torch.randint(0, 256, codes[:, ::7].shape, generator=generator).float() - zero_point
    scale = torch.rand(24, generator=generator) + 0.5
    out = kernels.fbgemm_linear(codes, zero_point, kernels.fbgemm_prepack(weight, scale))
    exact = (codes.double() @ weight.double().t()) * scale.double()
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-2)


@needs_fbgemm
def test_fbgemm_packing_keeps_the_codes():
    weight = torch.randint(-127, 128, (40, 72), dtype=torch.int8)
    packed = kernels.CpuInt8Weight(weight, torch.rand(40) + 0.1, "fbgemm")
    assert torch.equal(packed.to_dense(), weight) and packed.nbytes >= weight.numel()


@needs_onednn
def test_saturation_probe_agrees_with_the_cpu():
    # VNNI (AVX-512 VNNI, AVX-VNNI) or AMX accumulate in int32; unless oneDNN is capped below
    # them, the probe must find no saturation there
    features = cpu_features()
    capped = "ONEDNN_MAX_CPU_ISA" in os.environ or "DNNL_MAX_CPU_ISA" in os.environ
    if (features.avx512_vnni or features.amx_int8) and not capped:
        assert not kernels.onednn_pairs_saturate()
        if kernels.fbgemm_int8_available() and "FBGEMM_ENABLE_INSTRUCTIONS" not in os.environ:
            assert not kernels.fbgemm_pairs_saturate()
    if features.source == "cpuinfo" and features.avx2 and not features.avx512:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = f.read()
        if "avx_vnni" not in flags:
            assert kernels.onednn_pairs_saturate()


_AVX2_CHILD = textwrap.dedent(
    """
    import json, torch
    from torch import nn
    from mono_quant import quantize
    from mono_quant.core.schemes import sqnr
    from mono_quant.modules import kernels, linear
    from mono_quant.modules.cpu_features import aten_capability

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 96)).eval()
    data = torch.randn(64, 256)
    data[:, 5] *= 20  # an outlier channel: large codes in every token
    x = torch.randn(40, 256)
    x[:, 5] *= 20
    report = {"capability": aten_capability(), "saturates": kernels.onednn_pairs_saturate(),
              "fbgemm_saturates": kernels.fbgemm_pairs_saturate(),
              "engine": kernels.cpu_int8_engine(), "int4_block": kernels.cpu_int4_block()}
    cases = {
        "int8_dynamic": dict(bits=8, dynamic=True),
        "int8_weight_only": dict(bits=8, weight_only=True),
        "int8_static": dict(bits=8, calibration_data=data),
        "int4": dict(bits=4, group_size=128),
    }

    def run(kwargs):
        result = quantize(model, **kwargs)
        with torch.inference_mode():
            outputs = result.model(x), result.model(x[:1])
        # after a forward: oneDNN's layout is adopted by the first one
        layouts = sorted({m.qweight_layout for m in result.model.modules() if hasattr(m, "qweight_layout")})
        return (*outputs, layouts)

    engines = [e for e, ok in kernels.available_int8_engines().items() if ok]
    fast = {}
    for engine in engines:  # each int8 engine in turn, then int4 with the default
        linear.cpu_int8_engine = lambda: engine
        fast.update({(name, engine): run(kwargs) for name, kwargs in cases.items() if name != "int4"})
    fast["int4", None] = run(cases["int4"])
    # the generic paths: int8 dequantized to fp32 (not _int_mm: on a VNNI CPU torch runs it on
    # oneDNN, which the cap above makes saturate; on a real AVX2 CPU it takes an exact loop),
    # int4 on int4_grouped_linear (its pair sums stay far below int16's range)
    linear.cpu_int8_engine = lambda: None
    linear.int_mm_supported = lambda *args: False
    linear.cpu_int4_supported = lambda *args: False
    generic = {name: run(kwargs) for name, kwargs in cases.items()}
    for (name, engine), outputs in fast.items():
        report[f"{name}:{engine}"] = {"layouts": outputs[2], "generic_layouts": generic[name][2],
                                      "db": sqnr(generic[name][0], outputs[0]),
                                      "db_one_row": sqnr(generic[name][1], outputs[1])}
    print(json.dumps(report))
    """
)


@pytest.mark.skipif(not cpu_features().avx2, reason="needs an x86 CPU with AVX2")
def test_avx2_code_paths_compute_what_the_generic_paths_compute():
    """Forced onto their AVX2 code (any AVX2 machine), the oneDNN and fbgemm int8 and the CPU int4
    kernels give the outputs of the generic paths: int8 to the two-term split's precision
    (weight-only) or fp32 rounding, int4 to its bf16 activations."""
    env = dict(
        os.environ,
        ONEDNN_MAX_CPU_ISA="AVX2",
        FBGEMM_ENABLE_INSTRUCTIONS="AVX2",
        ATEN_CPU_CAPABILITY="avx2",
        OMP_NUM_THREADS="1",
    )
    env.pop(kernels.INT8_ENGINE_ENV, None)
    done = subprocess.run(
        [sys.executable, "-c", _AVX2_CHILD], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["capability"] == "AVX2" and report["int4_block"] == 32
    onednn, fbgemm = kernels.onednn_int8_available(), kernels.fbgemm_int8_available()
    if onednn:
        assert report["saturates"], "oneDNN capped at AVX2 has no VNNI: the probe must see it saturate"
    if fbgemm:
        assert report["fbgemm_saturates"], "fbgemm capped at AVX2 has no VNNI: the probe must see it saturate"
    assert report["engine"] == kernels.cpu_int8_engine()  # the choice reads the CPU, not the caps
    engines = [e for e, ok in (("fbgemm", fbgemm), ("onednn", onednn)) if ok]
    for engine in engines:
        for name in ("int8_dynamic", "int8_weight_only", "int8_static"):
            case = report[f"{name}:{engine}"]
            assert case["layouts"] == [engine] and case["generic_layouts"] == ["packed"], (name, case)
            # measured with the saturating sums (before the halving): 12 dB dynamic and weight-only, 28 static
            assert case["db"] > 60 and case["db_one_row"] > 60, (name, engine, case)
    int4 = report["int4:None"]
    assert int4["layouts"] == ["cpu_int4"]  # the 96-row layer fits 32-row blocks
    assert int4["db"] > 35 and int4["db_one_row"] > 35, int4


def test_dense_int8_linear_is_the_dequantized_weight_times_the_input():
    generator = torch.Generator().manual_seed(3)
    codes = torch.randint(-127, 128, (1100, 96), dtype=torch.int8, generator=generator)  # > 1 slice of 1M / 96
    scale, bias = torch.rand(1100, generator=generator) + 0.1, torch.randn(1100, generator=generator)
    x, multiplier = torch.randn(70, 96, generator=generator), torch.rand(96, generator=generator) + 0.5
    monkey_chunk = kernels._DENSE_INT8_CHUNK_ELEMENTS
    try:
        kernels._DENSE_INT8_CHUNK_ELEMENTS = 96 * 100  # eleven slices, the last one partial
        out = kernels.cpu_int8_dense_linear(x, codes, scale, bias, multiplier)
    finally:
        kernels._DENSE_INT8_CHUNK_ELEMENTS = monkey_chunk
    exact = (x.double() * multiplier.double()) @ (codes.double() * scale.double()[:, None]).t() + bias.double()
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-6 * float(exact.abs().max()))  # fp32 rounding


@pytest.mark.parametrize("saturates", [True, False], ids=["no_vnni", "vnni"])
def test_weight_only_int8_runs_dense_from_its_rows_only_where_pairs_saturate(monkeypatch, int8_engine, saturates):
    """Without VNNI weight-only int8 is four int8 GEMMs: from 64 rows it takes the fp32 GEMM on
    its plain codes (derived once from the packed weight), below them the packed kernel; dynamic
    int8 always keeps the kernel. Forced here on any CPU through the saturation probes."""
    if int8_engine is None:
        pytest.skip("the _int_mm path has no packed weight")
    from torch import nn

    from mono_quant import quantize

    probe = "fbgemm_pairs_saturate" if int8_engine == "fbgemm" else "onednn_pairs_saturate"
    if not saturates and getattr(kernels, probe)():
        pytest.skip("this CPU's int8 kernel saturates: it needs the halves (no VNNI)")
    monkeypatch.setattr(kernels, probe, lambda: saturates)  # True: halves on any CPU, still exact
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(160, 48)).eval()
    rows = kernels._DENSE_INT8_WEIGHT_ONLY_MIN_ROWS
    x = torch.randn(rows, 160)
    for kwargs in ({"bits": 8, "weight_only": True}, {"bits": 8, "dynamic": True}):
        layer = quantize(model, **kwargs).model[0]
        codes, scale = layer.qweight.clone(), layer.weight_scale.clone()
        dequantized = nn.functional.linear(x, codes.float() * scale[:, None], model[0].bias.detach())
        peak = float(dequantized.abs().max())
        with torch.inference_mode():
            below = layer(x[: rows - 1])
            assert "_int8_dense_cache" not in layer.__dict__ and layer.qweight_layout == int8_engine
            size = layer.kernel_nbytes()
            at = layer(x)
        dense = "_int8_dense_cache" in layer.__dict__
        assert dense == (saturates and kwargs.get("weight_only", False)), kwargs
        if dense:
            assert torch.equal(layer.__dict__["_int8_dense_cache"], codes)
            assert layer.kernel_nbytes() == size + codes.numel()  # the model's size tells the truth
            # fp32 activations against the dequantized weight: exact to fp32 rounding
            torch.testing.assert_close(at, dequantized, rtol=0, atol=1e-6 * peak)
        tolerance = 2e-2 if kwargs.get("dynamic") else 1e-3  # per-token int8 / two int8 terms
        torch.testing.assert_close(below, dequantized[: rows - 1], rtol=0, atol=tolerance * peak)
        torch.testing.assert_close(at, dequantized, rtol=0, atol=tolerance * peak)
        assert torch.equal(layer.state_dict()["qweight"], codes)  # what is saved is unchanged
