// A desktop JVM caller of org.elemental.ElementClassifier, for tests/test_native.py: the Kotlin class and the
// JNI glue run here exactly as in the app (only the photo decoding differs: javax.imageio instead of Bitmap).
//
//   java -Djava.library.path=build/native -cp elemental-jvm.jar ClassifyPhotosKt MODEL_DIR PHOTO...  one JSON line per photo
//   ... ClassifyPhotosKt --errors MODEL_DIR            one line per error case
//   ... ClassifyPhotosKt --lifecycle MODEL_DIR PHOTO   close, cancellation, concurrency and the cleaner, one line each
//   ... ClassifyPhotosKt --jpeg MODEL_DIR JPEG...                   classifyJpeg: the library decodes each JPEG
//   ... ClassifyPhotosKt --peak-jpeg MODEL_DIR SMALL.jpg BIG.jpg    peak memory of BIG through classifyJpeg
//   ... ClassifyPhotosKt --app MODEL_URL MODELS_DIR PHOTO...  docs/android.md's flow: ModelStore download, classify
//   ... ClassifyPhotosKt --upright PHOTO ORIENTATION OUT       UprightRgb's bytes to OUT, "W H" printed
import kotlinx.coroutines.CancellationException
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.async
import kotlinx.coroutines.awaitAll
import kotlinx.coroutines.delay
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.supervisorScope
import org.elemental.Classification
import org.elemental.ElementClassifier
import org.elemental.ElementalException
import org.elemental.ModelStore
import org.elemental.UprightRgb
import java.io.File
import javax.imageio.ImageIO

class Photo(val rgb: ByteArray, val width: Int, val height: Int)

// The photo's pixels as the app builds them (UprightRgb, row by row), from javax.imageio's ARGB rows.
fun rgbPhoto(file: File, orientation: Int = 1): Photo {
    val image = ImageIO.read(file) ?: throw IllegalArgumentException("not an image: $file")
    val upright = UprightRgb(image.width, image.height, orientation)
    val row = IntArray(image.width)
    for (y in 0 until image.height) {
        image.getRGB(0, y, image.width, 1, row, 0, image.width)
        upright.putRow(y, row)
    }
    return Photo(upright.rgb, upright.width, upright.height)
}

fun quote(s: String): String = "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"") + "\""

fun json(path: String, c: Classification): String {
    val probabilities = c.probabilities.entries.joinToString(", ") { "${quote(it.key)}: ${it.value}" }
    return "{\"path\": ${quote(path)}, \"label\": ${quote(c.label)}, \"probabilities\": {$probabilities}, \"ms\": ${c.ms}}"
}

suspend fun ElementClassifier.classify(photo: Photo): Classification = classify(photo.rgb, photo.width, photo.height)

// A named call that must fail (Kotlin 1.3 infers no suspend lambdas in `to` pairs: this declares the type).
fun case(name: String, call: suspend () -> Any): Pair<String, suspend () -> Any> = name to call

// Each bad call must end in ElementalException with the library's message, never a crash.
fun errors(modelDir: File) = runBlocking {
    val cases = listOf(
        case("missing folder") { ElementClassifier.open(File(modelDir, "does-not-exist")).close() },
        case("unknown quant") { ElementClassifier.open(modelDir, quant = "Q2_K").close() },
        case("too many threads") { ElementClassifier.open(modelDir, threads = 100000).close() },
        case("negative threads") { ElementClassifier.open(modelDir, threads = -1).close() },
        case("bitmap too small") { ElementClassifier.open(modelDir).use { it.classify(ByteArray(10), 64, 64) } },
        case("empty bitmap") { ElementClassifier.open(modelDir).use { it.classify(ByteArray(0), 0, 0) } },
        case("closed") { val c = ElementClassifier.open(modelDir); c.close(); c.classify(ByteArray(12), 2, 2) }
    )
    for ((name, call) in cases) {
        try {
            call()
            println("$name: no error")
        } catch (e: ElementalException) {
            println("$name: ElementalException: ${e.message}")
        }
    }
}

// docs/android.md's app integration, line for line where it is not Android: the model downloaded (once) with
// ModelStore from `modelUrl` into `modelsDir`, photos classified with the coroutine API, the classifier closed.
fun appFlow(modelUrl: String, modelsDir: File, photos: List<File>) = runBlocking {
    val store = ModelStore(modelsDir)
    val modelDir = store.installed("elements") ?: store.install(modelUrl, "elements")
    val classifier = ElementClassifier.open(modelDir)
    try {
        for (file in photos) {
            val photo = rgbPhoto(file)
            val result = classifier.classify(photo.rgb, photo.width, photo.height)
            println(json(file.path, result))
        }
    } finally {
        classifier.close()
    }
}

// Each JPEG's bytes classified by the library's own decoder (ElementClassifier.classifyJpeg), as an app does.
fun classifyJpegs(modelDir: File, photos: List<File>) = runBlocking {
    ElementClassifier.open(modelDir).use { classifier ->
        for (file in photos) println(json(file.path, classifier.classifyJpeg(file.readBytes())))
    }
}

fun procStatus(key: String): Long =
    File("/proc/self/status").readLines().first { it.startsWith("$key:") }.split(Regex("\\s+"))[1].toLong() * 1024

