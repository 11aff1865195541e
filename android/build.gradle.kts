// elemental's Android library module: drop this folder into an app (settings.gradle.kts:
// include(":elemental"); project(":elemental").projectDir = file("path/to/elemental/android")) and depend
// on it (implementation(project(":elemental"))). It builds llama.cpp from source with the NDK, as llama.cpp's
// own examples/llama.android does, plus elemental's native classifier (../native) and its JNI glue.
//
// Not built on elemental's CI (no Android SDK/NDK there): the Kotlin API, the JNI glue and native/ are
// compiled and run on the desktop JVM by `make native-test`; this file is kept minimal and conventional.
plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
}

// The llama.cpp source tree to build: the same version that exported the model, e.g. the vendor/llama.cpp
// folder of the llama-cpp-python sdist `make install` downloaded (README: "Android"). gradle.properties:
//   elemental.llamaCppDir=/path/to/llama_cpp_python-0.3.36/vendor/llama.cpp
val llamaCppDir: String = providers.gradleProperty("elemental.llamaCppDir").orNull
    ?: error("set elemental.llamaCppDir in gradle.properties to a llama.cpp source tree (see android/README.md)")

android {
    namespace = "org.elemental"
    compileSdk = 35
    ndkVersion = "27.2.12479018"

    defaultConfig {
        minSdk = 26
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
                )
            }
        }
    }
    externalNativeBuild {
        cmake {
            path("src/main/cpp/CMakeLists.txt")
            version = "3.22.1"
        }
    }
    sourceSets["main"].java.srcDirs("src/main/kotlin")
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
    packaging {
        jniLibs.useLegacyPackaging = false  // GGUF files are not in the APK; the .so files stay page-aligned
    }
}

dependencies {
    implementation("androidx.exifinterface:exifinterface:1.3.7")
}
