// JNI glue between org.elemental.ElementClassifier (Kotlin) and the native classifier (native/).
// Compiled for Android by this module's CMakeLists, and for the desktop JVM by `make native` (the tests
// call it from Kotlin there). Every entry point runs in guarded() (jni_guard.h): errors, C++ exceptions and
// failed JNI calls all reach Kotlin as org.elemental.ElementalException, never as a crash.
#include "jni_guard.h"

#include "elemental/classifier.h"

#include <atomic>
#include <memory>
#include <string>
#include <vector>

using elemental::jni::guarded;
using elemental::jni::throw_elemental;

namespace {

// Classifiers opened and not yet closed in this process: what a leak check reads (ElementClassifier.nativeInstances).
std::atomic<int> g_instances{0};

// `s` as UTF-8 into `out`; false (with a Java exception pending) when the JVM could not hand it over.
bool to_string(JNIEnv * env, jstring s, std::string & out) {
    out.clear();
    if (s == nullptr) {
        return true;
    }
    const char * chars = env->GetStringUTFChars(s, nullptr);
    if (chars == nullptr) {  // OutOfMemoryError pending
        return false;
    }
    out = chars;
    env->ReleaseStringUTFChars(s, chars);
    return true;
}

elemental::Classifier * from_handle(JNIEnv * env, jlong handle) {
    if (handle == 0) {
        throw_elemental(env, "the classifier is closed");
        return nullptr;
    }
    return reinterpret_cast<elemental::Classifier *>(handle);
}

// The answer as Kotlin reads it: [label index, ms, p_0 .. p_{n-1}] (probabilities in label order).
jdoubleArray answer(JNIEnv * env, const elemental::Prediction & p) {
    std::vector<jdouble> values = {static_cast<jdouble>(p.label_index), p.ms};
    values.insert(values.end(), p.probabilities.begin(), p.probabilities.end());
    jdoubleArray out = env->NewDoubleArray(static_cast<jsize>(values.size()));
    if (out != nullptr) {
        env->SetDoubleArrayRegion(out, 0, static_cast<jsize>(values.size()), values.data());
    }
    return out;
}

// `classify(bytes, size)` on the array's bytes, released whatever happens; an error becomes ElementalException.
template <typename F>
jdoubleArray with_bytes(JNIEnv * env, jbyteArray array, const char * what, F && classify) {
    if (array == nullptr) {
        throw_elemental(env, std::string(what) + " is null");
        return nullptr;
    }
    const jsize size = env->GetArrayLength(array);
    jbyte * bytes = env->GetByteArrayElements(array, nullptr);
    if (bytes == nullptr) {  // OutOfMemoryError pending
        return nullptr;
    }
    elemental::Prediction p;
    elemental::Error error;
    try {
        error = classify(reinterpret_cast<const uint8_t *>(bytes), static_cast<size_t>(size), p);
    } catch (...) {
        env->ReleaseByteArrayElements(array, bytes, JNI_ABORT);
        throw;
    }
    env->ReleaseByteArrayElements(array, bytes, JNI_ABORT);  // read only: nothing to copy back
    if (error) {
        throw_elemental(env, error.message);
        return nullptr;
    }
    return answer(env, p);
}

}  // namespace

