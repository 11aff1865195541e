"""The CPUs our users have: the llama.cpp wheel cache key, the AMX guard, and reading the CPU (issue 10).

The key tests use the real compiler: a CPU without some instruction set is stood in for by the same
compiler told `-mno-<feature>`, which changes what `-march=native` turns on exactly as another CPU would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from elemental import llama_build
from elemental.classify.llama_runtime import _BUFFER_LINE, extra_bufts_safe
from elemental.hardware import CPUINFO, parse_cpuinfo, this_cpu
from elemental.llama_build import NO_AMX_FLAGS, BuildInputs, build_env, detect, is_native, wheel_key

ROOT = Path(__file__).resolve().parents[1]
X86 = this_cpu().machine == "x86_64"
BASE = BuildInputs(version="0.3.36", machine="x86_64", cmake_args="", cflags="", cxxflags="", ldflags="",
                   toolchain=("cc (Debian 12.2.0-14) 12.2.0", "c++ (Debian 12.2.0-14) 12.2.0"), native=True,
                   native_features=("__AVX2__", "__AVX512F__", "__AVX__", "__F16C__", "__FMA__"))


# -- the key function ----------------------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    {"version": "0.3.37"},
    {"cmake_args": "-DGGML_CUDA=ON"},
    {"cflags": "-O2"},
    {"cxxflags": "-mno-amx-tile"},
    {"ldflags": "-static-libstdc++"},
    {"toolchain": ("clang version 16.0.6", "clang version 16.0.6")},
    {"machine": "aarch64"},
    {"native_features": ("__AVX2__", "__AVX__", "__F16C__", "__FMA__")},  # the same build on a CPU without AVX512
    {"native_features": (*BASE.native_features, "__AMX_TILE__")},  # ... and on one with AMX
    {"native": False, "native_features": ()},
])
def test_key_changes_with_anything_the_wheel_was_built_for(change):
    assert wheel_key(replace(BASE, **change)) != wheel_key(BASE)


def test_key_is_stable_and_readable():
    assert wheel_key(BASE) == wheel_key(replace(BASE))
    key = wheel_key(BASE)
    assert key.startswith("llama-cpp-python-0.3.36-x86_64-native-") and len(key.rsplit("-", 1)[1]) == 16
    assert "portable" in wheel_key(replace(BASE, native=False, native_features=()))


@pytest.mark.parametrize("cmake_args, env, native", [
    ("", {}, True),
    ("-DGGML_NATIVE=OFF -DGGML_AVX2=ON", {}, False),
    ("-DGGML_NATIVE:BOOL=off", {}, False),
    ("-DGGML_NATIVE=0", {}, False),
    ("-DGGML_NATIVE=OFF -DGGML_NATIVE=ON", {}, True),  # the last one wins, as in CMake
    ("", {"SOURCE_DATE_EPOCH": "1700000000"}, False),  # ggml's default for reproducible builds
    ("-DGGML_NATIVE=ON", {"SOURCE_DATE_EPOCH": "1700000000"}, True),
])
def test_native_is_read_as_ggml_reads_it(cmake_args, env, native):
    assert is_native(cmake_args, env) is native


def test_amx_guard_is_added_on_x86_only_and_keeps_user_flags():
    env = build_env({"CFLAGS": "-O3 -g", "CMAKE_ARGS": "-DGGML_CUDA=ON"}, "x86_64", lambda flags: True)
    assert env["CFLAGS"].split() == ["-O3", "-g", *NO_AMX_FLAGS]
    assert env["CXXFLAGS"].split() == list(NO_AMX_FLAGS)
    assert env["CMAKE_ARGS"] == "-DGGML_CUDA=ON"
    again = build_env(env, "x86_64", lambda flags: True)
    assert again["CFLAGS"] == env["CFLAGS"]  # not added twice
    assert "CFLAGS" not in build_env({}, "aarch64", lambda flags: True)
    assert "CFLAGS" not in build_env({}, "x86_64", lambda flags: False)  # a compiler that doesn't know AMX


# -- the key on this machine, through the real compiler -------------------------------------------------

def _env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "CFLAGS", "CXXFLAGS", "LDFLAGS", "CC",
                                                               "CXX", "SOURCE_DATE_EPOCH")}
    return {**base, **extra}


@pytest.mark.skipif(not X86, reason="x86 instruction-set flags")
def test_native_key_follows_the_cpu_features_the_compiler_sees():
    here, _ = detect("0.3.36", _env())
    assert here.native
    flags = this_cpu().flags
    assert ("__AVX2__" in here.native_features) == ("avx2" in flags)
    assert ("__AMX_TILE__" in here.native_features) == ("amx_tile" in flags)
    assert set(here.cflags.split()) >= set(NO_AMX_FLAGS)  # the AMX guard is part of what is keyed
    # The same compiler on a CPU without AVX2 (and everything above it): other features, another key.
    older, _ = detect("0.3.36", _env(CC="cc -mno-avx2", CXX="c++ -mno-avx2"))
    if "avx2" in flags:
        assert "__AVX2__" not in older.native_features
        assert wheel_key(older) != wheel_key(here)


@pytest.mark.skipif(not X86, reason="x86 instruction-set flags")
def test_portable_key_does_not_depend_on_the_cpu():
    portable = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    a, _ = detect("0.3.36", _env(CMAKE_ARGS=portable))
    b, _ = detect("0.3.36", _env(CMAKE_ARGS=portable, CC="cc -mno-avx2", CXX="c++ -mno-avx2"))
    assert not a.native and a.native_features == () == b.native_features
    assert wheel_key(a) == wheel_key(b)


def test_makefile_installs_the_wheel_of_this_machines_key(tmp_path):
    res = subprocess.run(["make", "-s", "-n", "install", f"CACHE={tmp_path}", f"PYTHON={sys.executable}",
                          f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True, text=True,
                         env=_env(CMAKE_ARGS="-DGGML_NATIVE=OFF"))
    assert res.returncode == 0, res.stderr
    key = wheel_key(detect(llama_build_version(), _env(CMAKE_ARGS="-DGGML_NATIVE=OFF"))[0])
    assert f"--out {tmp_path}/wheels/{key} " in res.stdout
    assert f"--force-reinstall {tmp_path}/wheels/{key}/*.whl" in res.stdout


def llama_build_version() -> str:
    """The llama-cpp-python version the Makefile pins (it must be the one pyproject.toml asks for)."""
    make = (ROOT / "Makefile").read_text()
    pinned = next(line.split(":=")[1].strip() for line in make.splitlines() if line.startswith("LLAMA_CPP_PYTHON"))
    assert f'"llama-cpp-python=={pinned}"' in (ROOT / "pyproject.toml").read_text()
    return pinned


def test_build_refuses_a_folder_not_named_by_this_machines_key(tmp_path):
    with pytest.raises(SystemExit, match="not named by this machine's key"):
        llama_build.build("0.3.36", tmp_path / "missing.tar.gz", tmp_path / "wheels" / "someone-elses-key", jobs=1)


def test_build_reuses_a_finished_cache_entry_and_not_an_interrupted_one(tmp_path, monkeypatch):
    for var in ("CMAKE_ARGS", "CFLAGS", "CXXFLAGS", "LDFLAGS", "CC", "CXX", "SOURCE_DATE_EPOCH"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / wheel_key(detect("0.3.36")[0])
    out.mkdir()
    wheel = out / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    wheel.write_bytes(b"built earlier")
    (out / "build.json").write_text(json.dumps({"key": out.name}))
    assert llama_build.build("0.3.36", tmp_path / "absent-sdist.tar.gz", out, jobs=1) == wheel
    (out / "build.json").unlink()  # no build.json: an interrupted copy, so it is built again (and fails here)
    with pytest.raises(subprocess.CalledProcessError):
        llama_build.build("0.3.36", tmp_path / "absent-sdist.tar.gz", out, jobs=1)
    (out / "build.json").write_text(json.dumps({"key": out.name}))
    wheel.unlink()  # a record without its wheel is not a finished build either
    with pytest.raises(subprocess.CalledProcessError):
        llama_build.build("0.3.36", tmp_path / "absent-sdist.tar.gz", out, jobs=1)


def test_installed_wheel_was_built_for_this_machine():
    """`make install` copies the build record into the venv: it must be this machine's key (or a portable one)."""
    record = Path(sys.prefix) / "share/elemental/llama-cpp-build.json"
    if not record.is_file():
        pytest.skip("llama-cpp-python was not installed by `make install`")
    info = json.loads(record.read_text())
    if info["inputs"]["native"]:
        assert info["key"] == wheel_key(detect(info["inputs"]["version"])[0])


