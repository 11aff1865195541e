#include "photo.h"

#include "elemental/photo.h"

#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_STATIC  // libmtmd carries its own copy; keep ours private
#include "stb/stb_image.h"

#include <algorithm>
#include <charconv>
#include <climits>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <vector>

namespace elemental::tools {
namespace {

namespace fs = std::filesystem;

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

bool read_photo_file(const std::string & path, std::vector<unsigned char> & data, std::string & error) {
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
    if (bytes > static_cast<uintmax_t>(INT_MAX)) {  // stb_image takes the length as an int; no photo is that big
        error = path + ": " + std::to_string(bytes) + " bytes, over the " + std::to_string(INT_MAX) +
                " bytes this tool reads";
        return false;
    }
    data.resize(static_cast<size_t>(bytes));
    std::ifstream in(path, std::ios::binary);
    if (!in.read(reinterpret_cast<char *>(data.data()), static_cast<std::streamsize>(data.size()))) {
        error = path + ": cannot read (" + std::to_string(in.gcount()) + " of " + std::to_string(bytes) + " bytes)";
        return false;
    }
    return true;
}

bool parse_side(const std::string & text, int & out) {
    int value = 0;
    const auto [stop, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (ec != std::errc() || stop != text.data() + text.size() || value < 1) {
        return false;
    }
    out = value;
    return true;
}

bool load_photo(const std::string & path, int max_side, RgbImage & out, std::string & error) {
    std::vector<unsigned char> data;
    if (!read_photo_file(path, data, error)) {
        return false;
    }
    if (is_jpeg(data.data(), data.size())) {  // the library's decoder: Pillow's pixels, at Pillow's reduced scale
        const Error failed = decode_photo(data.data(), data.size(), max_side, out);
        if (failed) {
            error = path + ": " + failed.message;
        }
        return !failed;
    }
    const int length = static_cast<int>(data.size());
    const std::string stb_reads = "; this tool reads JPEG, PNG, BMP, GIF)";
    int w = 0, h = 0, channels = 0;
    // The header's size first: a small file can declare gigapixels, which stb_image would try to allocate.
    if (!stbi_info_from_memory(data.data(), length, &w, &h, &channels)) {
        const std::string format = format_stb_cannot_read(data);
        error = path + ": not a readable image (" +
                (format.empty() ? std::string(stbi_failure_reason()) : format + " is not a format this tool decodes") +
                stb_reads;
        return false;
    }
    if (const Error over = check_pixel_cap(w, h, w, h)) {  // stb_image decodes at full size only
        error = path + ": " + over.message;
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
    out = std::move(image);
    return true;
}

}  // namespace elemental::tools
