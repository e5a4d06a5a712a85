"""What this CPU's instruction set offers the quantized kernels, detected once per process.

The kernel choices in :mod:`mono_quant.modules.kernels` depend on it: AMX (Intel Sapphire
Rapids and later) multiplies int8 and bf16 tiles several times faster than AVX-512, so dense
bf16 GEMMs and signed int8 activations pay off earlier there than on AVX-512 VNNI / BF16
CPUs (AMD Zen 4) or AVX2-only ones.

Sources, first that answers: the ``flags`` line of ``/proc/cpuinfo`` (Linux), else torch's
ATen dispatch level (``torch.backends.cpu.get_cpu_capability()``, which only tells AVX2 from
AVX-512), else nothing: every feature False, which selects the generic kernels.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

__all__ = ["CpuFeatures", "aten_capability", "cpu_features"]

_CPUINFO = "/proc/cpuinfo"


@dataclass(frozen=True)
class CpuFeatures:
    """x86 features the kernel choice reads; all False means "use the generic paths".

    Example:
        >>> features = cpu_features()
        >>> isinstance(features.amx_int8, bool)
        True
    """

    amx_int8: bool = False
    amx_bf16: bool = False
    avx512_vnni: bool = False
    avx512_bf16: bool = False
    avx512: bool = False
    avx2: bool = False
    capability: str = "unknown"  # torch's ATen dispatch level: DEFAULT, AVX2, AVX512, ...
    source: str = "none"  # where the flags came from: "cpuinfo", "torch" or "none"

    @property
    def fast_bf16_matmul(self) -> bool:
        """bf16 GEMMs run in hardware (AMX tiles or AVX-512 BF16 dot products), not emulated."""
        return self.amx_bf16 or self.avx512_bf16

    def as_dict(self) -> dict[str, object]:
        """A JSON-friendly copy (bench output, reports)."""
        return asdict(self)


@functools.cache
def aten_capability() -> str:
    """The code level ATen dispatches CPU kernels to in this process ("AVX512", "AVX2",
    "DEFAULT", ...; the ``ATEN_CPU_CAPABILITY`` environment variable can lower it), or "unknown".

    Unlike the instruction set it decides layouts, not just speed: torch's CPU int4 kernel
    packs its weight in blocks whose size depends on it.
    """
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def _cpuinfo_flags(path: str = _CPUINFO) -> set[str] | None:
    """The first ``flags`` line of ``path`` as a set; None when the file is unreadable or has none
    (not Linux, a sandbox hiding /proc, a non-x86 CPU)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        return None
    return None


def detect_cpu_features(cpuinfo_path: str = _CPUINFO) -> CpuFeatures:
    """Detect without the cache (tests point ``cpuinfo_path`` at a fixture file)."""
    capability = aten_capability()
    flags = _cpuinfo_flags(cpuinfo_path)
    if flags is not None:
        return CpuFeatures(
            amx_int8="amx_int8" in flags and "amx_tile" in flags,
            amx_bf16="amx_bf16" in flags and "amx_tile" in flags,
            avx512_vnni="avx512_vnni" in flags,
            avx512_bf16="avx512_bf16" in flags,
            avx512="avx512f" in flags,
            avx2="avx2" in flags,
            capability=capability,
            source="cpuinfo",
        )
    upper = capability.upper()
    if upper.startswith(("AVX2", "AVX512")):
        # The dispatch level says nothing about VNNI, BF16 or AMX: assume none of them.
        return CpuFeatures(avx512=upper.startswith("AVX512"), avx2=True, capability=capability, source="torch")
    return CpuFeatures(capability=capability)


@functools.cache
def cpu_features() -> CpuFeatures:
    """This CPU's features, detected on the first call and cached for the process.

    Example:
        >>> cpu_features().source in ("cpuinfo", "torch", "none")
        True
    """
    return detect_cpu_features()
