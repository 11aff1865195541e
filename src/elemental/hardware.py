"""What this machine's CPU can do, read from the kernel, never assumed.

Machines differ between sessions, users and CI runs: one x86 CPU has no native bf16, another has
AVX512-BF16 and AMX, a phone is ARM. Code that picks a precision, a llama.cpp setting or a wheel asks
here. Standard library only: the Makefile runs `elemental.llama_build` (which uses this) before the
virtual environment exists.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# Intel AMX (Sapphire Rapids and later): llama.cpp's AMX kernels crash here (llama.cpp#20824).
AMX_FLAGS = frozenset({"amx_tile", "amx_int8", "amx_bf16"})
# Instructions that compute in bf16 natively: x86 AVX512-BF16 / AMX-BF16, Arm's BF16 extension.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@dataclass(frozen=True)
class CPU:
    """The CPU as /proc/cpuinfo describes it: model name, architecture and feature flags."""

    model: str
    machine: str  # platform.machine(): x86_64, aarch64, ...
    flags: frozenset[str]
    cores: int

    @property
    def amx(self) -> bool:
        return bool(self.flags & AMX_FLAGS)

    @property
    def native_bf16(self) -> bool:
        return bool(self.flags & BF16_FLAGS)

    def kind(self) -> str:
        """A short name for figures measured on this CPU ("x86_64 AVX512 AVX512-BF16 AMX, 2 cores")."""
        marks = [(("avx512f",), "AVX512"), (("avx512_bf16",), "AVX512-BF16"), (tuple(AMX_FLAGS), "AMX"),
                 (("avx2",), "AVX2"), (("asimddp",), "dotprod"), (("i8mm",), "i8mm"), (("bf16",), "BF16")]
        seen = [name for keys, name in marks if any(k in self.flags for k in keys)]
        if "AVX512" in seen:
            seen.remove("AVX2")  # implied
        return f"{self.machine} {' '.join(seen) or 'baseline'}, {self.cores} cores"


def parse_cpuinfo(text: str, machine: str, cores: int) -> CPU:
    """A CPU from the text of /proc/cpuinfo (x86 lists `flags`, Arm `Features`; the first CPU's are used)."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "Hardware") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return CPU(model=model or machine, machine=machine, flags=flags, cores=cores)


@lru_cache(maxsize=1)
def this_cpu() -> CPU:
    """This machine's CPU; without /proc/cpuinfo (not Linux) the flags are empty: nothing is assumed."""
    import os

    text = CPUINFO.read_text(errors="replace") if CPUINFO.is_file() else ""
    return parse_cpuinfo(text, platform.machine(), os.cpu_count() or 1)
