"""The llama.cpp wheel we build from the llama-cpp-python sdist, and the key of the cache that keeps it.

Building llama.cpp takes about 10 minutes on 2 cores, so `make install` keeps the wheel in
`~/.cache/elemental/wheels/<key>/`. A home folder is often shared between machines (NFS, a container
image, a copied cache), and a wheel built with `-march=native` on one CPU dies with SIGILL (or worse)
on a CPU without its instructions. So the key is a digest of everything the wheel was built for: the
package version, the CMake arguments, the compiler flags and compilers, and, for a native build, the
instruction-set macros that `-march=native` (`-mcpu=native` on Arm) turns on in the compiler on this
machine. A different CPU gives a different key and a build of its own; a portable build
(`-DGGML_NATIVE=OFF` with explicit features) is keyed without the CPU and can be shared.

x86 builds also get `-mno-amx-tile -mno-amx-int8 -mno-amx-bf16`: llama.cpp's AMX path repacks
weights into an "AMX" buffer and segfaults at the first matmul (llama.cpp#20824). Without AMX the
CPU_REPACK buffer type (AVX2 kernels for Q4_K, Q4_0, IQ4_NL) stays available; the runtime guard in
`elemental.classify.llama_runtime` covers any other build.

The phone's llama.cpp (`make native-arm64`) is cross-compiled for aarch64-linux-gnu with the options the
Android module builds with (android/src/main/cpp/llama-options.cmake) and cached the same way, keyed by the
version, the cross toolchain and the contents of those two CMake files (`arm64-key`).

Standard library only, because the Makefile runs it before the virtual environment exists:

    PYTHONPATH=src python3 -m elemental.llama_build --version 0.3.36 key
    PYTHONPATH=src .venv/bin/python -m elemental.llama_build --version 0.3.36 build --sdist S --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .hardware import this_cpu

PACKAGE = "llama-cpp-python"
# Keeps llama.cpp's AMX kernels out of an x86 build (see the module docstring).
NO_AMX_FLAGS = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")
BUILD_INFO = "build.json"
# Environment variables that change what CMake compiles (CC/CXX pick the compilers, probed separately).
_FLAG_VARS = ("CMAKE_ARGS", "CFLAGS", "CXXFLAGS", "LDFLAGS")
_OFF = {"OFF", "0", "FALSE", "NO", "N"}


@dataclass(frozen=True)
class BuildInputs:
    """What a llama-cpp-python wheel was built for; equal inputs give interchangeable wheels."""

    version: str
    machine: str
    cmake_args: str
    cflags: str
    cxxflags: str
    ldflags: str
    toolchain: tuple[str, ...]  # the first line of each compiler's --version
    native: bool
    native_features: tuple[str, ...]  # what -march=native adds, as compiler macros; () when not native


def wheel_key(inputs: BuildInputs, name: str = PACKAGE, extra: tuple[str, ...] = ()) -> str:
    """The cache folder name for a build from `inputs`: readable prefix, digest of everything.

    `name` and `extra` (further build arguments) tell other artifacts built from the same inputs apart.
    """
    blob = json.dumps([asdict(inputs), list(extra)], sort_keys=True).encode() if extra else \
        json.dumps(asdict(inputs), sort_keys=True).encode()
    kind = "native" if inputs.native else "portable"
    return f"{name}-{inputs.version}-{inputs.machine}-{kind}-{hashlib.sha256(blob).hexdigest()[:16]}"


# llama.cpp's own OpenAI-compatible server, built from the same sdist for the teacher's end-to-end test
# and for users who label with a local model: static (one file to cache), offline (no prebuilt web UI).
SERVER = "llama-server"
SERVER_CMAKE_ARGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_SERVER=ON",
                     "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                     "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF")


def server_key(inputs: BuildInputs) -> str:
    return wheel_key(inputs, SERVER, SERVER_CMAKE_ARGS)


def is_native(cmake_args: str, env: dict[str, str]) -> bool:
    """Whether ggml builds with -march=native: GGML_NATIVE as given, else ON unless SOURCE_DATE_EPOCH is set.

    (ggml/CMakeLists.txt turns the default off for reproducible builds, i.e. when SOURCE_DATE_EPOCH is set.)
    """
    for arg in reversed(shlex.split(cmake_args)):
        m = re.fullmatch(r"-DGGML_NATIVE(?::BOOL)?=(\S*)", arg)
        if m:
            return m.group(1).upper() not in _OFF
    return "SOURCE_DATE_EPOCH" not in env


def build_env(env: dict[str, str], machine: str, compiler_accepts) -> dict[str, str]:
    """The environment the build runs in: the caller's, with the AMX guard added to x86 C/C++ flags.

    CMake takes CFLAGS/CXXFLAGS as its initial CMAKE_C(XX)_FLAGS, so the user's CMAKE_ARGS stay theirs.
    `compiler_accepts(flags)` says whether the C compiler takes the guard (old compilers don't know AMX).
    """
    out = dict(env)
    if machine in ("x86_64", "AMD64", "i686") and compiler_accepts(NO_AMX_FLAGS):
        for var in ("CFLAGS", "CXXFLAGS"):
            have = shlex.split(out.get(var, ""))
            out[var] = " ".join([*have, *(f for f in NO_AMX_FLAGS if f not in have)])
    return out


# -- probing this machine's compilers ----------------------------------------------------------------


def _run(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _version_line(cmd: list[str]) -> str:
    """The first line of `cmd --version` (a compiler's name and version), or that it was not found."""
    return (_run([*cmd, "--version"]) or f"{shlex.join(cmd)}: not found").splitlines()[0].strip()


def _compilers(env: dict[str, str]) -> tuple[list[str], list[str]]:
    return shlex.split(env.get("CC") or "cc"), shlex.split(env.get("CXX") or "c++")


def _accepts(cc: list[str], flags: tuple[str, ...]) -> bool:
    return _run([*cc, *flags, "-x", "c", "-E", "-o", os.devnull, os.devnull]) is not None


def _macros(cc: list[str], flags: list[str]) -> set[str] | None:
    out = _run([*cc, *flags, "-dM", "-E", "-x", "c", os.devnull])
    return None if out is None else {line.split()[1] for line in out.splitlines() if line.startswith("#define ")}


def native_features(cc: list[str], machine: str) -> tuple[str, ...]:
    """The macros that ggml's native flag adds in this compiler on this CPU (__AVX2__, __AMX_TILE__, ...).

    ggml uses -march=native on x86 and -mcpu=native on Arm. Where the compiler can't say, the kernel's
    CPU flags stand in: a key must never be shared by two CPUs that could differ.
    """
    native = ["-mcpu=native"] if machine in ("aarch64", "arm64") else ["-march=native"]
    base, tuned = _macros(cc, []), _macros(cc, native)
    if base is None or tuned is None:
        return tuple(sorted(f"cpuinfo:{f}" for f in this_cpu().flags))
    return tuple(sorted(tuned - base))


def detect(version: str, env: dict[str, str] | None = None) -> tuple[BuildInputs, dict[str, str]]:
    """This machine's build inputs for `version`, and the environment to build in."""
    env = dict(os.environ if env is None else env)
    machine = this_cpu().machine
    cc, cxx = _compilers(env)
    benv = build_env(env, machine, lambda flags: _accepts(cc, flags))
    cmake_args = benv.get("CMAKE_ARGS", "")
    toolchain = [_version_line(c) for c in (cc, cxx)]
    if re.search(r"-DGGML_CUDA(?::BOOL)?=(ON|1|TRUE|YES)", cmake_args, re.IGNORECASE):
        nvcc = _run(["nvcc", "--version"])
        toolchain.append(nvcc.strip().splitlines()[-1] if nvcc else "nvcc: not found")
    native = is_native(cmake_args, benv)
    inputs = BuildInputs(
        version=version, machine=machine, cmake_args=cmake_args, cflags=benv.get("CFLAGS", ""),
        cxxflags=benv.get("CXXFLAGS", ""), ldflags=benv.get("LDFLAGS", ""), toolchain=tuple(toolchain),
        native=native, native_features=native_features(cc, machine) if native else (),
    )
    return inputs, benv


# -- building into the cache -------------------------------------------------------------------------


def _cached(out: Path, key: str, make: Callable[[Path, Path], dict], complete: Callable[[Path], bool]) -> Path:
    """`out`, holding a finished build: built now by `make(work, stage)` unless it is there already.

    Finished means BUILD_INFO is there and `complete(out)` finds the products. `make` builds in the
    scratch folder `work`, leaves its products in `stage` and returns the facts to record. The stage
    gets BUILD_INFO last and is renamed onto `out` whole, beside it on the same disk, so an interrupted
    build leaves nothing that looks finished, and an unfinished folder is built again.
    """
    if out.name != key:
        raise SystemExit(f"error: {out} is not named by this machine's key {key} (inputs changed?)")
    if (out / BUILD_INFO).is_file() and complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        stage = work / "out"
        stage.mkdir()
        t0 = time.time()
        facts = make(work, stage)
        cpu = this_cpu()
        info = {"key": key, **facts, "built_on": {"cpu": cpu.model, "kind": cpu.kind(), "flags": sorted(cpu.flags)},
                "build_seconds": round(time.time() - t0)}
        (stage / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)  # an interrupted copy
        os.replace(stage, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def build(version: str, sdist: Path, out: Path, jobs: int) -> Path:
    """The cached wheel for this machine in `out` (named by `key`), built from `sdist` when not there yet.

    pip's own wheel cache is bypassed: it is keyed by the sdist alone and would hand back a wheel built
    with other flags.
    """
    inputs, env = detect(version)

    def make(work: Path, stage: Path) -> dict:
        env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(jobs)
        kind = f"native, {len(inputs.native_features)} CPU features" if inputs.native else "portable"
        print(f"building {PACKAGE} {version} into {out} ({kind}; CMAKE_ARGS={inputs.cmake_args!r} "
              f"CFLAGS={inputs.cflags!r}): about 10 minutes on 2 cores", flush=True)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", str(stage), str(sdist)]
        subprocess.run(cmd, env=env, check=True)
        wheel = _one_wheel(stage)
        return {"inputs": asdict(inputs), "wheel": wheel.name, "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}

    return _one_wheel(_cached(out, wheel_key(inputs), make, lambda d: len(list(d.glob("*.whl"))) == 1))


def _one_wheel(folder: Path) -> Path:
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"error: pip wheel left {len(wheels)} wheels in {folder}, expected one")
    return wheels[0]


def _cmake_build(work: Path, version: str, sdist: Path, args: list[str], jobs: int, env: dict[str, str] | None = None,
                 target: str | None = None) -> Path:
    """The sdist's vendored llama.cpp unpacked into `work`/src, configured with `args` and built in `work`/build
    (one `target`, or all); returns the build folder. CMake's own chatter is dropped, its errors are not."""
    src, build_dir = work / "src", work / "build"
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(src, members=[m for m in members if m.name], filter="data")
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), *args], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), *(["--target", target] if target else []), "-j", str(jobs)],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return build_dir


