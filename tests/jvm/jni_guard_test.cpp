// Throws C++ exceptions through elemental's JNI guard (android/src/main/cpp/jni_guard.h) inside a real JVM and
// prints what Java receives, one line per case: "<case>: <exception class>: <message>" (tests/test_native.py).
// A C++ exception that escaped a JNI function would end in std::terminate, which on a phone kills the app.
//
//   jni_guard_test CLASSPATH   (the jar holding org.elemental.ElementalException)
#include "jni_guard.h"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

using elemental::jni::guarded;

namespace {

// The pending Java exception as "<class>: <message>", cleared; "none" when nothing is pending.
std::string take_exception(JNIEnv * env) {
    jthrowable e = env->ExceptionOccurred();
    if (e == nullptr) {
        return "none";
    }
    env->ExceptionClear();
    jclass cls = env->GetObjectClass(e);
    jclass class_class = env->FindClass("java/lang/Class");
    auto name = static_cast<jstring>(
        env->CallObjectMethod(cls, env->GetMethodID(class_class, "getName", "()Ljava/lang/String;")));
    auto message = static_cast<jstring>(env->CallObjectMethod(
        e, env->GetMethodID(env->FindClass("java/lang/Throwable"), "getMessage", "()Ljava/lang/String;")));
    auto text = [env](jstring s) {
        if (s == nullptr) {
            return std::string("null");
        }
        const char * chars = env->GetStringUTFChars(s, nullptr);
        std::string out(chars);
        env->ReleaseStringUTFChars(s, chars);
        return out;
    };
    return text(name) + ": " + text(message);
}

}  // namespace

int main(int argc, char ** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: jni_guard_test CLASSPATH\n");
        return 2;
    }
    std::string classpath = std::string("-Djava.class.path=") + argv[1];
    JavaVMOption option{};
    option.optionString = classpath.data();
    JavaVMInitArgs args{};
    args.version = JNI_VERSION_1_8;
    args.nOptions = 1;
    args.options = &option;
    JavaVM * vm = nullptr;
    JNIEnv * env = nullptr;
    if (JNI_CreateJavaVM(&vm, reinterpret_cast<void **>(&env), &args) != JNI_OK) {
        std::fprintf(stderr, "could not start a JVM\n");
        return 2;
    }
    const int answer = guarded(env, -1, [] { return 42; });
    std::printf("no exception: returned %d; %s\n", answer, take_exception(env).c_str());
    // 4 EiB: no machine grants it, so operator new throws std::bad_alloc as it does when a phone runs out.
    const int bad_alloc = guarded(env, -1, []() -> int { return std::vector<char>(size_t{1} << 62).empty() ? 0 : 1; });
    std::printf("bad_alloc: returned %d; %s\n", bad_alloc, take_exception(env).c_str());
    const int json_error = guarded(env, -1, [] { return nlohmann::json::parse("{oops").get<int>(); });
    std::printf("json: returned %d; %s\n", json_error, take_exception(env).c_str());
    const int runtime = guarded(env, -1, []() -> int { throw std::runtime_error("out of range: 7"); });
    std::printf("runtime_error: returned %d; %s\n", runtime, take_exception(env).c_str());
    const int other = guarded(env, -1, []() -> int { throw 7; });
    std::printf("not an exception: returned %d; %s\n", other, take_exception(env).c_str());
    vm->DestroyJavaVM();
    return 0;
}
