// JNI glue between org.elemental.ElementClassifier (Kotlin) and the native classifier (native/).
// Compiled for Android by this module's CMakeLists, and for the desktop JVM by `make native` (the tests
// call it from Kotlin there). Errors become org.elemental.ElementalException with the library's message.
#include <jni.h>

#include "elemental/classifier.h"

#include <memory>
#include <string>

namespace {

void throw_elemental(JNIEnv * env, const std::string & message) {
    jclass cls = env->FindClass("org/elemental/ElementalException");
    if (cls == nullptr) {  // FindClass already threw NoClassDefFoundError
        return;
    }
    env->ThrowNew(cls, message.c_str());
}

std::string to_string(JNIEnv * env, jstring s) {
    if (s == nullptr) {
        return {};
    }
    const char * chars = env->GetStringUTFChars(s, nullptr);
    std::string out(chars ? chars : "");
    env->ReleaseStringUTFChars(s, chars);
    return out;
}

elemental::Classifier * from_handle(JNIEnv * env, jlong handle) {
    if (handle == 0) {
        throw_elemental(env, "the classifier is closed");
        return nullptr;
    }
    return reinterpret_cast<elemental::Classifier *>(handle);
}

}  // namespace

extern "C" {

// nativeOpen(folder, threads, repack 0 auto/1 on/2 off, quant, backendDir): a handle, or 0 with an exception.
JNIEXPORT jlong JNICALL Java_org_elemental_NativeLib_nativeOpen(JNIEnv * env, jclass, jstring folder, jint threads,
                                                                jint repack, jstring quant, jstring backend_dir) {
    elemental::Options options;
    options.n_threads = threads;
    options.repack = repack == 1 ? elemental::Repack::On : repack == 2 ? elemental::Repack::Off : elemental::Repack::Auto;
    options.quant = to_string(env, quant);
    options.backend_dir = to_string(env, backend_dir);
    elemental::Error error;
    std::unique_ptr<elemental::Classifier> classifier = elemental::Classifier::open(to_string(env, folder), options, error);
    if (!classifier) {
        throw_elemental(env, error.message);
        return 0;
    }
    return reinterpret_cast<jlong>(classifier.release());
}

JNIEXPORT jobjectArray JNICALL Java_org_elemental_NativeLib_nativeLabels(JNIEnv * env, jclass, jlong handle) {
    elemental::Classifier * classifier = from_handle(env, handle);
    if (!classifier) {
        return nullptr;
    }
    const auto & labels = classifier->labels();
    jobjectArray out = env->NewObjectArray(static_cast<jsize>(labels.size()), env->FindClass("java/lang/String"), nullptr);
    for (size_t i = 0; out && i < labels.size(); i++) {
        jstring label = env->NewStringUTF(labels[i].c_str());
        env->SetObjectArrayElement(out, static_cast<jsize>(i), label);
        env->DeleteLocalRef(label);
    }
    return out;
}

// nativeClassify(handle, rgb, width, height): [label index, ms, p_0 .. p_{n-1}] (probabilities in label order).
JNIEXPORT jdoubleArray JNICALL Java_org_elemental_NativeLib_nativeClassify(JNIEnv * env, jclass, jlong handle,
                                                                           jbyteArray rgb, jint width, jint height) {
    elemental::Classifier * classifier = from_handle(env, handle);
    if (!classifier) {
        return nullptr;
    }
    if (rgb == nullptr) {
        throw_elemental(env, "bitmap is null");
        return nullptr;
    }
    const jsize size = env->GetArrayLength(rgb);
    jbyte * bytes = env->GetByteArrayElements(rgb, nullptr);
    elemental::Prediction p;
    const elemental::Error error = classifier->classify(reinterpret_cast<const uint8_t *>(bytes), static_cast<size_t>(size),
                                                        width, height, p);
    env->ReleaseByteArrayElements(rgb, bytes, JNI_ABORT);  // read only: nothing to copy back
    if (error) {
        throw_elemental(env, error.message);
        return nullptr;
    }
    std::vector<jdouble> values = {static_cast<jdouble>(p.label_index), p.ms};
    values.insert(values.end(), p.probabilities.begin(), p.probabilities.end());
    jdoubleArray out = env->NewDoubleArray(static_cast<jsize>(values.size()));
    if (out) {
        env->SetDoubleArrayRegion(out, 0, static_cast<jsize>(values.size()), values.data());
    }
    return out;
}

JNIEXPORT void JNICALL Java_org_elemental_NativeLib_nativeClose(JNIEnv *, jclass, jlong handle) {
    delete reinterpret_cast<elemental::Classifier *>(handle);
}

}  // extern "C"
