"""What the CPU can do for reduced precision: bf16 (AMX, AVX512-BF16) and int8 (AMX, VNNI) units.

Read from ``/proc/cpuinfo`` flags (Linux); on other systems nothing is detected, and the bf16 forms are
skipped with that reason rather than run emulated (slower than fp32, which would mislead a benchmark).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["cpu_flags", "bf16_unit", "int8_unit"]

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # best first
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx2")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The ``flags`` of the first processor in ``/proc/cpuinfo`` (or in the text given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_unit(flags: set[str] | None = None) -> str | None:
    """The CPU's native bf16 instructions (``amx_bf16`` or ``avx512_bf16``), None without them."""
    flags = cpu_flags() if flags is None else flags
    return next((f for f in BF16_FLAGS if f in flags), None)


def int8_unit(flags: set[str] | None = None) -> str | None:
    """The widest int8 dot-product instructions: AMX, AVX-512 VNNI, AVX-VNNI, else plain AVX2."""
    flags = cpu_flags() if flags is None else flags
    return next((f for f in INT8_FLAGS if f in flags), None)
