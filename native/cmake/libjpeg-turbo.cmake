# libjpeg-turbo for native/'s JPEG decoder (src/photo_decode.cpp): built from ELEMENTAL_LIBJPEG_TURBO_SOURCE as a
# separate CMake project (its CMake files use CMAKE_SOURCE_DIR, so it cannot be an add_subdirectory), static, with
# position-independent code for the JNI library, for the target this build compiles for. Defines the imported
# target `elemental_libjpeg` (libjpeg.a and its headers).
#
# The desktop, `make native-arm64` and the Android module all build the one tree `make` unpacks (simplejpeg's
# sdist vendors libjpeg-turbo 3.1.2; Pillow 13's wheels bundle 3.2.0), with the settings that decide the pixels:
# libjpeg's decoding arithmetic is the same in both, and tests/test_native_decode.py checks it pixel for pixel.
#
# SIMD: on for ARM (NEON, written as C intrinsics: the phone's speed), off elsewhere. On x86 libjpeg-turbo's SIMD
# is NASM assembly, one more tool to install for a desktop build that only tests; for valid JPEG data its accurate
# IDCT, upsampling and colour conversion are bit-exact with the C code (the tests compare the C build and the NEON
# build with Pillow's AVX2 build). Corrupt data whose dequantized coefficients overflow 16 bits decodes differently
# in C (32-bit arithmetic) and in each SIMD flavour (16-bit), NEON and AVX2 among them: no build choice here makes
# the phone match the desktop on such files. REQUIRE_SIMD: an ARM build without NEON fails rather than running slower.
include(ExternalProject)

set(ELEMENTAL_LIBJPEG_TURBO_SOURCE "" CACHE PATH "libjpeg-turbo source tree (make unpacks simplejpeg 1.9.0's copy)")
if (NOT EXISTS "${ELEMENTAL_LIBJPEG_TURBO_SOURCE}/src/jpeglib.h")
    message(FATAL_ERROR "ELEMENTAL_LIBJPEG_TURBO_SOURCE must be a libjpeg-turbo 3.x source tree "
        "(got '${ELEMENTAL_LIBJPEG_TURBO_SOURCE}'; `make native` unpacks one)")
endif()

if (CMAKE_SYSTEM_PROCESSOR MATCHES "^(aarch64|arm64|ARM64|arm)")
    set(_jpeg_simd ON)
else()
    set(_jpeg_simd OFF)
endif()

set(_jpeg_prefix "${CMAKE_CURRENT_BINARY_DIR}/libjpeg-turbo")
set(_jpeg_lib "${_jpeg_prefix}/lib/${CMAKE_STATIC_LIBRARY_PREFIX}jpeg${CMAKE_STATIC_LIBRARY_SUFFIX}")
set(_jpeg_args
    -DCMAKE_BUILD_TYPE=Release
    -DCMAKE_INSTALL_PREFIX=${_jpeg_prefix}
    -DCMAKE_INSTALL_LIBDIR=lib
    -DCMAKE_POSITION_INDEPENDENT_CODE=ON
    -DENABLE_SHARED=OFF
    -DENABLE_STATIC=ON
    -DWITH_TURBOJPEG=OFF
    -DWITH_TOOLS=OFF
    -DWITH_TESTS=OFF
    -DWITH_SIMD=${_jpeg_simd}
    -DREQUIRE_SIMD=${_jpeg_simd})
# The compiler and target this build has: a toolchain file (the ARM64 cross build, the Android NDK) and what the
# NDK's toolchain reads, else the compiler CMake picked here.
foreach (var CMAKE_TOOLCHAIN_FILE CMAKE_C_COMPILER CMAKE_C_COMPILER_TARGET CMAKE_MAKE_PROGRAM
        ANDROID_ABI ANDROID_PLATFORM ANDROID_NDK)
    if (DEFINED ${var} AND NOT "${${var}}" STREQUAL "")
        list(APPEND _jpeg_args "-D${var}=${${var}}")
    endif()
endforeach()

ExternalProject_Add(elemental_libjpeg_build
    SOURCE_DIR "${ELEMENTAL_LIBJPEG_TURBO_SOURCE}"
    BINARY_DIR "${_jpeg_prefix}-build"
    INSTALL_DIR "${_jpeg_prefix}"
    CMAKE_ARGS ${_jpeg_args}
    BUILD_BYPRODUCTS "${_jpeg_lib}"
    UPDATE_COMMAND ""
    TEST_COMMAND ""
    LOG_CONFIGURE ON LOG_BUILD ON LOG_INSTALL ON LOG_OUTPUT_ON_FAILURE ON)  # its output only when it fails

file(MAKE_DIRECTORY "${_jpeg_prefix}/include")  # an imported target's include directory must exist at configure
add_library(elemental_libjpeg STATIC IMPORTED GLOBAL)
set_target_properties(elemental_libjpeg PROPERTIES
    IMPORTED_LOCATION "${_jpeg_lib}"
    INTERFACE_INCLUDE_DIRECTORIES "${_jpeg_prefix}/include")
add_dependencies(elemental_libjpeg elemental_libjpeg_build)
