#include "photo.h"

#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_STATIC  // libmtmd carries its own copy; keep ours private
#include "stb/stb_image.h"

#include <fstream>
#include <iterator>
#include <vector>

namespace elemental::tools {
namespace {

uint32_t read_u16(const unsigned char * p, bool little) {
    return little ? (p[0] | p[1] << 8) : (p[0] << 8 | p[1]);
}

uint32_t read_u32(const unsigned char * p, bool little) {
    return little ? (read_u16(p, true) | read_u16(p + 2, true) << 16) : (read_u16(p, false) << 16 | read_u16(p + 2, false));
}

// Orientation tag (0x0112) of the TIFF structure in an Exif block; 1 when absent or malformed.
int tiff_orientation(const unsigned char * tiff, size_t size) {
    if (size < 8) {
        return 1;
    }
    const bool little = tiff[0] == 'I' && tiff[1] == 'I';
    if (!little && !(tiff[0] == 'M' && tiff[1] == 'M')) {
        return 1;
    }
    const uint32_t ifd = read_u32(tiff + 4, little);
    if (ifd + 2 > size) {
        return 1;
    }
    const uint32_t entries = read_u16(tiff + ifd, little);
    for (uint32_t i = 0; i < entries; i++) {
        const size_t at = ifd + 2 + 12 * static_cast<size_t>(i);
        if (at + 12 > size) {
            return 1;
        }
        if (read_u16(tiff + at, little) == 0x0112) {
            const uint32_t value = read_u16(tiff + at + 8, little);  // SHORT, count 1: in the value field
            return value >= 1 && value <= 8 ? static_cast<int>(value) : 1;
        }
    }
    return 1;
}

}  // namespace

int jpeg_exif_orientation(const unsigned char * data, size_t size) {
    if (size < 4 || data[0] != 0xFF || data[1] != 0xD8) {
        return 1;
    }
    size_t at = 2;
    while (at + 4 <= size && data[at] == 0xFF) {
        const unsigned marker = data[at + 1];
        if (marker == 0xDA || marker == 0xD9) {  // start of scan / end of image: no more metadata
            break;
        }
        const size_t length = read_u16(data + at + 2, false);
        if (length < 2 || at + 2 + length > size) {
            break;
        }
        const unsigned char * body = data + at + 4;
        if (marker == 0xE1 && length >= 8 && std::equal(body, body + 6, "Exif\0\0")) {
            return tiff_orientation(body + 6, length - 8);
        }
        at += 2 + length;
    }
    return 1;
}

RgbImage apply_orientation(const RgbImage & in, int orientation) {
    if (orientation < 2 || orientation > 8) {
        return in;
    }
    const int w = in.width, h = in.height;
    const bool swap = orientation >= 5;
    RgbImage out;
    out.width = swap ? h : w;
    out.height = swap ? w : h;
    out.pixels.resize(in.pixels.size());
    for (int y = 0; y < out.height; y++) {
        for (int x = 0; x < out.width; x++) {
            int sx = x, sy = y;
            switch (orientation) {
                case 2: sx = w - 1 - x; break;                   // FLIP_LEFT_RIGHT
                case 3: sx = w - 1 - x; sy = h - 1 - y; break;   // ROTATE_180
                case 4: sy = h - 1 - y; break;                   // FLIP_TOP_BOTTOM
                case 5: sx = y; sy = x; break;                   // TRANSPOSE
                case 6: sx = y; sy = h - 1 - x; break;           // ROTATE_270 (clockwise 90)
                case 7: sx = w - 1 - y; sy = h - 1 - x; break;   // TRANSVERSE
                case 8: sx = w - 1 - y; sy = x; break;           // ROTATE_90 (counter-clockwise)
            }
            const uint8_t * s = &in.pixels[(static_cast<size_t>(sy) * w + sx) * 3];
            uint8_t * d = &out.pixels[(static_cast<size_t>(y) * out.width + x) * 3];
            d[0] = s[0];
            d[1] = s[1];
            d[2] = s[2];
        }
    }
    return out;
}

bool load_photo(const std::string & path, RgbImage & out, std::string & error) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        error = "photo not found: " + path;
        return false;
    }
    const std::vector<unsigned char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (data.empty()) {
        error = path + ": empty file (0 bytes), not an image";
        return false;
    }
    int w = 0, h = 0, channels = 0;
    unsigned char * pixels = stbi_load_from_memory(data.data(), static_cast<int>(data.size()), &w, &h, &channels, 0);
    if (!pixels) {
        error = path + ": not a readable image (" + stbi_failure_reason() + "; stb_image reads JPEG, PNG, BMP, GIF)";
        return false;
    }
    RgbImage image;
    image.width = w;
    image.height = h;
    image.pixels.resize(static_cast<size_t>(w) * h * 3);
    for (size_t i = 0; i < static_cast<size_t>(w) * h; i++) {
        const unsigned char * p = pixels + i * channels;
        const bool grey = channels < 3;
        const int alpha = channels == 2 ? p[1] : channels == 4 ? p[3] : 255;
        for (int c = 0; c < 3; c++) {
            const int v = grey ? p[0] : p[c];
            // transparency onto white, as elemental.images._to_rgb composites it (rounding may differ by 1)
            image.pixels[i * 3 + c] = static_cast<uint8_t>((v * alpha + 255 * (255 - alpha) + 127) / 255);
        }
    }
    stbi_image_free(pixels);
    const bool jpeg = data.size() > 2 && data[0] == 0xFF && data[1] == 0xD8;
    out = jpeg ? apply_orientation(image, jpeg_exif_orientation(data.data(), data.size())) : image;
    return true;
}

}  // namespace elemental::tools
