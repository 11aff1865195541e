// How elemental's JNI entry points report failure: as org.elemental.ElementalException, never as a crash.
//
// A C++ exception that leaves a JNI function ends in std::terminate, which kills the app. Every entry point
// runs its body in guarded(): std::bad_alloc (a phone out of memory), a library's std::exception or anything
// else thrown becomes an ElementalException with a message, and the entry point returns its `failed` value.
// Included by elemental_jni.cpp and by the desktop test that throws through it (tests/jvm/jni_guard_test.cpp).
#pragma once

#include <jni.h>

#include <exception>
#include <new>
#include <string>

namespace elemental::jni {

// Throws ElementalException(message) in Java unless a Java exception is pending already (an OutOfMemoryError
// from a failed JNI allocation says more than we could). Allocates nothing in C++, so it works out of memory.
inline void throw_elemental(JNIEnv * env, const char * message) {
    if (env->ExceptionCheck()) {
        return;
    }
    jclass cls = env->FindClass("org/elemental/ElementalException");
    if (cls != nullptr) {  // else FindClass has thrown NoClassDefFoundError
        env->ThrowNew(cls, message);
        env->DeleteLocalRef(cls);
    }
}

inline void throw_elemental(JNIEnv * env, const std::string & message) { throw_elemental(env, message.c_str()); }

// `body()`'s result; on any C++ exception an ElementalException is thrown in Java and `failed` returned.
template <typename T, typename F>
T guarded(JNIEnv * env, T failed, F && body) noexcept {
    try {
        return body();
    } catch (const std::bad_alloc &) {
        throw_elemental(env, "out of native memory");
    } catch (const std::exception & e) {
        throw_elemental(env, e.what());
    } catch (...) {
        throw_elemental(env, "unknown native error");
    }
    return failed;
}

}  // namespace elemental::jni
