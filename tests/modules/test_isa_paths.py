"""Kernels whose results depend on the instruction set: exact on every CPU kind.

Two things differ between x86 CPUs beyond speed (both found on an AVX2-only AMD Zen 3):
* oneDNN's int8 kernel without VNNI sums pairs of u8 x s8 products in int16 with saturation;
  ``onednn_linear`` halves the activation codes there (kernels.py).
* torch's CPU int4 kernel packs its weight in blocks of 64 rows under AVX-512 and 32 under AVX2.

The last test runs a child process with ``ONEDNN_MAX_CPU_ISA=AVX2`` and
``ATEN_CPU_CAPABILITY=avx2``, so an AVX-512 or AMX machine runs the AVX2 code paths too.
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


@needs_onednn
def test_saturation_probe_agrees_with_the_cpu():
    # VNNI (AVX-512 VNNI, AVX-VNNI) or AMX accumulate in int32; unless oneDNN is capped below
    # them, the probe must find no saturation there
    features = cpu_features()
    capped = "ONEDNN_MAX_CPU_ISA" in os.environ or "DNNL_MAX_CPU_ISA" in os.environ
    if (features.avx512_vnni or features.amx_int8) and not capped:
        assert not kernels.onednn_pairs_saturate()
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
              "int4_block": kernels.cpu_int4_block()}
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

    fast = {name: run(kwargs) for name, kwargs in cases.items()}
    # the generic paths: int8 on _int_mm (int32 accumulation), int4 dequantized
    linear.onednn_int8_available = lambda: False
    linear.cpu_int4_supported = lambda *args: False
    for name, kwargs in cases.items():
        generic = run(kwargs)
        report[name] = {"layouts": fast[name][2], "generic_layouts": generic[2],
                        "db": sqnr(generic[0], fast[name][0]), "db_one_row": sqnr(generic[1], fast[name][1])}
    print(json.dumps(report))
    """
)


@pytest.mark.skipif(not cpu_features().avx2, reason="needs an x86 CPU with AVX2")
def test_avx2_code_paths_compute_what_the_generic_paths_compute():
    """Forced onto their AVX2 code (any AVX2 machine), the oneDNN int8 and CPU int4 kernels give
    the outputs of the generic paths: int8 to fp32 rounding, int4 to its bf16 activations."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", _AVX2_CHILD], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["capability"] == "AVX2" and report["int4_block"] == 32
    onednn = kernels.onednn_int8_available()
    if onednn:
        assert report["saturates"], "oneDNN capped at AVX2 has no VNNI: the probe must see it saturate"
    for name in ("int8_dynamic", "int8_weight_only", "int8_static"):
        assert report[name]["layouts"] == (["onednn"] if onednn else ["packed"]), report[name]
        assert report[name]["generic_layouts"] == ["packed"]
        # measured with the saturating sums (before the halving): 12 dB dynamic and weight-only, 28 static
        assert report[name]["db"] > 60 and report[name]["db_one_row"] > 60, (name, report[name])
    assert report["int4"]["layouts"] == ["cpu_int4"]  # the 96-row layer fits 32-row blocks
    assert report["int4"]["db"] > 35 and report["int4"]["db_one_row"] > 35, report["int4"]
