// The app's classifier: an `elemental export` folder in, a label with a probability for every label out.
// Plain Kotlin/JVM (no Android classes), so it is compiled and run by the desktop tests too; the
// Android conveniences (Bitmap, Uri, the app's native library folder) are in android/Photos.kt.
package org.elemental

import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.asCoroutineDispatcher
import kotlinx.coroutines.withContext
import java.io.Closeable
import java.io.File
import java.util.concurrent.LinkedBlockingQueue
import java.util.concurrent.ThreadPoolExecutor
import java.util.concurrent.TimeUnit
import java.util.concurrent.atomic.AtomicLong

/** An error from elemental: its message names the file, field or step that failed. */
class ElementalException(message: String) : RuntimeException(message)

/** llama.cpp weight repacking: AUTO keeps it on except where it crashes (AMX CPUs with an AMX build). */
enum class Repack { AUTO, ON, OFF }

/** One answer: the label, a probability for every label (in the export's label order), and the time taken. */
data class Classification(val label: String, val probabilities: Map<String, Double>, val ms: Double) {
    fun topK(k: Int): List<Pair<String, Double>> =
        probabilities.entries.sortedByDescending { it.value }.take(k).map { it.key to it.value }
}

/**
 * An export folder (`manifest.json`, the text GGUF, the mmproj GGUF) loaded by the native library, classifying
 * RGB photos exactly as `elemental classify` does.
 *
 * Calls never block the caller: each classifier computes on its own thread, one photo at a time (llama.cpp's
 * context is not thread-safe), and `classify` suspends until its photo's turn is done. A coroutine cancelled
 * while its photo waits is never computed; a photo being computed finishes (seconds at most). `close()`
 * returns at once and frees the model after the photo in flight; a classifier nobody closed is freed when the
 * garbage collector finds it unreachable (a safety net: close it, the model is hundreds of MB).
 */
class ElementClassifier private constructor(handle: Long) : Closeable {

    companion object {
        init {
            System.loadLibrary("elemental_jni")
        }

        /**
         * Loads an export folder (seconds: file checks, the model, the instruction's cache), on Dispatchers.IO.
         *
         * @param threads 0: the CPU's big cores (ggml waits for its slowest thread, so little cores would slow
         *   every photo down); else 1..512
         * @param quant which text GGUF of the export ("Q8_0", "Q4_0", ...); empty: the first one the manifest
         *   lists, as `elemental classify` does without --quant
         * @param backendDir where llama.cpp's dynamically loaded CPU backends are (Android: the app's
         *   `applicationInfo.nativeLibraryDir`); empty when they are linked in or beside the executable
         */
        suspend fun open(modelDir: File, threads: Int = 0, repack: Repack = Repack.AUTO, quant: String = "",
                         backendDir: String = ""): ElementClassifier = withContext(Dispatchers.IO) {
            val handle = NativeLib.nativeOpen(modelDir.path, threads, repack.ordinal, quant, backendDir)
            if (handle == 0L) throw ElementalException("$modelDir: the native library returned no classifier")
            ElementClassifier(handle)
        }

        /** Classifiers open in this process whose native memory is not yet freed (closed or collected): a leak check. */
        val nativeInstances: Int get() = NativeLib.nativeInstances()
    }

    /** The native classifier's handle, freed once: by close() on the worker, or by the cleaner. */
    private class Handle(handle: Long) {
        private val value = AtomicLong(handle)
        fun get(): Long = value.get()
        fun free() {
            val h = value.getAndSet(0L)
            if (h != 0L) NativeLib.nativeClose(h)
        }
    }

    private val native = Handle(handle)
    // Freeing must not reference `this`, or the classifier could never become unreachable.
    private val cleanable = NativeCleaner.register(this, native::free)
    @Volatile private var closed = false

    /** The labels, in the export's order (the order of Classification.probabilities). */
    val labels: List<String> = run {
        val names = NativeLib.nativeLabels(handle) ?: throw ElementalException("the native library returned no labels")
        names.map { it ?: throw ElementalException("the native library returned a null label") }
    }

    /** The threads each photo is computed with. */
    val threads: Int = NativeLib.nativeThreads(handle)

    // One worker thread, started when there is work and ended after 30 s idle, so a closed (or forgotten)
    // classifier holds no thread; core size 0 with one thread at most keeps the calls in order.
    private val worker = ThreadPoolExecutor(0, 1, 30, TimeUnit.SECONDS, LinkedBlockingQueue<Runnable>()) { task ->
        Thread(task, "elemental-classifier").apply { isDaemon = true }
    }
    private val dispatcher = worker.asCoroutineDispatcher()

    /** Classifies an RGB888 photo (`rgb.size >= width * height * 3`, rows top to bottom, upright). */
    suspend fun classify(rgb: ByteArray, width: Int, height: Int): Classification =
        onWorker { NativeLib.nativeClassify(it, rgb, width, height) }

    /**
     * Classifies a JPEG file's bytes, decoded by the native library exactly as `elemental classify` decodes them
     * (libjpeg-turbo with Pillow's settings, at the reduced scale the manifest's photo_max_side allows, upright by
     * EXIF): the same pixels as training and evaluation saw, and a 50-MP photo costs about 32 MiB (measured on the
     * desktop JVM), not a full-size bitmap. Use it for every JPEG.
     */
    suspend fun classifyJpeg(jpeg: ByteArray): Classification = onWorker { NativeLib.nativeClassifyJpeg(it, jpeg) }

    // One native call on the classifier's thread, its answer ([label index, ms, p...]) read back.
    private suspend fun onWorker(call: (handle: Long) -> DoubleArray?): Classification {
        if (closed) throw ElementalException("the classifier is closed")
        return withContext(dispatcher) {
            if (closed) throw ElementalException("the classifier is closed")
            val r = call(native.get()) ?: throw ElementalException("the native library returned no result")
            val probabilities = LinkedHashMap<String, Double>()
            labels.forEachIndexed { i, label -> probabilities[label] = r[2 + i] }
            Classification(labels[r[0].toInt()], probabilities, r[1])
        }
    }

    /** Returns at once; the model is freed on the worker after the photo in flight. Later calls fail. */
    override fun close() {
        if (closed) return
        closed = true
        worker.execute { cleanable.clean() }
    }
}
