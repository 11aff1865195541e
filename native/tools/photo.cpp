#include "photo.h"

#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_STATIC  // libmtmd carries its own copy; keep ours private
#include "stb/stb_image.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <vector>

namespace elemental::tools {
namespace {

namespace fs = std::filesystem;

// elemental.images.DEFAULT_MAX_PIXELS: the photos `elemental classify` refuses to decode, refused here too.
// stb_image has no reduced-scale JPEG decode, so the cap applies to the full size of every format.
constexpr uint64_t kMaxPixels = 100'000'000;

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
    // The offset is the file's word: compare it against what is left, never add to it first (an offset near
    // 0xFFFFFFFF would wrap a 32-bit sum back into range and point 4 GiB past the block).
    const uint64_t ifd = read_u32(tiff + 4, little);
    if (ifd > size || size - ifd < 2) {
        return 1;
    }
    const uint64_t entries = read_u16(tiff + ifd, little);
    for (uint64_t i = 0; i < entries; i++) {
        const uint64_t at = ifd + 2 + 12 * i;  // ifd <= size and i < 65536: far from overflowing
        if (at > size || size - at < 12) {
            return 1;
        }
        if (read_u16(tiff + at, little) == 0x0112) {
            const uint32_t value = read_u16(tiff + at + 8, little);  // SHORT, count 1: in the value field
            return value >= 1 && value <= 8 ? static_cast<int>(value) : 1;
        }
    }
    return 1;
}

// Whether a JPEG stops before its end-of-image marker. stb_image decodes such a file anyway, the missing
// scan data grey; Pillow (elemental classify) refuses it as truncated, and so does this tool. In entropy-coded
// data a 0xFF byte is always stuffed (FF 00) or a restart marker, so FF D9 after the scan header is the end.
bool jpeg_truncated(const unsigned char * data, size_t size) {
    size_t at = 2;
    while (at + 4 <= size) {
        if (data[at] != 0xFF) {
            return false;  // no marker where one belongs: the decoder's verdict, not ours
        }
        const unsigned marker = data[at + 1];
        if (marker == 0xFF || marker == 0x01 || (marker >= 0xD0 && marker <= 0xD7)) {
            at += marker == 0xFF ? 1 : 2;  // a fill byte, or a marker without a length
            continue;
        }
        if (marker == 0xD9) {
            return false;  // ends before any scan: the decoder says what is wrong
        }
        const size_t after = at + 2 + read_u16(data + at + 2, false);
        if (marker == 0xDA) {  // start of scan
            for (size_t i = after; i + 1 < size; i++) {
                if (data[i] == 0xFF && data[i + 1] == 0xD9) {
                    return false;
                }
            }
            return true;
        }
        at = after;
    }
    return true;  // the file ends inside its headers
}

// Names the formats elemental classify reads but stb_image does not, so a refusal says what the file is.
std::string format_stb_cannot_read(const std::vector<unsigned char> & d) {
    const auto starts = [&](size_t at, const char * magic, size_t n) {
        return d.size() >= at + n && std::equal(magic, magic + n, d.begin() + static_cast<std::ptrdiff_t>(at));
    };
    if (starts(0, "RIFF", 4) && starts(8, "WEBP", 4)) {
        return "WebP";
    }
    if (starts(0, "II*\0", 4) || starts(0, "MM\0*", 4)) {
        return "TIFF";
    }
    if (starts(4, "ftyp", 4)) {  // ISO-BMFF: the brand says which (the brands elemental.images knows)
        for (const char * brand : {"avif", "avis"}) {
            if (starts(8, brand, 4)) {
                return "AVIF";
            }
        }
        for (const char * brand : {"heic", "heix", "hevc", "hevx", "heim", "heis", "hevm", "hevs", "mif1", "msf1"}) {
            if (starts(8, brand, 4)) {
                return "HEIF/HEIC";
            }
        }
    }
    return "";
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
    std::error_code ec;
    if (!fs::is_regular_file(path, ec)) {
        error = "photo not found: " + path;
        return false;
    }
    const uintmax_t bytes = fs::file_size(path, ec);
    if (ec) {
        error = path + ": cannot read (" + ec.message() + ")";
        return false;
    }
    if (bytes == 0) {
        error = path + ": empty file (0 bytes), not an image";
        return false;
    }
    if (bytes > static_cast<uintmax_t>(INT_MAX)) {  // stb_image takes the length as an int
        error = path + ": " + std::to_string(bytes) + " bytes, over the " + std::to_string(INT_MAX) +
                " bytes stb_image can read";
        return false;
    }
    std::vector<unsigned char> data(static_cast<size_t>(bytes));
    std::ifstream in(path, std::ios::binary);
    if (!in.read(reinterpret_cast<char *>(data.data()), static_cast<std::streamsize>(data.size()))) {
        error = path + ": cannot read (" + std::to_string(in.gcount()) + " of " + std::to_string(bytes) + " bytes)";
        return false;
    }
    const int length = static_cast<int>(data.size());
    const std::string stb_reads = "; stb_image reads JPEG, PNG, BMP, GIF)";
    int w = 0, h = 0, channels = 0;
    // The header's size first: a small file can declare gigapixels, which stb_image would try to allocate.
    if (!stbi_info_from_memory(data.data(), length, &w, &h, &channels)) {
        const std::string format = format_stb_cannot_read(data);
        error = path + ": not a readable image (" +
                (format.empty() ? std::string(stbi_failure_reason()) : format + " is not a format this tool decodes") +
                stb_reads;
        return false;
    }
    const uint64_t pixels_declared = static_cast<uint64_t>(w) * static_cast<uint64_t>(h);
    if (pixels_declared > kMaxPixels) {
        char mpx[64];
        std::snprintf(mpx, sizeof mpx, "%.0f Mpx, over the limit of %.0f Mpx", pixels_declared / 1e6, kMaxPixels / 1e6);
        error = path + ": " + std::to_string(w) + "x" + std::to_string(h) + " = " + mpx;
        return false;
    }
    const bool jpeg = data.size() > 2 && data[0] == 0xFF && data[1] == 0xD8;
    if (jpeg && jpeg_truncated(data.data(), data.size())) {
        error = path + ": not a readable image (truncated or corrupt file: the JPEG ends before its end-of-image marker)";
        return false;
    }
    unsigned char * pixels = stbi_load_from_memory(data.data(), length, &w, &h, &channels, 0);
    if (!pixels) {
        error = path + ": not a readable image (" + stbi_failure_reason() + stb_reads;
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
    out = jpeg ? apply_orientation(image, jpeg_exif_orientation(data.data(), data.size())) : image;
    return true;
}

}  // namespace elemental::tools
