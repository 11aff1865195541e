# llama.cpp as elemental's phone build configures it: the one place these options live.
#
# Read by android/src/main/cpp/CMakeLists.txt (the app's NDK build, through Gradle) and by `make native-arm64`
# (`cmake -C` of this file, cross-compiling for aarch64-linux-gnu), so what the ARM64 tests run is what the app
# builds. Only llama.cpp's own options are here; nothing in it may download anything at configure time.
set(BUILD_SHARED_LIBS ON CACHE BOOL "" FORCE)
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "" FORCE)
set(LLAMA_BUILD_TOOLS OFF CACHE BOOL "" FORCE)
set(LLAMA_BUILD_EXAMPLES OFF CACHE BOOL "" FORCE)
set(LLAMA_BUILD_TESTS OFF CACHE BOOL "" FORCE)
set(LLAMA_BUILD_SERVER OFF CACHE BOOL "" FORCE)
set(LLAMA_BUILD_APP OFF CACHE BOOL "" FORCE)
set(LLAMA_BUILD_MTMD ON CACHE BOOL "" FORCE)
set(LLAMA_OPENSSL OFF CACHE BOOL "" FORCE)
set(LLAMA_CURL OFF CACHE BOOL "" FORCE)
# One CPU backend library per instruction-set level (libggml-cpu-<variant>.so), the best one for the phone's
# CPU picked at run time from one folder (the app's nativeLibraryDir): dotprod/i8mm phones get their fast
# kernels, older ones still run. Weight repacking stays on at run time (Repack.AUTO): the fast path on ARM.
set(GGML_NATIVE OFF CACHE BOOL "" FORCE)
set(GGML_BACKEND_DL ON CACHE BOOL "" FORCE)
set(GGML_CPU_ALL_VARIANTS ON CACHE BOOL "" FORCE)
set(GGML_LLAMAFILE OFF CACHE BOOL "" FORCE)  # as llama.cpp's examples/llama.android
# llama.android turns KleidiAI on for arm64-v8a, but ggml downloads its sources at configure time, which
# elemental's build machines cannot (no network): it is off here and so in the app, whose kernels are then
# exactly the ones `make native-arm64-test` runs under emulation.
set(GGML_CPU_KLEIDIAI OFF CACHE BOOL "" FORCE)
# ggml's own thread pool, not OpenMP: llama.android turns OpenMP on for arm64-v8a (the NDK's clang links its
# libomp), but the clang that cross-builds here has no OpenMP runtime for ARM64, and the tested build and the app
# must thread alike. (ggml without OpenMP is its default on Apple and Windows builds.)
set(GGML_OPENMP OFF CACHE BOOL "" FORCE)
