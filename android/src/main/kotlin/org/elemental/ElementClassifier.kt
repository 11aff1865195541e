// The app's classifier: an `elemental export` folder in, a label with a probability for every label out.
// Plain Kotlin/JVM (no Android classes), so it is compiled and run by the desktop tests too; the
// Android conveniences (Bitmap, EXIF-aware loading) are in android/Photos.kt.
package org.elemental

import java.io.Closeable
import java.io.File

/** An error from the native library: its message names the file, field or step that failed. */
class ElementalException(message: String) : RuntimeException(message)

/** llama.cpp weight repacking: AUTO keeps it on except where it crashes (AMX CPUs with an AMX build). */
enum class Repack { AUTO, ON, OFF }

/** One answer: the label, a probability for every label (in the export's label order), and the time taken. */
data class Classification(val label: String, val probabilities: Map<String, Double>, val ms: Double) {
    fun topK(k: Int): List<Pair<String, Double>> =
        probabilities.entries.sortedByDescending { it.value }.take(k).map { it.key to it.value }
}

/**
 * Opens the folder holding `manifest.json`, the text GGUF and the mmproj GGUF (checked against the
 * manifest's sizes and sha256), and classifies RGB photos exactly as `elemental classify` does.
 * Not thread-safe inside llama.cpp, so calls are serialised; close() frees the model.
 */
class ElementClassifier private constructor(private var handle: Long, val labels: List<String>) : Closeable {

    companion object {
        init {
            System.loadLibrary("elemental_jni")
        }

        /**
         * @param threads 0: one per CPU core
         * @param backendDir where llama.cpp's dynamically loaded CPU backends are (Android: the app's
         *   `applicationInfo.nativeLibraryDir`); empty when they are linked in
         */
        @JvmStatic
        @JvmOverloads
        fun open(modelDir: File, threads: Int = 0, repack: Repack = Repack.AUTO, quant: String = "Q8_0",
                 backendDir: String = ""): ElementClassifier {
            val handle = NativeLib.nativeOpen(modelDir.path, threads, repack.ordinal, quant, backendDir)
            return ElementClassifier(handle, NativeLib.nativeLabels(handle).toList())
        }
    }

    /** Classifies an RGB888 photo (`rgb.size >= width * height * 3`, rows top to bottom, upright). */
    @Synchronized
    fun classify(rgb: ByteArray, width: Int, height: Int): Classification {
        if (handle == 0L) throw ElementalException("the classifier is closed")
        val r = NativeLib.nativeClassify(handle, rgb, width, height)
        val probabilities = LinkedHashMap<String, Double>()
        labels.forEachIndexed { i, label -> probabilities[label] = r[2 + i] }
        return Classification(labels[r[0].toInt()], probabilities, r[1])
    }

    @Synchronized
    override fun close() {
        if (handle != 0L) {
            NativeLib.nativeClose(handle)
            handle = 0L
        }
    }
}
