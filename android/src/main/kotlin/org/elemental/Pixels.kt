// Photo pixels for the classifier without Android classes, so the desktop tests run them: which bytes are a JPEG (the
// library decodes those itself), and the upright RGB888 buffer built row by row from a platform decoder's ARGB rows.
package org.elemental

/** Whether `bytes` start as a JPEG does (FF D8 FF): those go to ElementClassifier.classifyJpeg, the library's decoder. */
fun isJpeg(bytes: ByteArray): Boolean =
    bytes.size >= 3 && bytes[0] == 0xFF.toByte() && bytes[1] == 0xD8.toByte() && bytes[2] == 0xFF.toByte()

/**
 * An upright RGB888 photo (what ElementClassifier.classify takes), filled one decoded row at a time.
 *
 * The rows come as the file stores them; EXIF `orientation` (1..8, as ExifInterface reports it) says how to turn
 * them upright, as the desktop does (PIL's transpose in `elemental.images`), and transparency is composited onto
 * white as training saw it. Writing each row straight to its upright place means the only full-size buffer is
 * this one (3 bytes a pixel): no rotated copy of the bitmap and no IntArray of all its pixels.
 */
class UprightRgb(private val storedWidth: Int, private val storedHeight: Int, private val orientation: Int) {
    private val swaps = orientation in 5..8

    /** The upright size. */
    val width: Int = if (swaps) storedHeight else storedWidth
    val height: Int = if (swaps) storedWidth else storedHeight

    init {
        if (storedWidth < 1 || storedHeight < 1) throw ElementalException("photo is empty (${storedWidth}x$storedHeight)")
        if (storedWidth.toLong() * storedHeight * 3 > Int.MAX_VALUE) {
            throw ElementalException("photo too large to classify whole (${storedWidth}x$storedHeight): decode it at a reduced scale")
        }
    }

    val rgb = ByteArray(width * height * 3)

    /** Stores row `y` of the photo as stored: `argb[offset until offset + storedWidth]`, packed ARGB ints. */
    fun putRow(y: Int, argb: IntArray, offset: Int = 0) {
        val w = storedWidth
        val h = storedHeight
        for (sx in 0 until w) {
            // where stored pixel (sx, y) lands upright: the inverse of PIL's Transpose for orientations 2..8
            val x: Int
            val uy: Int
            when (orientation) {
                2 -> { x = w - 1 - sx; uy = y }
                3 -> { x = w - 1 - sx; uy = h - 1 - y }
                4 -> { x = sx; uy = h - 1 - y }
                5 -> { x = y; uy = sx }
                6 -> { x = h - 1 - y; uy = sx }
                7 -> { x = h - 1 - y; uy = w - 1 - sx }
                8 -> { x = y; uy = w - 1 - sx }
                else -> { x = sx; uy = y }
            }
            val p = argb[offset + sx]
            val a = p ushr 24
            val at = (uy * width + x) * 3
            rgb[at] = onWhite(p shr 16 and 0xFF, a)
            rgb[at + 1] = onWhite(p shr 8 and 0xFF, a)
            rgb[at + 2] = onWhite(p and 0xFF, a)
        }
    }

    private fun onWhite(c: Int, a: Int): Byte = ((c * a + 255 * (255 - a) + 127) / 255).toByte()
}
