# Cross-compiling for 64-bit ARM Linux, the phone's instruction set, run here under qemu-aarch64
# (`make native-arm64`, `make native-arm64-test`). The compiler is clang, as in the Android NDK, with the
# C/C++ runtime and sysroot of Debian's g++-aarch64-linux-gnu: GCC 12 does not know the armv9.2-a+sme
# target of ggml's two SME variants, so it cannot build the backend set the app ships.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER clang)
set(CMAKE_CXX_COMPILER clang++)
set(CMAKE_C_COMPILER_TARGET aarch64-linux-gnu)
set(CMAKE_CXX_COMPILER_TARGET aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
