"""The llama.cpp runtime, set up once per process: logging, what the build has, and loading a text model safely.

Every caller that loads GGUF weights (the `gguf` backend, export's tokenizer check, the benchmarks)
goes through `load_text_model`, which decides one thing the CPU makes dangerous: llama.cpp's "extra
buffer types". At load, ggml's CPU backend may move weights into a buffer that its own kernels read:
CPU_REPACK (interleaved blocks for AVX2 and Arm NEON/i8mm kernels: on phones that is the fast path
for Q4_0/Q8_0) or, in a build compiled with AMX, an "AMX" buffer. On Intel CPUs with AMX that path
segfaults in `ggml_backend_amx_mul_mat` at the first matmul (llama.cpp#20824, closed unfixed). So:

- our wheel is built without AMX (`elemental.llama_build`), which keeps CPU_REPACK;
- for any other build, extra buffer types are turned off (llama.cpp's `--no-repack`) when the build
  has AMX and the CPU may have it;
- after loading, the weights' buffer types (llama.cpp logs them) are checked, and a model that still
  landed in an AMX buffer is loaded again without extra buffer types, before any matmul runs.
"""

from __future__ import annotations

import ctypes
import json
import re
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import llama_cpp
from llama_cpp import mtmd_cpp

from ..errors import ElementalError
from ..hardware import CPU, this_cpu

AMX_BUFFER = "AMX"  # ggml's name for the AMX buffer type (ggml-cpu/amx/amx.cpp)

_GGML_LOG_WARN = 2
_GGML_LOG_ERROR = 3
_log_lines: deque[str] = deque(maxlen=16)
# llama.cpp's load log, per buffer: "load_tensors:   CPU_REPACK model buffer size =    12.00 MiB".
_BUFFER_LINE = re.compile(r"(\S+) model buffer size = +([0-9.]+) MiB")
_buffers: list[tuple[str, float]] = []


@llama_cpp.llama_log_callback
def _on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Keep llama.cpp's recent warnings/errors (to quote in our errors) and the weight buffers it reports."""
    if not text:
        return
    line = text.decode("utf-8", "replace").strip()
    if level in (_GGML_LOG_WARN, _GGML_LOG_ERROR):
        _log_lines.append(line)
    m = _BUFFER_LINE.search(line)
    if m:
        _buffers.append((m.group(1), float(m.group(2))))


_backend_ready = False
# What `make install` built the venv's llama.cpp for (a copy of the wheel cache's build.json).
BUILD_RECORD = Path(sys.prefix) / "share/elemental/llama-cpp-build.json"
# Kernel CPU flags that name instruction sets a -march=native / -mcpu=native build may emit.
_ISA_FLAG = re.compile(r"(sse|ssse|avx|amx|fma|f16c|bmi|abm|adx|sha|aes|vaes|gfni|vpclmul|pclmul|popcnt|movbe|"
                       r"lzcnt|asimd|sve|i8mm|bf16|fp16|fphp|dotprod)")


def check_build_fits_cpu(record: Path, cpu: CPU) -> None:
    """Refuse a native llama.cpp build made on a CPU with instructions this one lacks (else SIGILL, or worse).

    The wheel cache is keyed per CPU, but a venv can still be copied (a container image, rsync) to another
    machine; this says so in one line before llama.cpp runs its first instruction.
    """
    if not record.is_file() or not cpu.flags:
        return
    info = json.loads(record.read_text())
    if not info.get("inputs", {}).get("native"):
        return
    disabled = {f.removeprefix("-mno-").replace("-", "_") for f in info["inputs"].get("cflags", "").split()
                if f.startswith("-mno-")}  # e.g. amx_tile: the AMX guard keeps those instructions out
    built_on = info.get("built_on", {})
    missing = sorted(f for f in set(built_on.get("flags", ())) - cpu.flags - disabled if _ISA_FLAG.match(f))
    if missing:
        raise ElementalError(
            f"the llama.cpp in {record.parents[2]} was built with -march=native on another CPU "
            f"({built_on.get('cpu', '?')}) using {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}, "
            "which this CPU lacks: run `make install` on this machine (it builds and caches a wheel per CPU)")


def quiet_llama() -> None:
    """Initialise llama.cpp once and route its logging (and libmtmd's) to `_on_log`.

    The callback is a module global, so ctypes keeps it alive for as long as C may call it. Before the
    first initialisation the installed build is checked against this CPU (`check_build_fits_cpu`).
    """
    global _backend_ready
    llama_cpp.llama_log_set(_on_log, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_on_log, ctypes.c_void_p(0))
    if not _backend_ready:
        check_build_fits_cpu(BUILD_RECORD, this_cpu())
        llama_cpp.llama_backend_init()
        _backend_ready = True


