// Photo files for the desktop tools, decoded as elemental.images.open_image decodes them: JPEGs by the library's
// decoder (elemental/photo.h: libjpeg-turbo with Pillow's settings, at Pillow's reduced scale, upright by EXIF, pixel
// for pixel Pillow's), other formats with stb_image (PNG, BMP, GIF: lossless, so the same pixels), transparency
// composited onto white (as elemental.images does).
#pragma once

#include "elemental/classifier.h"

#include <string>
#include <vector>

namespace elemental::tools {

// The bytes of the photo file `path` into `data`; on failure (missing, empty, over INT_MAX bytes, unreadable)
// returns false and sets `error` naming the file.
bool read_photo_file(const std::string & path, std::vector<unsigned char> & data, std::string & error);

// A side length in pixels from a command line: a whole number from 1, strictly (atoi would read "abc" as 0).
bool parse_side(const std::string & text, int & out);

// Decodes `path` for a caller that will bring it to `max_side` (a JPEG is decoded at the reduced scale Pillow's
// draft mode picks; 0: full size); on failure returns false and sets `error` naming the file. Refused before any
// pixel is decoded: a file over INT_MAX bytes, a photo over 100 Mpx at the size it would be decoded at
// (elemental.images.DEFAULT_MAX_PIXELS, as `elemental classify`).
bool load_photo(const std::string & path, int max_side, RgbImage & out, std::string & error);

}  // namespace elemental::tools
