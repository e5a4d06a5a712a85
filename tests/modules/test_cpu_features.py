"""CPU feature detection: parsed from /proc/cpuinfo, torch's dispatch level as fallback, cached."""

from __future__ import annotations

import dataclasses

import pytest

from mono_quant.modules import cpu_features as features_module
from mono_quant.modules.cpu_features import CpuFeatures, cpu_features, detect_cpu_features

# The flags lines of the two CPU kinds the benchmarks ran on, shortened to what matters.
XEON_AMX = "fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8"
ZEN4 = "fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 avx512_vbmi2"
AVX2_ONLY = "fpu sse2 avx avx2 fma"


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    cpu = "processor\t: {}\nmodel name\t: test cpu\nflags\t\t: " + flags + "\n"
    path.write_text(cpu.format(0) + "\n" + cpu.format(1))
    return str(path)


FEATURES = ("amx_int8", "amx_bf16", "avx512_vnni", "avx512_bf16", "avx512", "avx2")


@pytest.mark.parametrize(
    "flags, present",
    [
        (XEON_AMX, set(FEATURES)),
        (ZEN4, {"avx512_vnni", "avx512_bf16", "avx512", "avx2"}),
        (AVX2_ONLY, {"avx2"}),
    ],
    ids=["xeon-amx", "zen4", "avx2-only"],
)
def test_flags_are_read_from_cpuinfo(tmp_path, flags, present):
    features = detect_cpu_features(_cpuinfo(tmp_path, flags))
    assert features.source == "cpuinfo"
    assert {name for name in FEATURES if getattr(features, name)} == present
    assert features.fast_bf16_matmul == ("avx512_bf16" in present)


def test_amx_needs_the_tile_flag(tmp_path):
    # amx_int8 without amx_tile (a hypervisor hiding the tile state) is no AMX
    features = detect_cpu_features(_cpuinfo(tmp_path, ZEN4 + " amx_int8 amx_bf16"))
    assert not features.amx_int8 and not features.amx_bf16


@pytest.mark.parametrize(
    "capability, avx512, avx2",
    [("AVX512", True, True), ("AVX2", False, True), ("DEFAULT", False, False)],
)
def test_unreadable_cpuinfo_falls_back_to_torch_capability(tmp_path, monkeypatch, capability, avx512, avx2):
    monkeypatch.setattr(features_module, "aten_capability", lambda: capability)
    features = detect_cpu_features(str(tmp_path / "missing"))
    # the dispatch level says nothing about VNNI, BF16 or AMX: the generic kernels are chosen
    assert (features.avx512, features.avx2) == (avx512, avx2)
    assert not (features.amx_int8 or features.amx_bf16 or features.avx512_vnni or features.avx512_bf16)
    assert features.capability == capability
    assert features.source == ("none" if capability == "DEFAULT" else "torch")


def test_cpuinfo_without_flags_line_falls_back(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nFeatures\t: fp asimd\n")  # an Arm kernel's format
    assert detect_cpu_features(str(path)).source in ("torch", "none")


def test_cached_frozen_and_jsonable():
    first = cpu_features()
    assert cpu_features() is first
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.amx_int8 = True  # type: ignore[misc]
    record = first.as_dict()
    assert set(record) >= {"amx_int8", "amx_bf16", "avx512_vnni", "avx512_bf16", "avx2", "capability", "source"}
    assert CpuFeatures().as_dict()["source"] == "none"