// What one JPEG costs in memory through the app's path (file bytes read, classifyJpeg), beyond the loaded model:
// the process's peak resident memory from just before the photo, after a small photo has warmed every buffer.
fun peakJpeg(modelDir: File, small: File, big: File) = runBlocking {
    ElementClassifier.open(modelDir).use { classifier ->
        classifier.classifyJpeg(small.readBytes())
        System.gc()
        File("/proc/self/clear_refs").writeText("5")  // Linux: the peak (VmHWM) starts again from the current size
        val before = procStatus("VmHWM")
        val answer = classifier.classifyJpeg(big.readBytes())
        println("peak above the loaded model: ${procStatus("VmHWM") - before} bytes; label ${answer.label}")
    }
}

// Opens a classifier and drops it unclosed: only the cleaner can free it.
suspend fun openAndForget(modelDir: File, photo: Photo): String = ElementClassifier.open(modelDir).classify(photo).label

fun lifecycle(modelDir: File, photo: Photo) = runBlocking {
    val classifier = ElementClassifier.open(modelDir)
    println("threads: ${classifier.threads}")
    val alone = classifier.classify(photo)

    // Many callers at once, from a thread pool: computed one at a time, each the answer it gets alone.
    val together = (1..4).map { async(Dispatchers.Default) { classifier.classify(photo) } }.awaitAll()
    println("concurrent: ${together.all { it.probabilities == alone.probabilities }}")

    // A cancelled caller whose photo waits behind another is never computed; the classifier goes on.
    val first = async(Dispatchers.Default) { classifier.classify(photo) }
    val waiting = async(Dispatchers.Default) { classifier.classify(photo) }
    waiting.cancel()
    val outcome = try { waiting.await(); "computed" } catch (e: CancellationException) { "cancelled" }
    println("cancel: $outcome; others: ${first.await().label == alone.label && classifier.classify(photo).label == alone.label}")

    // close() from the main thread while a photo is in flight: returns at once, the photo in flight is
    // answered, a photo queued behind it fails as closed, and then the native memory is freed.
    var inFlight = false
    var attempts = 0
    while (!inFlight && attempts < 10) supervisorScope {  // a failed call must not cancel the others
        attempts++
        val c = ElementClassifier.open(modelDir)
        val running = async(Dispatchers.Default) { c.classify(photo) }
        val queued = async(Dispatchers.Default) { c.classify(photo) }
        delay(5)
        val t0 = System.nanoTime()
        c.close()
        val closeMs = (System.nanoTime() - t0) / 1e6
        val closedAt = System.nanoTime()
        val answer = try { running.await() } catch (e: ElementalException) { null }
        val doneAt = System.nanoTime()
        // In flight during close(): its computation (answer.ms) began before close() and ended after it.
        inFlight = answer != null && (doneAt - closedAt) / 1e6 > 0 && (doneAt - closedAt) / 1e6 < answer.ms
        val queuedOutcome = try { queued.await(); "answered" } catch (e: ElementalException) { "ElementalException: ${e.message}" }
        if (inFlight) {
            println("close in flight: returned in ${"%.3f".format(closeMs)} ms; photo took ${"%.1f".format(answer!!.ms)} ms; " +
                    "answer ${answer.label == alone.label}; queued $queuedOutcome; attempts $attempts")
        }
    }
    if (!inFlight) println("close in flight: no attempt caught a photo in flight")
    var freed = false
    for (i in 1..200) {
        if (ElementClassifier.nativeInstances == 1) { freed = true; break }
        delay(10)
    }
    println("freed after close: $freed")

    // A classifier nobody closed is freed once unreachable.
    openAndForget(modelDir, photo)
    val before = ElementClassifier.nativeInstances
    var collected = false
    for (i in 1..100) {
        System.gc()
        delay(50)
        if (ElementClassifier.nativeInstances == before - 1) { collected = true; break }
    }
    println("cleaner: open before ${before}, freed ${collected}")
    classifier.close()
}

fun main(args: Array<String>) {
    when {
        args.isNotEmpty() && args[0] == "--errors" -> errors(File(args[1]))
        args.isNotEmpty() && args[0] == "--lifecycle" -> lifecycle(File(args[1]), rgbPhoto(File(args[2])))
        args.isNotEmpty() && args[0] == "--jpeg" -> classifyJpegs(File(args[1]), args.drop(2).map { File(it) })
        args.isNotEmpty() && args[0] == "--peak-jpeg" -> peakJpeg(File(args[1]), File(args[2]), File(args[3]))
        args.isNotEmpty() && args[0] == "--app" -> appFlow(args[1], File(args[2]), args.drop(3).map { File(it) })
        args.isNotEmpty() && args[0] == "--upright" -> {
            val photo = rgbPhoto(File(args[1]), args[2].toInt())
            File(args[3]).writeBytes(photo.rgb)
            println("${photo.width} ${photo.height}")
        }
        else -> runBlocking {
            ElementClassifier.open(File(args[0])).use { classifier ->
                for (path in args.drop(1)) {
                    println(json(path, classifier.classify(rgbPhoto(File(path)))))
                }
            }
        }
    }
}
