// Photo files to pixels, as elemental's Python side decodes them (elemental.images.open_image), so the phone
// and the desktop hand the classifier the same pixels for the same JPEG.
//
// The decoder is libjpeg-turbo with Pillow's settings: the same reduced DCT scale (Pillow's draft mode: 1/2,
// 1/4 or 1/8, the smallest that keeps the long side at or above `max_side`), the accurate integer IDCT, fancy
// upsampling, RGB out; then the EXIF orientation as Pillow's getexif() reads it. What it does not do, and
// elemental.images does: convert a photo with an embedded non-sRGB colour profile (Display P3, Adobe RGB, a CMYK
// profile) to sRGB. Such photos decode as if their values were sRGB.
#pragma once

#include "elemental/classifier.h"

#include <cstddef>
#include <cstdint>

namespace elemental {

// elemental.images.DEFAULT_MAX_PIXELS: the most pixels a photo may have once decoded (at its reduced scale).
constexpr uint64_t kMaxPhotoPixels = 100'000'000;

// The cap above, in elemental.images._decode's words: an error when a width x height photo, decoded at
// decoded_width x decoded_height (its reduced scale, or the same size), has more than kMaxPhotoPixels pixels.
Error check_pixel_cap(uint64_t width, uint64_t height, uint64_t decoded_width, uint64_t decoded_height);

// Whether `data` starts as a JPEG does (FF D8 FF, what Pillow's JPEG plugin accepts). decode_photo refuses
// anything else with an error saying it is not a JPEG; a caller with other decoders (PNG, ...) asks first.
bool is_jpeg(const uint8_t * data, size_t size);

// The DCT scale denominator (1, 2, 4 or 8) Pillow decodes a width x height JPEG at when the caller will bring it
// to `max_side` (elemental.images._draft, then JpegImageFile.draft); 1 when max_side <= 0 or the photo is no
// larger. The decoded size is ceil(width / scale) x ceil(height / scale).
int jpeg_draft_scale(int width, int height, int max_side);

// The EXIF orientation (1..8) of a JPEG as Pillow's getexif() reads it: the APP1 "Exif" segments before the
// first scan (joined, as Pillow joins them), the first Orientation entry of IFD0 with a value Pillow reads as a
// whole number, else XMP's tiff:Orientation. 1 when there is none or it cannot be read, as
// elemental.images._exif_upright treats a malformed block (values outside 1..8 also mean "as stored").
int jpeg_orientation(const uint8_t * data, size_t size);

// Decodes the JPEG in `data` to upright RGB888 at Pillow's draft scale for `max_side` (max_side <= 0: full size):
// pixel for pixel what elemental.images.open_image(path, max_side) gives for a photo without a colour profile.
// Greyscale JPEGs come out grey in RGB; CMYK and YCCK JPEGs as Pillow converts them without a profile. Fails
// (one message naming what failed) for a file that is not a JPEG, a truncated or corrupt one, a JPEG of a kind
// Pillow does not decode (12-bit, 2 components), one over kMaxPhotoPixels at its decoded size (checked before any
// pixel is decoded), or one needing more than 1 GiB of libjpeg's working memory (a progressive JPEG over about
// 350 Mpx). Memory: the output plus libjpeg's working memory (a few rows for a baseline JPEG; the DCT coefficients
// of the full-size image, about 3 bytes a pixel at 4:2:0 whatever the scale, for a progressive one).
Error decode_photo(const uint8_t * data, size_t size, int max_side, RgbImage & out);

}  // namespace elemental
