"""Run llama.cpp's own converter (and quantizer) on a merged SmolVLM: the text GGUF and the mmproj GGUF.

The converter comes from the same llama.cpp commit as the runtime (the Makefile unpacks it from the
llama-cpp-python sdist), so what it writes is exactly what the runtime reads. We call it, never copy it.

It runs in a subprocess through this module (`python -m elemental.export.convert ...`) for one reason:
the tiny test model's tokenizer is trained locally, and the converter recognises BPE pre-tokenizers by
a hash of the tokens of a fixed text, so it rejects it. Only for a model that carries the tiny marker
(`elemental_tiny.json`, which records the pre-tokenizer it was built with) do we pass
`--tokenizer-pre NAME`, and only then does the launcher below wrap the converter's
`TextModel.get_vocab_base_pre` to answer NAME where it would raise. A real model runs through the
converter untouched.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import ElementalError
from ..synthetic import tiny_marker

LLAMA_CPP_DIR_ENV = "ELEMENTAL_LLAMA_CPP_DIR"
CONVERTER = "convert_hf_to_gguf.py"
# Types the converter writes directly, and the ones llama.cpp's quantizer makes from an F16 GGUF.
CONVERTER_TYPES = {"F16": "f16", "Q8_0": "q8_0", "F32": "f32"}
# Q4_0 is the type llama.cpp repacks into its interleaved ARM layouts (dotprod/i8mm kernels) at load time.
QUANTIZER_TYPES = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
TEXT_TYPES = ("Q8_0", "Q4_0", "Q4_K_M", "F16")  # F32 text would be 4x Q8_0 for nothing a phone can use
MMPROJ_TYPES = tuple(CONVERTER_TYPES)


def llama_cpp_dir() -> Path:
    """Where llama.cpp's converter lives: $ELEMENTAL_LLAMA_CPP_DIR, else what `make install` unpacked."""
    override = os.environ.get(LLAMA_CPP_DIR_ENV)
    path = Path(override) if override else Path(sys.prefix) / "share/elemental/llama.cpp"
    if not (path / CONVERTER).is_file() or not (path / "conversion").is_dir():
        source = f"${LLAMA_CPP_DIR_ENV}" if override else "this environment"
        raise ElementalError(f"llama.cpp converter not found in {path} ({source}); run make install")
    return path


def converter_source() -> str:
    """What the converter tree was unpacked from (the SOURCE file the Makefile writes), for manifests."""
    source = llama_cpp_dir() / "SOURCE"
    return source.read_text().strip() if source.is_file() else "unknown"


def tokenizer_pre_override(model_dir: Path) -> str | None:
    """The pre-tokenizer name to force, for a locally built tiny model only; None for every other model.

    The tiny model's marker file names it; `merge` carries the marker into the merged folder.
    """
    marker = tiny_marker(model_dir)
    return marker.get("tokenizer_pre") if marker else None


