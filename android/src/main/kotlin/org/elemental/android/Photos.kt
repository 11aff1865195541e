// Android conveniences on top of ElementClassifier: the classifier opened with the app's native library folder
// (llama.cpp's CPU backends live there), and photos from a Bitmap, a Photo Picker Uri, a file or a stream.
// Needs the Android SDK: compiled by Gradle in the app, not by elemental's desktop tests. The work is done by
// tested code (ElementClassifier.classifyJpeg and the library's JPEG decoder, isJpeg, UprightRgb); this file only
// reads bytes and asks Android's decoder for the pixels of what is not a JPEG.
package org.elemental.android

import android.content.Context
import android.graphics.Bitmap
import android.graphics.BitmapFactory
import android.net.Uri
import androidx.exifinterface.media.ExifInterface
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.withContext
import org.elemental.Classification
import org.elemental.ElementClassifier
import org.elemental.ElementalException
import org.elemental.Repack
import org.elemental.UprightRgb
import org.elemental.isJpeg
import java.io.ByteArrayInputStream
import java.io.File
import java.io.InputStream

/** Opens an export folder (manifest.json + the GGUF files it lists, e.g. from ModelStore) in app storage. */
suspend fun openClassifier(context: Context, modelDir: File, threads: Int = 0, repack: Repack = Repack.AUTO,
                           quant: String = ""): ElementClassifier {
    val backendDir = context.applicationInfo.nativeLibraryDir
    val backends = File(backendDir).list()?.filter { it.startsWith("libggml-cpu") } ?: emptyList()
    if (backends.isEmpty()) {
        throw ElementalException("$backendDir holds no libggml-cpu-*.so: the app's native libraries were not " +
            "extracted at install (keep android:extractNativeLibs=\"true\" from elemental's module manifest)")
    }
    return ElementClassifier.open(modelDir, threads, repack, quant, backendDir)
}

/** Classifies an upright Bitmap of any config (HARDWARE ones, the default of Coil, Glide and ImageDecoder, included). */
suspend fun ElementClassifier.classify(bitmap: Bitmap): Classification {
    val photo = withContext(Dispatchers.Default) { uprightRgb(bitmap, ExifInterface.ORIENTATION_NORMAL) }
    return classify(photo.rgb, photo.width, photo.height)
}

/** Classifies a photo from the Photo Picker (or any content Uri), as classifyStream does. */
suspend fun ElementClassifier.classify(context: Context, uri: Uri): Classification =
    classifyStream { context.contentResolver.openInputStream(uri) ?: throw ElementalException("$uri: cannot be opened") }

/** Classifies a photo file, as classifyStream does. */
suspend fun ElementClassifier.classify(file: File): Classification = classifyStream { file.inputStream() }

/**
 * Classifies the photo `open` streams. A JPEG (what cameras write) goes to the library's own decoder
 * (ElementClassifier.classifyJpeg): the pixels `elemental classify` sees, decoded at reduced scale (a 50-MP photo
 * costs about 32 MB, measured on the desktop JVM). Other formats are decoded whole by Android, as the desktop decodes
 * them whole, and turned upright by their EXIF orientation.
 */
suspend fun ElementClassifier.classifyStream(open: () -> InputStream): Classification {
    val bytes = withContext(Dispatchers.IO) { open().use { it.readBytes() } }
    if (isJpeg(bytes)) return classifyJpeg(bytes)
    val photo = withContext(Dispatchers.Default) {
        val orientation = ExifInterface(ByteArrayInputStream(bytes))
            .getAttributeInt(ExifInterface.TAG_ORIENTATION, ExifInterface.ORIENTATION_NORMAL)
        val options = BitmapFactory.Options().apply { inPreferredConfig = Bitmap.Config.ARGB_8888 }
        val bitmap = BitmapFactory.decodeByteArray(bytes, 0, bytes.size, options)
            ?: throw ElementalException("not a readable image (${bytes.size} bytes)")
        try { uprightRgb(bitmap, orientation) } finally { bitmap.recycle() }
    }
    return classify(photo.rgb, photo.width, photo.height)
}

// The bitmap's pixels upright as RGB888, read a row at a time (a HARDWARE bitmap is copied to memory first).
private fun uprightRgb(bitmap: Bitmap, orientation: Int): UprightRgb {
    val readable = if (bitmap.config == Bitmap.Config.HARDWARE) bitmap.copy(Bitmap.Config.ARGB_8888, false) else bitmap
    try {
        val photo = UprightRgb(readable.width, readable.height, orientation)
        val row = IntArray(readable.width)
        for (y in 0 until readable.height) {
            readable.getPixels(row, 0, readable.width, 0, y, readable.width, 1)
            photo.putRow(y, row)
        }
        return photo
    } finally {
        if (readable !== bitmap) readable.recycle()
    }
}