# -- reading the CPU and the llama.cpp guard ------------------------------------------------------------

def test_cpuinfo_parsing_x86_and_arm():
    x86 = parse_cpuinfo("processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu avx2 avx512f "
                        "avx512_bf16 amx_tile amx_int8\n\nprocessor\t: 1\nflags\t: fpu\n", "x86_64", 2)
    assert x86.model == "Intel(R) Xeon(R)" and x86.amx and x86.native_bf16
    assert x86.kind() == "x86_64 AVX512 AVX512-BF16 AMX, 2 cores"
    old = parse_cpuinfo("model name : AMD EPYC\nflags : fpu avx avx2 fma f16c\n", "x86_64", 2)
    assert not old.amx and not old.native_bf16 and old.kind() == "x86_64 AVX2, 2 cores"
    arm = parse_cpuinfo("processor : 0\nFeatures : fp asimd asimddp i8mm bf16\n", "aarch64", 8)
    assert arm.native_bf16 and not arm.amx and arm.kind() == "aarch64 dotprod i8mm BF16, 8 cores"


@pytest.mark.skipif(not CPUINFO.is_file(), reason="no /proc/cpuinfo")
def test_this_cpu_is_read_from_the_kernel():
    text = CPUINFO.read_text()
    cpu = this_cpu()
    assert cpu.flags and all(f in text for f in cpu.flags)
    assert cpu.amx == any(f" {f}" in text for f in ("amx_tile", "amx_int8", "amx_bf16"))


