// JPEG files to upright RGB, as Pillow decodes them for elemental.images.open_image (see photo.h).
//
// Each choice below is Pillow 13's (JpegImagePlugin.py, libImaging/JpegDecode.c, Convert.c, Image.getexif), so
// the same libjpeg-turbo gives the same pixels: the draft scale, JDCT_ISLOW and fancy upsampling (libjpeg's
// defaults: Pillow's draft mode would change them only with draft=1, which `img.draft()` never passes), the output
// colour space, warnings ignored, a source that runs dry an error.
#include "elemental/photo.h"

#include <algorithm>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include <jerror.h>
#include <jpeglib.h>

namespace elemental {
namespace {

// libjpeg's memory for whole-image buffers: a progressive JPEG keeps every DCT coefficient of the full-size image
// (about 3 bytes a pixel at 4:2:0, whatever the output scale), and a tiny file can declare 65535 x 65535. 1 GiB
// decodes progressive photos up to about 350 Mpx; beyond, the error below rather than the app killed for memory.
constexpr long kMaxDecoderMemory = 1L << 30;

uint32_t read_u16(const uint8_t * p, bool little) {
    return little ? (p[0] | p[1] << 8) : (p[0] << 8 | p[1]);
}

uint32_t read_u32(const uint8_t * p, bool little) {
    return little ? (read_u16(p, true) | read_u16(p + 2, true) << 16)
                  : (read_u16(p, false) << 16 | read_u16(p + 2, false));
}

bool starts_with(const uint8_t * data, size_t size, const char * prefix, size_t n) {
    return size >= n && std::memcmp(data, prefix, n) == 0;
}

// ---- EXIF orientation, as Pillow reads it ----------------------------------------------------------------------

// What JpegImageFile._open keeps of the segments before the first scan.
struct Metadata {
    std::vector<uint8_t> exif;  // the first APP1 "Exif\0\0" body, the later ones appended without their prefix
    bool has_exif = false;
    const uint8_t * xmp = nullptr;  // the last APP1 XMP packet, after its namespace's NUL
    size_t xmp_size = 0;
};

// Pillow's marker walk: from the FF of FF D8 FF, fill bytes (FF FF) skipped, junk after a segment skipped up to the
// next FF, every marker from C0 on but C8, D0-D9 and F0-FD with a 2-byte length. It stops at the first scan (SOS),
// at a marker Pillow does not know, or where a length runs past the data (Pillow cannot open that file).
void read_metadata(const uint8_t * d, size_t n, Metadata & m) {
    size_t at = 3;  // d[2] is the pending FF
    while (at < n) {
        const unsigned code = d[at++];
        if (code == 0xFF) {
            continue;  // a fill byte: it is the pending FF now
        }
        if (code != 0x00) {  // FF 00 is stuffing: skipped like junk
            if (code < 0xC0) {
                return;
            }
            const bool bare = code == 0xC8 || (code >= 0xD0 && code <= 0xD9) || (code >= 0xF0 && code <= 0xFD);
            if (!bare) {
                if (n - at < 2) {
                    return;
                }
                const size_t length = read_u16(d + at, false);
                at += 2;
                const size_t body = length >= 2 ? length - 2 : 0;
                if (body > n - at) {
                    return;
                }
                const uint8_t * s = d + at;
                at += body;
                if (code == 0xE1 && starts_with(s, body, "Exif\0\0", 6)) {
                    if (m.has_exif) {
                        m.exif.insert(m.exif.end(), s + 6, s + body);
                    } else {
                        m.exif.assign(s, s + body);
                        m.has_exif = true;
                    }
                } else if (code == 0xE1 && starts_with(s, body, "http://ns.adobe.com/xap/1.0/\0", 29)) {
                    m.xmp = s + 29;
                    m.xmp_size = body - 29;
                } else if (code == 0xDA) {
                    return;
                }
            }
        }
        while (at < n && d[at] != 0xFF) {  // Pillow reads on to the next FF
            at++;
        }
        at++;
    }
}

// The Orientation entry of an Exif block as Pillow's Exif.load and ImageFileDirectory_v2.load read it.
enum class ExifResult { Raised, NoTag, Tag };

// Sizes of the TIFF field types Pillow loads (ImageFileDirectory_v2._load_dispatch); 0: a type it skips.
size_t tiff_unit_size(uint32_t type) {
    switch (type) {
        case 1: case 2: case 6: case 7: return 1;      // BYTE, ASCII, SBYTE, UNDEFINED
        case 3: case 8: return 2;                      // SHORT, SSHORT
        case 4: case 9: case 11: case 13: return 4;    // LONG, SLONG, FLOAT, IFD
        case 5: case 10: case 12: case 16: return 8;   // RATIONAL, SRATIONAL, DOUBLE, LONG8
        default: return 0;
    }
}

// The first value of a field as a whole number, for the types Pillow reads as int; false for bytes, strings,
// rationals and floats (elemental.images then keeps the photo as stored).
bool tiff_integer(uint32_t type, const uint8_t * v, bool little, int64_t & out) {
    switch (type) {
        case 3: out = read_u16(v, little); return true;
        case 4: case 13: out = read_u32(v, little); return true;
        case 6: out = static_cast<int8_t>(v[0]); return true;
        case 8: out = static_cast<int16_t>(read_u16(v, little)); return true;
        case 9: out = static_cast<int32_t>(read_u32(v, little)); return true;
        case 16: {
            const uint64_t hi = read_u32(v + (little ? 4 : 0), little), lo = read_u32(v + (little ? 0 : 4), little);
            const uint64_t value = hi << 32 | lo;
            out = value > 8 ? 0 : static_cast<int64_t>(value);  // only 1..8 matter
            return true;
        }
        default: return false;
    }
}

ExifResult exif_orientation(const std::vector<uint8_t> & exif, bool & integer, int64_t & value) {
    size_t start = 0;  // re.sub(b"^(Exif\x00\x00){1,2}", b"", data)
    for (int i = 0; i < 2 && starts_with(exif.data() + start, exif.size() - start, "Exif\0\0", 6); i++) {
        start += 6;
    }
    const uint8_t * t = exif.data() + start;
    const size_t size = exif.size() - start;
    if (size == 0) {
        return ExifResult::NoTag;
    }
    // The 8-byte header: "II*\0", "MM\0*" (or their odd cousins "MM*\0", "II\0*"); BigTIFF's offset field lies
    // past those 8 bytes, so Pillow raises for it, as for a short header.
    const bool accepted = starts_with(t, size, "MM\0*", 4) || starts_with(t, size, "II*\0", 4) ||
                          starts_with(t, size, "MM*\0", 4) || starts_with(t, size, "II\0*", 4);
    if (!accepted || size < 8) {
        return ExifResult::Raised;
    }
    const bool little = t[0] == 'I';
    // Pillow reads what it can and keeps the entries read before a short read: offsets are compared against
    // what is left, never added to first (a 32-bit offset near 4 GiB must not wrap back into the block).
    const uint64_t ifd = read_u32(t + 4, little);
    if (ifd > size || size - ifd < 2) {
        return ExifResult::NoTag;
    }
    const uint64_t entries = read_u16(t + ifd, little);
    uint64_t out_of_line = 0;  // Pillow's total_size: out-of-line data read so far, at most the block's size
    std::vector<bool> stored(65536);  // a tag already stored: its later entries are skipped, uncounted
    for (uint64_t i = 0; i < entries; i++) {
        const uint64_t at = ifd + 2 + 12 * i;  // < size + 2 + 12 * 65536: no overflow
        if (at > size || size - at < 12) {
            return ExifResult::NoTag;
        }
        const uint8_t * e = t + at;
        const uint32_t tag = read_u16(e, little), type = read_u16(e + 2, little);
        const uint64_t count = read_u32(e + 4, little);
        const size_t unit = tiff_unit_size(type);
        if (stored[tag] || unit == 0) {
            continue;
        }
        const uint64_t bytes = count * unit;  // < 2^35
        const uint8_t * v = e + 8;
        if (bytes > 4) {
            const uint64_t offset = read_u32(e + 8, little);
            out_of_line += bytes;
            if (out_of_line > size) {
                continue;  // "Tag data larger than file": skipped
            }
            if (offset > size || size - offset < bytes) {
                return ExifResult::NoTag;  // a short read ends Pillow's walk
            }
            v = t + offset;
        } else if (bytes == 0) {
            continue;  // no data: not stored
        }
        if (tag == 0x0112) {
            integer = tiff_integer(type, v, little, value);
            return ExifResult::Tag;
        }
        stored[tag] = true;
    }
    return ExifResult::NoTag;
}

// re.search(rb'tiff:Orientation(="|>)([0-9])', xmp)
int xmp_orientation(const uint8_t * x, size_t n) {
    static const char key[] = "tiff:Orientation";
    const size_t k = sizeof key - 1;
    for (size_t i = 0; n >= k + 2 && i <= n - k - 2; i++) {
        if (std::memcmp(x + i, key, k) != 0) {
            continue;
        }
        const uint8_t * p = x + i + k;
        size_t digit = 0;
        if (p[0] == '>') {
            digit = 1;
        } else if (p[0] == '=' && i + k + 3 <= n && p[1] == '"') {
            digit = 2;
        } else {
            continue;
        }
        if (i + k + digit < n && p[digit] >= '0' && p[digit] <= '9') {
            return p[digit] - '0';
        }
    }
    return 0;
}

// ---- libjpeg --------------------------------------------------------------------------------------------------

// Everything libjpeg touches, in one plain struct: no member has a destructor, so a longjmp out of libjpeg (how it
// reports errors) skips nothing that needed running.
struct JpegState {
    jpeg_decompress_struct cinfo;
    jpeg_error_mgr err;
    jpeg_source_mgr src;
    std::jmp_buf jump;
    bool truncated;
    bool refused;  // message is ours (a JPEG Pillow does not decode), not libjpeg's
    char message[JMSG_LENGTH_MAX];
};

JpegState & state_of(j_common_ptr cinfo) {
    return *static_cast<JpegState *>(cinfo->client_data);
}

// libjpeg's default error_exit calls exit(): back to the setjmp of the phase function instead.
void on_error(j_common_ptr cinfo) {
    JpegState & s = state_of(cinfo);
    (*cinfo->err->format_message)(cinfo, s.message);
    std::longjmp(s.jump, 1);
}

// Warnings (corrupt data libjpeg decodes around, e.g. a marker where entropy data should be) are Pillow's too:
// silent, the pixels as libjpeg makes them.
void on_message(j_common_ptr) {}

void on_source_init(j_decompress_ptr) {}

// The whole file is in the buffer from the start: libjpeg asking for more means the file ends before the image
// does. Pillow's suspending source stops at the same byte and raises "image file is truncated".
boolean on_source_empty(j_decompress_ptr cinfo) {
    JpegState & s = state_of(reinterpret_cast<j_common_ptr>(cinfo));
    s.truncated = true;
    std::longjmp(s.jump, 1);
}

void on_source_skip(j_decompress_ptr cinfo, long bytes) {
    if (bytes <= 0) {
        return;
    }
    jpeg_source_mgr & src = *cinfo->src;
    if (static_cast<unsigned long>(bytes) > src.bytes_in_buffer) {
        on_source_empty(cinfo);
    }
    src.next_input_byte += bytes;
    src.bytes_in_buffer -= static_cast<size_t>(bytes);
}

void on_source_term(j_decompress_ptr) {}

// Phase one: the header, then Pillow's output settings. Returns false with s.message, s.truncated or s.refused set.
// Like decode_rows, this frame holds nothing with a destructor: libjpeg's errors longjmp back into it.
bool read_header(JpegState & s, const uint8_t * data, size_t size, int max_side) {
    if (setjmp(s.jump)) {
        return false;
    }
    jpeg_create_decompress(&s.cinfo);
    s.cinfo.mem->max_memory_to_use = kMaxDecoderMemory;  // after create, which reads the JPEGMEM variable
    s.src.next_input_byte = data;
    s.src.bytes_in_buffer = size;
    s.src.init_source = on_source_init;
    s.src.fill_input_buffer = on_source_empty;
    s.src.skip_input_data = on_source_skip;
    s.src.resync_to_restart = jpeg_resync_to_restart;
    s.src.term_source = on_source_term;
    s.cinfo.src = &s.src;
    int header;
    do {  // Pillow's loop: a tables-only datastream may come first
        header = jpeg_read_header(&s.cinfo, FALSE);
    } while (header == JPEG_HEADER_TABLES_ONLY);

    // JpegImagePlugin's SOF handler: 8-bit samples and 1, 3 or 4 components, else the file does not open.
    if (s.cinfo.data_precision != 8) {
        s.refused = true;
        std::snprintf(s.message, sizeof s.message, "%d-bit JPEG (Pillow, so elemental, decodes 8-bit ones)",
                      s.cinfo.data_precision);
        return false;
    }
    const int components = s.cinfo.num_components;
    if (components != 1 && components != 3 && components != 4) {
        s.refused = true;
        std::snprintf(s.message, sizeof s.message, "JPEG with %d components (Pillow, so elemental, decodes 1, 3 or 4)",
                      components);
        return false;
    }
    // Mode L to JCS_GRAYSCALE then convert("RGB") copies the grey into R, G and B: what libjpeg's grey-to-RGB
    // conversion does. RGB to JCS_EXT_RGBX: the same values as JCS_RGB. CMYK to JCS_CMYK, converted below.
    s.cinfo.out_color_space = components == 4 ? JCS_CMYK : JCS_RGB;
    const int scale = jpeg_draft_scale(static_cast<int>(s.cinfo.image_width), static_cast<int>(s.cinfo.image_height),
                                       max_side);
    if (scale > 1) {
        s.cinfo.scale_num = 1;
        s.cinfo.scale_denom = static_cast<unsigned>(scale);
    }
    jpeg_calc_output_dimensions(&s.cinfo);
    return true;
}

// Where the decoded pixel (x, y) of a w x h image goes in the upright image: start + x * step (in pixels) for row
// y, for each EXIF orientation (Pillow's Transpose: 2 FLIP_LEFT_RIGHT, 3 ROTATE_180, 4 FLIP_TOP_BOTTOM,
// 5 TRANSPOSE, 6 ROTATE_270, 7 TRANSVERSE, 8 ROTATE_90).
struct Placement {
    int orientation;
    ptrdiff_t w, h;

