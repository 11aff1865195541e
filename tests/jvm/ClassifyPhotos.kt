// A desktop JVM caller of org.elemental.ElementClassifier, for tests/test_native.py: the Kotlin class and the
// JNI glue run here exactly as in the app (only the photo decoding differs: javax.imageio instead of Bitmap).
//
//   java -Djava.library.path=build/native -cp classes.jar ClassifyPhotosKt MODEL_DIR PHOTO...   one JSON line per photo
//   ... ClassifyPhotosKt --errors MODEL_DIR                                                          one line per error case
import org.elemental.Classification
import org.elemental.ElementClassifier
import org.elemental.ElementalException
import java.io.File
import javax.imageio.ImageIO

fun rgbBytes(file: File): Triple<ByteArray, Int, Int> {
    val image = ImageIO.read(file) ?: throw IllegalArgumentException("not an image: $file")
    val rgb = ByteArray(image.width * image.height * 3)
    var i = 0
    for (y in 0 until image.height) {
        for (x in 0 until image.width) {
            val p = image.getRGB(x, y)
            rgb[i++] = (p shr 16 and 0xFF).toByte()
            rgb[i++] = (p shr 8 and 0xFF).toByte()
            rgb[i++] = (p and 0xFF).toByte()
        }
    }
    return Triple(rgb, image.width, image.height)
}

fun quote(s: String): String = "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"") + "\""

fun json(path: String, c: Classification): String {
    val probabilities = c.probabilities.entries.joinToString(", ") { "${quote(it.key)}: ${it.value}" }
    return "{\"path\": ${quote(path)}, \"label\": ${quote(c.label)}, \"probabilities\": {$probabilities}, \"ms\": ${c.ms}}"
}

// Each bad call must end in ElementalException with the library's message, never a crash.
fun errors(modelDir: File) {
    val cases = listOf<Pair<String, () -> Any>>(
        "missing folder" to { ElementClassifier.open(File(modelDir, "does-not-exist")).close() },
        "unknown quant" to { ElementClassifier.open(modelDir, quant = "Q2_K").close() },
        "bitmap too small" to { ElementClassifier.open(modelDir).use { it.classify(ByteArray(10), 64, 64) } },
        "empty bitmap" to { ElementClassifier.open(modelDir).use { it.classify(ByteArray(0), 0, 0) } },
        "closed" to { val c = ElementClassifier.open(modelDir); c.close(); c.classify(ByteArray(12), 2, 2) }
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

fun main(args: Array<String>) {
    if (args.isNotEmpty() && args[0] == "--errors") {
        errors(File(args[1]))
        return
    }
    ElementClassifier.open(File(args[0])).use { classifier ->
        for (path in args.drop(1)) {
            val (rgb, width, height) = rgbBytes(File(path))
            println(json(path, classifier.classify(rgb, width, height)))
        }
    }
}
