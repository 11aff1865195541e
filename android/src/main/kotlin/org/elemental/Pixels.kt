// Photo pixels for the classifier without Android classes, so the desktop tests run them: the JPEG decode scale
// that keeps a big photo's memory small, and the upright RGB888 buffer built row by row from decoded ARGB rows.
package org.elemental

/**
 * The JPEG decoder's reduction (1, 2, 4 or 8, its DCT scales) for a `width` x `height` photo that will be shrunk
 * to `maxSide` on its long side: the largest that keeps the photo at least that big. It is the choice the desktop
 * makes (Pillow's draft mode in `elemental.images`), so a 50-MP photo is decoded at 1/8 scale instead of full
 * size on the phone too (Android: BitmapFactory.Options.inSampleSize).
 */
fun draftScale(width: Int, height: Int, maxSide: Int): Int {
    val longSide = maxOf(width, height)
    if (maxSide < 1 || longSide <= maxSide) return 1
    val targetW = maxOf(1L, width.toLong() * maxSide / longSide)
    val targetH = maxOf(1L, height.toLong() * maxSide / longSide)
    val scale = minOf(width / targetW, height / targetH)
    return intArrayOf(8, 4, 2).firstOrNull { scale >= it } ?: 1
}

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