    ptrdiff_t out_width() const { return orientation >= 5 ? h : w; }

    void row(ptrdiff_t y, ptrdiff_t & start, ptrdiff_t & step) const {
        const ptrdiff_t ow = out_width();
        switch (orientation) {
            case 2: start = y * w + w - 1; step = -1; break;
            case 3: start = (h - 1 - y) * w + w - 1; step = -1; break;
            case 4: start = (h - 1 - y) * w; step = 1; break;
            case 5: start = y; step = ow; break;
            case 6: start = h - 1 - y; step = ow; break;
            case 7: start = (w - 1) * ow + h - 1 - y; step = -ow; break;
            case 8: start = (w - 1) * ow + y; step = -ow; break;
            default: start = y * w; step = 1; break;
        }
    }
};

// Convert.c's cmyk2rgb after the "CMYK;I" unpacker (Adobe's inverted CMYK): with C' = 255 - c and K' = 255 - k as
// Pillow holds them, R = CLIP8(k - MULDIV255(C', k)).
uint8_t cmyk_channel(unsigned c, unsigned k) {
    const unsigned tmp = (255 - c) * k + 128;
    const int v = static_cast<int>(k) - static_cast<int>(((tmp >> 8) + tmp) >> 8);
    return static_cast<uint8_t>(std::clamp(v, 0, 255));
}

// Phase two: every scanline into `out` (upright), through `row` unless it can go straight in.
bool decode_rows(JpegState & s, const Placement & place, uint8_t * out, uint8_t * row) {
    if (setjmp(s.jump)) {
        return false;
    }
    jpeg_start_decompress(&s.cinfo);
    const bool cmyk = s.cinfo.out_color_space == JCS_CMYK;
    if (static_cast<ptrdiff_t>(s.cinfo.output_width) != place.w ||
        static_cast<ptrdiff_t>(s.cinfo.output_height) != place.h || s.cinfo.output_components != (cmyk ? 4 : 3)) {
        s.refused = true;
        std::snprintf(s.message, sizeof s.message, "libjpeg's output (%ux%u, %d components) is not what it announced",
                      s.cinfo.output_width, s.cinfo.output_height, s.cinfo.output_components);
        return false;
    }
    const bool direct = place.orientation == 1 && !cmyk;
    while (s.cinfo.output_scanline < s.cinfo.output_height) {
        const ptrdiff_t y = s.cinfo.output_scanline;
        JSAMPROW target = direct ? out + y * place.w * 3 : row;
        if (jpeg_read_scanlines(&s.cinfo, &target, 1) != 1) {  // only a suspending source returns 0
            s.truncated = true;
            return false;
        }
        if (direct) {
            continue;
        }
        ptrdiff_t start, step;
        place.row(y, start, step);
        uint8_t * d = out + start * 3;
        const ptrdiff_t stride = step * 3;
        for (ptrdiff_t x = 0; x < place.w; x++, d += stride) {
            if (cmyk) {
                const uint8_t * p = row + x * 4;
                d[0] = cmyk_channel(p[0], p[3]);
                d[1] = cmyk_channel(p[1], p[3]);
                d[2] = cmyk_channel(p[2], p[3]);
            } else {
                const uint8_t * p = row + x * 3;
                d[0] = p[0];
                d[1] = p[1];
                d[2] = p[2];
            }
        }
    }
    // No jpeg_finish_decompress: it would read on to the EOI marker, and Pillow accepts a file that ends right after
    // its last scanline (JpegDecode.c ignores finish's suspension once every line is decoded).
    return true;
}

// Destroys libjpeg's state from a C++ frame, one that no longjmp crosses.
struct JpegGuard {
    JpegState & s;
    ~JpegGuard() { jpeg_destroy_decompress(&s.cinfo); }
};

std::string libjpeg_error(const JpegState & s) {
    if (s.truncated) {
        return "truncated JPEG: the file ends before its image does";
    }
    if (s.refused) {
        return s.message;
    }
    if (s.err.msg_code == JERR_NO_BACKING_STORE) {
        return "JPEG too large to decode: libjpeg needs more than " + std::to_string(kMaxDecoderMemory >> 20) +
               " MiB for it (a progressive JPEG holds the DCT coefficients of its full size)";
    }
    return std::string("corrupt or unsupported JPEG (") + s.message + ")";
}

}  // namespace

Error check_pixel_cap(uint64_t width, uint64_t height, uint64_t decoded_width, uint64_t decoded_height) {
    if (decoded_width * decoded_height <= kMaxPhotoPixels) {
        return {};
    }
    char mpx[64];
    std::snprintf(mpx, sizeof mpx, " = %.0f Mpx", width * height / 1e6);
    std::string text = std::to_string(width) + "x" + std::to_string(height) + mpx;
    if (decoded_width != width || decoded_height != height) {
        text += " (decoded at " + std::to_string(decoded_width) + "x" + std::to_string(decoded_height) + ")";
    }
    std::snprintf(mpx, sizeof mpx, "%.0f Mpx", kMaxPhotoPixels / 1e6);
    return {text + ", over the limit of " + mpx};
}

bool is_jpeg(const uint8_t * data, size_t size) {
    return starts_with(data, size, "\xFF\xD8\xFF", 3);
}

int jpeg_draft_scale(int width, int height, int max_side) {
    const int64_t w = width, h = height, long_side = std::max(w, h);
    if (max_side < 1 || w < 1 || h < 1 || long_side <= max_side) {
        return 1;  // elemental.images._draft leaves the photo alone
    }
    // The target keeps the aspect ratio; JpegImageFile.draft takes the largest of 8, 4, 2, 1 that both sides allow.
    const int64_t tw = std::max<int64_t>(1, w * max_side / long_side);
    const int64_t th = std::max<int64_t>(1, h * max_side / long_side);
    const int64_t scale = std::min(w / tw, h / th);
    for (int s : {8, 4, 2}) {
        if (scale >= s) {
            return s;
        }
    }
    return 1;
}

int jpeg_orientation(const uint8_t * data, size_t size) {
    if (!is_jpeg(data, size)) {
        return 1;
    }
    Metadata m;
    read_metadata(data, size, m);
    if (m.has_exif) {
        bool integer = false;
        int64_t value = 1;
        switch (exif_orientation(m.exif, integer, value)) {
            case ExifResult::Raised: return 1;  // getexif() raised: _exif_upright keeps the photo as stored
            case ExifResult::Tag: return integer && value >= 1 && value <= 8 ? static_cast<int>(value) : 1;
            case ExifResult::NoTag: break;      // on to XMP, as getexif() goes
        }
    }
    const int xmp = m.xmp ? xmp_orientation(m.xmp, m.xmp_size) : 0;
    return xmp >= 1 && xmp <= 8 ? xmp : 1;
}

Error decode_photo(const uint8_t * data, size_t size, int max_side, RgbImage & out) {
    if (!is_jpeg(data, size)) {
        return {size == 0 ? "empty file (0 bytes), not a JPEG" : "not a JPEG file (it does not start with FF D8 FF)"};
    }
    JpegState s{};
    s.cinfo.err = jpeg_std_error(&s.err);
    s.err.error_exit = on_error;
    s.err.output_message = on_message;
    s.cinfo.client_data = &s;
    JpegGuard guard{s};
    if (!read_header(s, data, size, max_side)) {
        return {libjpeg_error(s)};
    }
    const uint64_t w = s.cinfo.output_width, h = s.cinfo.output_height;
    if (Error over = check_pixel_cap(s.cinfo.image_width, s.cinfo.image_height, w, h)) {
        return over;
    }
    const Placement place{jpeg_orientation(data, size), static_cast<ptrdiff_t>(w), static_cast<ptrdiff_t>(h)};
    RgbImage image;
    std::vector<uint8_t> row;
    try {
        image.pixels.resize(static_cast<size_t>(w * h * 3));
        row.resize(static_cast<size_t>(w * 4));
    } catch (const std::bad_alloc &) {
        return {"too large to decode in memory (" + std::to_string(w) + "x" + std::to_string(h) + " RGB)"};
    }
    if (!decode_rows(s, place, image.pixels.data(), row.data())) {
        return {libjpeg_error(s)};
    }
    image.width = static_cast<int>(place.out_width());
    image.height = static_cast<int>(place.orientation >= 5 ? w : h);
    out = std::move(image);
    return {};
}

}  // namespace elemental