@pytest.mark.parametrize("build_amx, flags, safe", [
    (False, frozenset({"avx2", "amx_tile", "amx_int8"}), True),  # our wheel: no AMX kernels, repack stays
    (True, frozenset({"avx2", "amx_tile", "amx_int8"}), False),  # llama.cpp#20824
    (True, frozenset({"avx2", "avx512f"}), True),  # AMX kernels compiled, CPU without AMX: never used
    (True, frozenset(), False),  # CPU unknown: assume the worst
    (False, frozenset({"asimd", "asimddp", "i8mm"}), True),  # a phone: the repacked kernels are the fast path
])
def test_extra_buffer_types_only_where_safe(build_amx, flags, safe):
    assert extra_bufts_safe(build_amx, flags) is safe


def test_weight_buffer_log_lines_are_read():
    lines = ["load_tensors:   CPU_Mapped model buffer size =   436.13 MiB",
             "load_tensors:          AMX model buffer size =   299.00 MiB",
             "load_tensors:   CPU_REPACK model buffer size =    12.50 MiB"]
    assert [_BUFFER_LINE.search(ln).groups() for ln in lines] == [
        ("CPU_Mapped", "436.13"), ("AMX", "299.00"), ("CPU_REPACK", "12.50")]


def test_a_venv_copied_to_a_cpu_without_the_builds_instructions_is_refused(tmp_path):
    from elemental.classify.llama_runtime import check_build_fits_cpu
    from elemental.errors import ElementalError

    record = tmp_path / "venv/share/elemental/llama-cpp-build.json"
    record.parent.mkdir(parents=True)
    xeon = "fpu sse4_2 avx avx2 fma f16c avx512f avx512_bf16 amx_tile amx_int8 amx_bf16"
    info = {"inputs": {"native": True, "cflags": " ".join(NO_AMX_FLAGS)},
            "built_on": {"cpu": "Intel(R) Xeon(R)", "flags": xeon.split()}}
    record.write_text(json.dumps(info))
    epyc = parse_cpuinfo("flags : fpu sse4_2 avx avx2 fma f16c\n", "x86_64", 2)
    with pytest.raises(ElementalError, match=r"built with -march=native on another CPU \(Intel\(R\) Xeon\(R\)\) "
                                             r"using avx512_bf16, avx512f, which this CPU lacks"):
        check_build_fits_cpu(record, epyc)
    # AMX alone missing is fine: the guard compiled those instructions out.
    no_amx_xeon = parse_cpuinfo("flags : fpu sse4_2 avx avx2 fma f16c avx512f avx512_bf16\n", "x86_64", 2)
    check_build_fits_cpu(record, no_amx_xeon)
    check_build_fits_cpu(record, parse_cpuinfo(f"flags : {xeon} avx512_fp16\n", "x86_64", 2))  # a newer CPU
    record.write_text(json.dumps({**info, "inputs": {"native": False, "cflags": ""}}))
    check_build_fits_cpu(record, epyc)  # a portable build runs anywhere its flags allow


