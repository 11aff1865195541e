// Android conveniences on top of ElementClassifier: photos as Bitmaps, loaded upright by their EXIF orientation,
// and the classifier opened with the app's native library folder (llama.cpp's CPU backends live there).
// Needs the Android SDK: compiled by Gradle in the app, not by elemental's desktop tests.
package org.elemental.android

import android.content.Context
import android.graphics.Bitmap
import android.graphics.BitmapFactory
import android.graphics.Color
import android.graphics.Matrix
import androidx.exifinterface.media.ExifInterface
import org.elemental.Classification
import org.elemental.ElementClassifier
import org.elemental.ElementalException
import org.elemental.Repack
import java.io.File

/** Opens an export folder (manifest.json + the two GGUF files) copied to app storage. */
fun openClassifier(context: Context, modelDir: File, threads: Int = 0, repack: Repack = Repack.AUTO): ElementClassifier =
    ElementClassifier.open(modelDir, threads, repack, backendDir = context.applicationInfo.nativeLibraryDir)

/** Classifies an upright Bitmap: its pixels as RGB888, transparency composited onto white (as training did). */
fun ElementClassifier.classify(bitmap: Bitmap): Classification {
    val argb = IntArray(bitmap.width * bitmap.height)
    bitmap.getPixels(argb, 0, bitmap.width, 0, 0, bitmap.width, bitmap.height)
    val rgb = ByteArray(argb.size * 3)
    for (i in argb.indices) {
        val p = argb[i]
        val a = Color.alpha(p)
        rgb[3 * i] = ((Color.red(p) * a + 255 * (255 - a) + 127) / 255).toByte()
        rgb[3 * i + 1] = ((Color.green(p) * a + 255 * (255 - a) + 127) / 255).toByte()
        rgb[3 * i + 2] = ((Color.blue(p) * a + 255 * (255 - a) + 127) / 255).toByte()
    }
    return classify(rgb, bitmap.width, bitmap.height)
}

/** A photo file decoded and turned upright by its EXIF orientation (camera photos are often stored sideways). */
fun loadUprightPhoto(file: File): Bitmap {
    val options = BitmapFactory.Options().apply { inPreferredConfig = Bitmap.Config.ARGB_8888 }
    val bitmap = BitmapFactory.decodeFile(file.path, options) ?: throw ElementalException("$file: not a readable image")
    val orientation = ExifInterface(file.path).getAttributeInt(ExifInterface.TAG_ORIENTATION, ExifInterface.ORIENTATION_NORMAL)
    val m = Matrix()
    when (orientation) {
        ExifInterface.ORIENTATION_FLIP_HORIZONTAL -> m.setScale(-1f, 1f)
        ExifInterface.ORIENTATION_ROTATE_180 -> m.setRotate(180f)
        ExifInterface.ORIENTATION_FLIP_VERTICAL -> m.setScale(1f, -1f)
        ExifInterface.ORIENTATION_TRANSPOSE -> { m.setRotate(90f); m.postScale(-1f, 1f) }
        ExifInterface.ORIENTATION_ROTATE_90 -> m.setRotate(90f)
        ExifInterface.ORIENTATION_TRANSVERSE -> { m.setRotate(-90f); m.postScale(-1f, 1f) }
        ExifInterface.ORIENTATION_ROTATE_270 -> m.setRotate(-90f)
        else -> return bitmap
    }
    return Bitmap.createBitmap(bitmap, 0, 0, bitmap.width, bitmap.height, m, false)  // exact: no filtering
}
