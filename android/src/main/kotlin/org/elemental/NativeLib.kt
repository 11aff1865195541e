// The JNI functions of libelemental_jni (android/src/main/cpp/elemental_jni.cpp), as static methods of
// org.elemental.NativeLib. Only ElementClassifier calls them. Results that are objects are nullable: a JNI
// function that failed returns null with an exception pending, and Kotlin does not check what native code
// returns, so every caller checks.
package org.elemental

internal object NativeLib {
    @JvmStatic external fun nativeOpen(folder: String, threads: Int, repack: Int, quant: String, backendDir: String): Long
    @JvmStatic external fun nativeLabels(handle: Long): Array<String?>?
    @JvmStatic external fun nativeThreads(handle: Long): Int
    @JvmStatic external fun nativeClassify(handle: Long, rgb: ByteArray, width: Int, height: Int): DoubleArray?
    @JvmStatic external fun nativeClassifyJpeg(handle: Long, jpeg: ByteArray): DoubleArray?
    @JvmStatic external fun nativeClose(handle: Long)
    @JvmStatic external fun nativeInstances(): Int
}