def build_server(version: str, sdist: Path, out: Path, jobs: int) -> Path:
    """llama-server built from the sdist's llama.cpp into `out` (named by `server_key`), unless it is there.

    The same environment (CMAKE_ARGS, C/C++ flags with the AMX guard, -march=native) as the wheel.
    """
    inputs, env = detect(version)

    def make(work: Path, stage: Path) -> dict:
        print(f"building {SERVER} from {sdist.name} into {out} (CFLAGS={inputs.cflags!r}): about 7 minutes on 2 cores",
              flush=True)
        build_dir = _cmake_build(work, version, sdist, [*SERVER_CMAKE_ARGS, *shlex.split(inputs.cmake_args)], jobs,
                                 env, target=SERVER)
        shutil.copy2(build_dir / "bin" / SERVER, stage / SERVER)
        return {"inputs": asdict(inputs), "cmake_args": list(SERVER_CMAKE_ARGS)}

    return _cached(out, server_key(inputs), make, lambda d: (d / SERVER).is_file()) / SERVER


# -- the phone's llama.cpp: cross-compiled for ARM64 ------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
ARM64_OPTIONS = ROOT / "android" / "src" / "main" / "cpp" / "llama-options.cmake"
ARM64_TOOLCHAIN = ROOT / "native" / "cmake" / "aarch64-linux-gnu.cmake"
ARM64_COMPILERS = (["clang", "--target=aarch64-linux-gnu"], ["aarch64-linux-gnu-g++"])  # compiler, C++ runtime


