// elemental's Android library module: an app includes this folder as a build of its own (settings.gradle.kts:
// includeBuild("path/to/elemental/android")) and depends on it (implementation("org.elemental:elemental")).
// It builds llama.cpp from source with the NDK, as llama.cpp's own examples/llama.android does, plus elemental's
// native classifier (../native) and its JNI glue. Every version is in gradle/libs.versions.toml.
//
// Not built on elemental's CI (no Android SDK/NDK/Gradle there): the Kotlin API, the JNI glue and native/ are
// compiled and run on the desktop JVM by `make native-test`; this file is kept minimal and conventional, and
// tests/test_android_module.py checks what can be checked without Gradle (versions, packaging vs backends).
plugins {
    alias(libs.plugins.android.library)
    alias(libs.plugins.kotlin.android)
}

group = "org.elemental"

// The llama.cpp source tree to build: the same version that exported the model, e.g. the vendor/llama.cpp
// folder of the llama-cpp-python sdist `make install` downloaded (docs/android.md). In this folder's
// gradle.properties or ~/.gradle/gradle.properties:
//   elemental.llamaCppDir=/path/to/llama_cpp_python-0.3.36/vendor/llama.cpp
val llamaCppDir: String = providers.gradleProperty("elemental.llamaCppDir").orNull
    ?: error("set elemental.llamaCppDir in gradle.properties to a llama.cpp source tree (see docs/android.md)")
// The libjpeg-turbo source tree the library decodes JPEGs with, as the desktop does (`make native` unpacks it into
// .venv/share/elemental/libjpeg-turbo-src):
//   elemental.libjpegTurboDir=/path/to/elemental/.venv/share/elemental/libjpeg-turbo-src
val libjpegTurboDir: String = providers.gradleProperty("elemental.libjpegTurboDir").orNull
    ?: error("set elemental.libjpegTurboDir in gradle.properties to a libjpeg-turbo source tree (see docs/android.md)")

android {
    namespace = "org.elemental"
    compileSdk = libs.versions.compileSdk.get().toInt()
    ndkVersion = libs.versions.ndk.get()

    defaultConfig {
        minSdk = libs.versions.minSdk.get().toInt()
        consumerProguardFiles("consumer-rules.pro")
        ndk {
            abiFilters += listOf("arm64-v8a", "x86_64")
        }
        externalNativeBuild {
            cmake {
                // llama.cpp's own options are in src/main/cpp/llama-options.cmake, shared with `make native-arm64`.
                arguments += listOf(
                    "-DCMAKE_BUILD_TYPE=Release",
                    "-DELEMENTAL_LLAMA_CPP_SOURCE=$llamaCppDir",
                    "-DELEMENTAL_LIBJPEG_TURBO_SOURCE=$libjpegTurboDir",
                )
            }
        }
    }
    externalNativeBuild {
        cmake {
            path("src/main/cpp/CMakeLists.txt")
            version = libs.versions.cmake.get()
        }
    }
    sourceSets["main"].java.srcDirs("src/main/kotlin")
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    packaging {
        // Extracted at install, so llama.cpp finds its CPU backends in nativeLibraryDir (src/main/AndroidManifest.xml).
        jniLibs.useLegacyPackaging = true
    }
}

kotlin {
    jvmToolchain(17)
}

dependencies {
    implementation(libs.kotlinx.coroutines.android)
    implementation(libs.androidx.exifinterface)
}