def llama_said() -> str:
    """The last warning or error llama.cpp logged (for one-line errors), or "" when it said nothing."""
    return f": {_log_lines[-1]}" if _log_lines else ""


@lru_cache(maxsize=1)
def system_info() -> dict[str, str]:
    """What the loaded llama.cpp build has, from `llama_print_system_info()` ("AVX2": "1", "AMX_INT8": "1", ...)."""
    text = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    return dict(re.findall(r"([A-Za-z0-9_]+) = ([^|\s]+)", text))


def build_has_amx() -> bool:
    """Whether this llama.cpp was compiled with AMX kernels (system info reports AMX_INT8 only then)."""
    return system_info().get("AMX_INT8") == "1"


def extra_bufts_safe(build_amx: bool, cpu_flags: frozenset[str]) -> bool:
    """Whether extra buffer types (weight repacking) are safe to use: not with AMX kernels on an AMX CPU.

    A CPU whose flags could not be read counts as possibly AMX. Without AMX kernels in the build the
    only x86 extra buffer type is CPU_REPACK, which is safe and faster for Q4_K/Q4_0 (and on Arm for Q8_0).
    """
    from ..hardware import AMX_FLAGS

    return not (build_amx and (bool(cpu_flags & AMX_FLAGS) or not cpu_flags))


def runtime_versions() -> dict[str, str]:
    """Versions of the llama.cpp runtime and of the gguf package, for manifests and result files."""
    try:
        gguf_version = version("gguf")
    except PackageNotFoundError:
        gguf_version = "not installed"
    try:
        commit_fn = llama_cpp.llama_cpp._lib.ggml_commit
        commit_fn.restype = ctypes.c_char_p
        commit = commit_fn().decode()
    except AttributeError:
        commit = "unknown"
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp": f"the tree vendored by llama-cpp-python {llama_cpp.__version__}",
        "ggml_build_commit": commit,  # as the runtime library reports it (ggml_commit())
        "gguf": gguf_version,
    }


@dataclass
class LoadedModel:
    """A llama.cpp text model and where its weights live: {buffer type: MiB}, as llama.cpp reported at load."""

    model: object  # llama_model_p
    weight_buffers: dict[str, float]
    extra_bufts: bool


def _load(path: Path, extra_bufts: bool) -> LoadedModel | None:
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = extra_bufts
    _buffers.clear()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        return None
    weights: dict[str, float] = {}
    for name, mib in _buffers:
        weights[name] = weights.get(name, 0.0) + mib
    return LoadedModel(model, weights, extra_bufts)


def load_text_model(path: Path, extra_bufts: bool | None = None) -> LoadedModel:
    """Load a text GGUF's weights with an AMX-safe buffer choice (module docstring); a one-line error if not.

    `extra_bufts` None decides from the build and the CPU; True/False force it (True is still refused
    weights in an AMX buffer: they are loaded again without extra buffer types).
    """
    quiet_llama()
    if extra_bufts is None:
        extra_bufts = extra_bufts_safe(build_has_amx(), this_cpu().flags)
    loaded = _load(path, extra_bufts)
    if loaded is not None and AMX_BUFFER in loaded.weight_buffers:
        llama_cpp.llama_model_free(loaded.model)  # before any matmul: that is where AMX crashes
        loaded = _load(path, False)
    if loaded is None:
        raise ElementalError(f"llama.cpp could not load {path}{llama_said()}")
    if not loaded.weight_buffers:
        llama_cpp.llama_model_free(loaded.model)
        raise ElementalError(f"llama.cpp loaded {path} without reporting its weight buffers: cannot check them "
                             "for AMX (llama.cpp changed its load log?)")
    return loaded


def tokenize(vocab, text: str) -> list[int]:
    """Tokens of `text` as llama.cpp makes them: special tokens parsed, no BOS added (the text has it)."""
    data = text.encode("utf-8")
    n_max = len(data) + 16
    buf = (llama_cpp.llama_token * n_max)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, False, True)
    if n < 0:
        raise ElementalError(f"llama.cpp could not tokenize {text[:40]!r} ({-n} tokens > {n_max})")
    return list(buf[:n])


@contextmanager
def gguf_vocab(path: Path) -> Iterator[object]:
    """A text GGUF's vocabulary alone (no weights, so no buffer types), for checking how llama.cpp tokenizes."""
    quiet_llama()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ElementalError(f"llama.cpp could not load the vocabulary of {path}{llama_said()}")
    try:
        yield llama_cpp.llama_model_get_vocab(model)
    finally:
        llama_cpp.llama_model_free(model)