def test_installed_build_fits_this_cpu():
    from elemental.classify.llama_runtime import BUILD_RECORD, check_build_fits_cpu

    check_build_fits_cpu(BUILD_RECORD, this_cpu())


# -- the phone's llama.cpp (issue 19) ---------------------------------------------------------------------

def test_arm64_key_follows_the_version_and_the_cmake_files(tmp_path):
    options, toolchain = tmp_path / "options.cmake", tmp_path / "toolchain.cmake"
    options.write_text("set(GGML_BACKEND_DL ON CACHE BOOL \"\" FORCE)\n")
    toolchain.write_text("set(CMAKE_SYSTEM_PROCESSOR aarch64)\n")
    key = llama_build.arm64_key("0.3.36", options, toolchain)
    assert key.startswith("llama-arm64-0.3.36-") and key == llama_build.arm64_key("0.3.36", options, toolchain)
    assert llama_build.arm64_key("0.3.37", options, toolchain) != key
    options.write_text("set(GGML_BACKEND_DL OFF CACHE BOOL \"\" FORCE)\n")
    assert llama_build.arm64_key("0.3.36", options, toolchain) != key


def test_llama_options_of_the_app_and_of_the_arm64_build_are_one_file():
    """What `make native-arm64` tests is what the app builds: the module's CMakeLists includes the options file the
    ARM64 build is configured with, before llama.cpp, and Gradle passes no llama.cpp option of its own."""
    options = ROOT / "android/src/main/cpp/llama-options.cmake"
    assert llama_build.ARM64_OPTIONS == options and options.is_file()
    cmake = (ROOT / "android/src/main/cpp/CMakeLists.txt").read_text()
    include = cmake.index('include("${CMAKE_CURRENT_LIST_DIR}/llama-options.cmake")')
    assert include < cmake.index('add_subdirectory("${ELEMENTAL_LLAMA_CPP_SOURCE}"')
    gradle = (ROOT / "android/build.gradle.kts").read_text()
    assert not re.search(r'"-D(GGML|LLAMA|BUILD_SHARED)_?\w*=', gradle), "llama.cpp's options go in llama-options.cmake"
    for option in ("GGML_BACKEND_DL", "GGML_CPU_ALL_VARIANTS"):  # the phone's run-time variant loading
        assert re.search(rf'^set\({option} ON CACHE BOOL "" FORCE\)$', options.read_text(), re.MULTILINE), option