extern "C" {

// nativeOpen(folder, threads, repack 0 auto/1 on/2 off, quant, backendDir): a handle, or 0 with an exception.
JNIEXPORT jlong JNICALL Java_org_elemental_NativeLib_nativeOpen(JNIEnv * env, jclass, jstring folder, jint threads,
                                                                jint repack, jstring quant, jstring backend_dir) {
    return guarded(env, jlong{0}, [&]() -> jlong {
        elemental::Options options;
        std::string path;
        if (!to_string(env, folder, path) || !to_string(env, quant, options.quant) ||
            !to_string(env, backend_dir, options.backend_dir)) {
            return 0;
        }
        options.n_threads = threads;
        options.repack = repack == 1 ? elemental::Repack::On : repack == 2 ? elemental::Repack::Off : elemental::Repack::Auto;
        elemental::Error error;
        std::unique_ptr<elemental::Classifier> classifier = elemental::Classifier::open(path, options, error);
        if (!classifier) {
            throw_elemental(env, error.message);
            return 0;
        }
        g_instances++;
        return reinterpret_cast<jlong>(classifier.release());
    });
}

JNIEXPORT jobjectArray JNICALL Java_org_elemental_NativeLib_nativeLabels(JNIEnv * env, jclass, jlong handle) {
    return guarded(env, jobjectArray{nullptr}, [&]() -> jobjectArray {
        elemental::Classifier * classifier = from_handle(env, handle);
        if (!classifier) {
            return nullptr;
        }
        const auto & labels = classifier->labels();
        jclass string_class = env->FindClass("java/lang/String");
        if (string_class == nullptr) {
            return nullptr;
        }
        jobjectArray out = env->NewObjectArray(static_cast<jsize>(labels.size()), string_class, nullptr);
        for (size_t i = 0; out != nullptr && i < labels.size(); i++) {
            jstring label = env->NewStringUTF(labels[i].c_str());
            if (label == nullptr) {
                return nullptr;  // OutOfMemoryError pending
            }
            env->SetObjectArrayElement(out, static_cast<jsize>(i), label);
            env->DeleteLocalRef(label);
        }
        return out;
    });
}

JNIEXPORT jint JNICALL Java_org_elemental_NativeLib_nativeThreads(JNIEnv * env, jclass, jlong handle) {
    return guarded(env, jint{0}, [&]() -> jint {
        elemental::Classifier * classifier = from_handle(env, handle);
        return classifier ? classifier->n_threads() : 0;
    });
}

// nativeClassify(handle, rgb, width, height): an RGB888 photo's answer (see answer()).
JNIEXPORT jdoubleArray JNICALL Java_org_elemental_NativeLib_nativeClassify(JNIEnv * env, jclass, jlong handle,
                                                                           jbyteArray rgb, jint width, jint height) {
    return guarded(env, jdoubleArray{nullptr}, [&]() -> jdoubleArray {
        elemental::Classifier * classifier = from_handle(env, handle);
        const auto classify = [&](const uint8_t * bytes, size_t size, elemental::Prediction & p) {
            return classifier->classify(bytes, size, width, height, p);
        };
        return classifier ? with_bytes(env, rgb, "bitmap", classify) : nullptr;
    });
}

// nativeClassifyJpeg(handle, jpeg): a JPEG file's answer, decoded by the library (see answer()).
JNIEXPORT jdoubleArray JNICALL Java_org_elemental_NativeLib_nativeClassifyJpeg(JNIEnv * env, jclass, jlong handle,
                                                                               jbyteArray jpeg) {
    return guarded(env, jdoubleArray{nullptr}, [&]() -> jdoubleArray {
        elemental::Classifier * classifier = from_handle(env, handle);
        const auto classify = [&](const uint8_t * bytes, size_t size, elemental::Prediction & p) {
            return classifier->classify_jpeg(bytes, size, p);
        };
        return classifier ? with_bytes(env, jpeg, "jpeg", classify) : nullptr;
    });
}

JNIEXPORT void JNICALL Java_org_elemental_NativeLib_nativeClose(JNIEnv * env, jclass, jlong handle) {
    guarded(env, 0, [&]() {
        if (handle != 0) {
            delete reinterpret_cast<elemental::Classifier *>(handle);
            g_instances--;
        }
        return 0;
    });
}

JNIEXPORT jint JNICALL Java_org_elemental_NativeLib_nativeInstances(JNIEnv * env, jclass) {
    return guarded(env, jint{0}, [&]() -> jint { return g_instances.load(); });
}

}  // extern "C"
