"""What can be checked of the Android module without Gradle or an Android SDK (neither can be had here; issue 20).

- The backends are found on a real install: llama.cpp is built with GGML_BACKEND_DL, so it lists the app's
  nativeLibraryDir at open; that folder is filled only when the APK's native libraries are extracted at install.
  The module's manifest, its packaging and the Android helper that passes the folder must agree with the
  backend options, or `open` fails on every phone.
- One place for versions: build.gradle.kts takes AGP, Kotlin, NDK, CMake and library versions from
  gradle/libs.versions.toml (as llama.cpp's examples/llama.android does), names nothing the catalog lacks, and
  uses the Kotlin 2.x toolchain DSL (`kotlinOptions { jvmTarget }` is an error with Kotlin Gradle plugin 2.3).
"""

from __future__ import annotations

import re
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "android"
ANDROID_NS = "{http://schemas.android.com/apk/res/android}"


def _cmake_option(name: str) -> str | None:
    m = re.search(rf'set\({name}\s+(\w+)\s+CACHE', (MODULE / "src/main/cpp/llama-options.cmake").read_text())
    return m.group(1) if m else None


def _gradle_code() -> str:
    """build.gradle.kts without its comments."""
    return "\n".join(line.split("//", 1)[0] for line in (MODULE / "build.gradle.kts").read_text().splitlines())


def test_packaging_extracts_the_backends_llama_cpp_loads_from_a_folder():
    assert _cmake_option("GGML_BACKEND_DL") == "ON"  # the premise: backends are files loaded at run time
    application = ET.parse(MODULE / "src/main/AndroidManifest.xml").getroot().find("application")
    assert application is not None and application.get(f"{ANDROID_NS}extractNativeLibs") == "true", (
        "llama.cpp lists nativeLibraryDir for its CPU backends: the module's manifest must extract native libraries")
    gradle = _gradle_code()
    assert re.search(r"jniLibs\.useLegacyPackaging\s*=\s*true", gradle)
    assert not re.search(r"useLegacyPackaging\s*=\s*false", gradle)
    photos = (MODULE / "src/main/kotlin/org/elemental/android/Photos.kt").read_text()
    assert "applicationInfo.nativeLibraryDir" in photos
    assert "ElementClassifier.open(modelDir, threads, repack, quant, backendDir)" in photos


def test_the_module_passes_every_source_tree_the_native_build_requires():
    """native/'s CMake stops without its source trees (llama.cpp, libjpeg-turbo): the app's build must pass each one
    the desktop and ARM64 builds pass (Makefile)."""
    cmake = "\n".join(p.read_text() for p in [ROOT / "native/CMakeLists.txt", *(ROOT / "native/cmake").glob("*.cmake")])
    required = set(re.findall(r"set\((ELEMENTAL_\w+_SOURCE) ", cmake))
    assert required >= {"ELEMENTAL_LLAMA_CPP_SOURCE", "ELEMENTAL_LIBJPEG_TURBO_SOURCE"}
    gradle = _gradle_code()
    makefile = (ROOT / "Makefile").read_text()
    for name in required:
        assert f'"-D{name}=$' in gradle, f"build.gradle.kts does not pass {name}"
        assert makefile.count(f"-D{name}=") >= 2, f"the Makefile's native and native-arm64 builds must pass {name}"


def test_every_version_comes_from_the_catalog():
    catalog = tomllib.loads((MODULE / "gradle/libs.versions.toml").read_text())
    versions, plugins, libraries = catalog["versions"], catalog["plugins"], catalog["libraries"]
    assert {"agp", "kotlin", "ndk", "cmake"} <= versions.keys()
    assert int(versions["kotlin"].split(".")[0]) >= 2
    gradle = _gradle_code()
    assert not re.search(r'"\d+(\.\d+)+"', gradle), "a version literal in build.gradle.kts: put it in the catalog"
    assert not re.search(r'"[\w.-]+:[\w.-]+:[\w.-]+"', gradle), "a dependency with its version in build.gradle.kts"
    accessor = lambda key: key.replace("-", ".")  # noqa: E731 - Gradle's catalog accessor spelling
    for name in re.findall(r"alias\(libs\.plugins\.([\w.]+)\)", gradle):
        assert name in {accessor(k) for k in plugins}, f"plugin libs.plugins.{name} is not in the catalog"
    for name in re.findall(r"libs\.versions\.([\w.]+)\.get\(\)", gradle):
        assert name in {accessor(k) for k in versions}, f"libs.versions.{name} is not in the catalog"
    for name in re.findall(r"implementation\(libs\.([\w.]+)\)", gradle):
        assert name in {accessor(k) for k in libraries}, f"library libs.{name} is not in the catalog"
    # both plugins, NDK, CMake, both SDK levels and both libraries come through `libs`
    assert len(set(re.findall(r"libs\.[\w.]+", gradle))) >= 8
    assert "kotlinOptions" not in gradle and re.search(r"kotlin\s*\{\s*jvmToolchain\(17\)\s*\}", gradle)
    assert 'rootProject.name = "elemental"' in (MODULE / "settings.gradle.kts").read_text()


def test_the_guides_android_only_lines_call_what_photos_kt_declares():
    """docs/android.md's few Android-only lines (the Photo Picker) compile nowhere here: each call they make into
    elemental is held to a function Photos.kt or the Kotlin API declares, with as many parameters."""
    doc = (ROOT / "docs/android.md").read_text()
    fenced = (b.split("\n", 1) for b in doc.split("```")[1::2])
    blocks = [body for lang, body in fenced if lang.strip() == "kotlin android-only"]
    assert blocks, "docs/android.md has no Android-only block"
    sources = "\n".join(p.read_text() for p in (MODULE / "src/main/kotlin/org/elemental").rglob("*.kt"))
    declared: dict[str, set[int]] = {}
    for name, params in re.findall(r"fun (?:ElementClassifier\.)?(\w+)\(([^)]*)\)", sources):
        declared.setdefault(name, set()).add(len([p for p in params.split(",") if p.strip()]))
    calls = [(name, len([a for a in args.split(",") if a.strip()]))
             for body in blocks for name, args in re.findall(r"classifier\.(\w+)\(([^()]*)\)", body)]
    assert calls, "the Android-only block calls nothing of elemental's"
    for name, n in calls:
        assert n in declared.get(name, set()), f"docs/android.md calls classifier.{name} with {n} arguments"