def converter_command(model_dir: Path, outfile: Path, outtype: str, mmproj: bool) -> list[str]:
    """The command line that converts `model_dir`: through our launcher, with `--tokenizer-pre` if marked."""
    cmd = [sys.executable, "-m", __name__]
    pre = tokenizer_pre_override(model_dir)
    if pre:
        cmd += ["--tokenizer-pre", pre]
    cmd += [str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    if mmproj:
        cmd.append("--mmproj")
    return cmd


def run_converter(model_dir: Path, outfile: Path, gguf_type: str, mmproj: bool = False) -> Path:
    """Convert `model_dir` to `outfile` (text model, or the vision projector when `mmproj`)."""
    if gguf_type not in CONVERTER_TYPES:
        raise ElementalError(f"the converter writes {list(CONVERTER_TYPES)}, not {gguf_type!r}")
    cmd = converter_command(Path(model_dir), Path(outfile), CONVERTER_TYPES[gguf_type], mmproj)
    env = {**os.environ, LLAMA_CPP_DIR_ENV: str(llama_cpp_dir())}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not Path(outfile).is_file():
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        what = "mmproj" if mmproj else "text model"
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        raise ElementalError(f"llama.cpp converter failed on {model_dir} ({what}): {last}")
    return Path(outfile)


def quantize(src: Path, dst: Path, gguf_type: str, n_threads: int | None = None) -> Path:
    """Quantize an F16 text GGUF with llama.cpp's own quantizer (llama_model_quantize)."""
    import llama_cpp  # imported here: the converter subprocess, which also runs this module, needs none of it

    from ..classify.llama_runtime import llama_said, quiet_llama

    if gguf_type not in QUANTIZER_TYPES:
        raise ElementalError(f"llama_model_quantize is used for {list(QUANTIZER_TYPES)}, not {gguf_type!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZER_TYPES[gguf_type])
    params.nthread = n_threads or os.cpu_count() or 1
    quiet_llama()  # its per-tensor log is noise; a failure is quoted in the error below
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not Path(dst).is_file():
        raise ElementalError(
            f"llama.cpp quantizer failed making {gguf_type} from {src} (code {rc}){llama_said()}")
    return Path(dst)


def convert_text(model_dir: Path, paths: dict[str, Path]) -> dict[str, Path]:
    """Write the text model at every requested type ({type: path}); quantizer types go through F16.

    The F16 intermediate is a requested output when F16 is asked for too, else a temp file that is
    removed when the quantized files are written.
    """
    unknown = sorted(set(paths) - set(TEXT_TYPES))
    if unknown:
        raise ElementalError(f"unknown text GGUF type(s) {unknown}; choose from {list(TEXT_TYPES)}")
    for gguf_type in CONVERTER_TYPES:
        if gguf_type in paths:
            run_converter(model_dir, paths[gguf_type], gguf_type)
    wanted = [t for t in QUANTIZER_TYPES if t in paths]
    if wanted:
        with tempfile.TemporaryDirectory(prefix=".f16-", dir=next(iter(paths.values())).parent) as tmp:
            f16 = paths.get("F16") or run_converter(model_dir, Path(tmp) / "text-F16.gguf", "F16")
            for gguf_type in wanted:
                quantize(f16, paths[gguf_type], gguf_type)
    return paths


def convert_mmproj(model_dir: Path, path: Path, gguf_type: str) -> Path:
    """Write the vision encoder + connector (llama.cpp's "mmproj") at `gguf_type`."""
    if gguf_type not in MMPROJ_TYPES:
        raise ElementalError(f"unknown mmproj type {gguf_type!r}; choose from {list(MMPROJ_TYPES)}")
    return run_converter(model_dir, path, gguf_type, mmproj=True)


# -- the launcher: `python -m elemental.export.convert [--tokenizer-pre NAME] CONVERTER-ARGS...` -----------


def _split_tokenizer_pre(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take our one option out of argv; everything else is the converter's."""
    if argv[:1] == ["--tokenizer-pre"]:
        if len(argv) < 2:
            raise SystemExit("--tokenizer-pre needs a name")
        return argv[1], argv[2:]
    return None, argv


def _force_tokenizer_pre(text_model_cls: type, name: str) -> None:
    """Make the converter name the pre-tokenizer `name` where its hash table does not know the tokenizer."""
    original = text_model_cls.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return name

    text_model_cls.get_vocab_base_pre = get_vocab_base_pre


def main(argv: list[str] | None = None) -> None:
    """Run llama.cpp's converter in this process, with the tiny model's pre-tokenizer when asked."""
    tokenizer_pre, converter_args = _split_tokenizer_pre(list(sys.argv[1:] if argv is None else argv))
    root = llama_cpp_dir()
    sys.path.insert(0, str(root))
    if "NO_LOCAL_GGUF" not in os.environ:
        sys.path.insert(1, str(root / "gguf-py"))  # what the converter script itself does
    import convert_hf_to_gguf
    from conversion.base import TextModel

    if tokenizer_pre:
        _force_tokenizer_pre(TextModel, tokenizer_pre)
    sys.argv = [str(root / CONVERTER), *converter_args]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