def arm64_key(version: str, options: Path = ARM64_OPTIONS, toolchain: Path = ARM64_TOOLCHAIN) -> str:
    """The cache folder name of the ARM64 build: the version, the cross toolchain, the two CMake files.

    A portable build (GGML_NATIVE off, every CPU variant): nothing of the machine that builds it goes in.
    """
    blob = json.dumps({"version": version, "toolchain": [_version_line(c) for c in ARM64_COMPILERS],
                       "options": options.read_text(), "cross": toolchain.read_text()}, sort_keys=True).encode()
    return f"llama-arm64-{version}-{hashlib.sha256(blob).hexdigest()[:16]}"


def build_arm64(version: str, sdist: Path, out: Path, jobs: int, options: Path = ARM64_OPTIONS,
                toolchain: Path = ARM64_TOOLCHAIN) -> Path:
    """llama.cpp's shared libraries for aarch64-linux-gnu in `out`/lib (named by `arm64_key`), unless there.

    libllama, libmtmd, libggml, libggml-base and one libggml-cpu-<variant>.so per ARM instruction-set level,
    configured by `options` (`cmake -C`, the file the Android module includes) and `toolchain`.
    """
    missing = [c[0] for c in ARM64_COMPILERS if shutil.which(c[0]) is None]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not found: apt-get install clang g++-aarch64-linux-gnu")

    def make(work: Path, stage: Path) -> dict:
        print(f"cross-building llama.cpp for ARM64 from {sdist.name} into {out}: about 4 minutes on 2 cores",
              file=sys.stderr, flush=True)
        build_dir = _cmake_build(work, version, sdist, ["-C", str(options), f"-DCMAKE_TOOLCHAIN_FILE={toolchain}",
                                                        "-DCMAKE_BUILD_TYPE=Release"], jobs)
        lib = stage / "lib"
        lib.mkdir()
        for so in sorted((build_dir / "bin").glob("lib*.so*")):
            if so.is_symlink():
                (lib / so.name).symlink_to(os.readlink(so))
            else:
                shutil.copy2(so, lib / so.name)
        variants = sorted(p.name for p in lib.glob("libggml-cpu-*.so"))
        if not variants:
            raise SystemExit(f"error: the ARM64 build made no libggml-cpu-*.so (is GGML_BACKEND_DL on in {options}?)")
        return {"version": version, "options": options.read_text(), "toolchain": toolchain.read_text(),
                "cpu_variants": variants}

    return _cached(out, arm64_key(version, options, toolchain), make,
                   lambda d: (d / "lib" / "libllama.so").exists() and any((d / "lib").glob("libggml-cpu-*.so")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m elemental.llama_build", description=__doc__.splitlines()[0])
    ap.add_argument("--version", required=True, help=f"{PACKAGE} version")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("key", help="print the cache key of this machine's build")
    sub.add_parser("server-key", help="print the cache key of this machine's llama-server build")
    sub.add_parser("describe", help="print the build inputs behind the key, as JSON")
    sub.add_parser("arm64-key", help="print the cache key of the ARM64 cross build")
    b = sub.add_parser("build", help="build the wheel into OUT unless it is there; print the wheel's path")
    b.add_argument("--sdist", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True, help="the cache folder (its name should be the key)")
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    b = sub.add_parser("build-server", help="build llama-server into OUT unless it is there; print its path")
    b.add_argument("--sdist", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True, help="the cache folder (its name should be the server key)")
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    b = sub.add_parser("build-arm64", help="cross-build llama.cpp for ARM64 into CACHE/<arm64 key> unless it is "
                                           "there; print that folder")
    b.add_argument("--sdist", type=Path, required=True)
    b.add_argument("--cache", type=Path, required=True, help="the folder holding one subfolder per arm64 key")
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    if args.command == "build":
        print(build(args.version, args.sdist, args.out, args.jobs))
        return 0
    if args.command == "build-server":
        print(build_server(args.version, args.sdist, args.out, args.jobs))
        return 0
    if args.command == "arm64-key":
        print(arm64_key(args.version))
        return 0
    if args.command == "build-arm64":
        # The key is computed here, not by the Makefile: `make test` may have just installed the cross compilers.
        print(build_arm64(args.version, args.sdist, args.cache / arm64_key(args.version), args.jobs))
        return 0
    inputs, _ = detect(args.version)
    keys = {"key": wheel_key, "server-key": server_key}
    print(keys[args.command](inputs) if args.command in keys else json.dumps(asdict(inputs), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
