// The JNI functions of libelemental_jni (android/src/main/cpp/elemental_jni.cpp), as static methods of
// org.elemental.NativeLib. Only ElementClassifier calls them.
package org.elemental

internal object NativeLib {
    @JvmStatic external fun nativeOpen(folder: String, threads: Int, repack: Int, quant: String, backendDir: String): Long
    @JvmStatic external fun nativeLabels(handle: Long): Array<String>
    @JvmStatic external fun nativeClassify(handle: Long, rgb: ByteArray, width: Int, height: Int): DoubleArray
    @JvmStatic external fun nativeClose(handle: Long)
}
