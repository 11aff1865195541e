// Photo files for the desktop tools: decoded with stb_image (as an app without Pillow would), upright by
// the JPEG's EXIF orientation, transparency composited onto white (as elemental.images does).
#pragma once

#include "elemental/classifier.h"

#include <string>

namespace elemental::tools {

// The EXIF orientation (1..8) of a JPEG's APP1 block; 1 when there is none or it cannot be read.
int jpeg_exif_orientation(const unsigned char * data, size_t size);

// `image` turned upright for EXIF `orientation` (PIL's Transpose for 2..8).
RgbImage apply_orientation(const RgbImage & image, int orientation);

// Decodes `path`; on failure returns false and sets `error` naming the file. Refused before any pixel is decoded: a
// file over INT_MAX bytes (stb_image's limit), a header declaring over 100 Mpx (elemental.images.DEFAULT_MAX_PIXELS,
// as `elemental classify`), a JPEG cut before its end-of-image marker (Pillow refuses those too).
bool load_photo(const std::string & path, RgbImage & out, std::string & error);

}  // namespace elemental::tools
