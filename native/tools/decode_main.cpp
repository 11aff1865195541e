// elemental-native-decode [--max-side N] [--peak] PHOTO OUT.rgb: PHOTO (a JPEG) decoded by the native library as the
// phone decodes it (elemental::decode_photo), written to OUT.rgb as raw RGB888 rows. Prints one JSON line,
// {"width": W, "height": H}; or an `error:` line on stderr and exit code 2. With --peak the JSON line also has
// "peak_rss_kib", the process's peak resident memory, and is printed after an error too (then it has only that).
// Tests compare the pixels with Pillow's (tests/test_native_decode.py).
#include "elemental/photo.h"
#include "photo.h"

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

namespace {

// VmHWM of /proc/self/status: the peak of this program's own memory. Not getrusage's ru_maxrss, which also counts
// the parent's memory at the fork that started it (a Python test process weighs more than a decoded photo).
long peak_rss_kib() {
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line)) {
        if (line.compare(0, 6, "VmHWM:") == 0) {
            return std::stol(line.substr(6));
        }
    }
    return -1;
}

bool g_peak = false;

int fail(const std::string & message) {
    std::fprintf(stderr, "error: %s\n", message.c_str());
    if (g_peak) {
        std::printf("{\"peak_rss_kib\": %ld}\n", peak_rss_kib());
    }
    return 2;
}

}  // namespace

int main(int argc, char ** argv) {
    const char * usage = "usage: elemental-native-decode [--max-side N] [--peak] PHOTO OUT.rgb";
    int max_side = 0;
    std::vector<std::string> paths;
    for (int i = 1; i < argc; i++) {
        const std::string arg = argv[i];
        if (arg == "--peak") {
            g_peak = true;
        } else if (arg == "--max-side") {
            if (++i == argc) {
                return fail(usage);
            }
            if (!elemental::tools::parse_side(argv[i], max_side)) {
                return fail("--max-side must be a whole number of pixels from 1, not '" + std::string(argv[i]) + "'");
            }
        } else {
            paths.push_back(arg);
        }
    }
    if (paths.size() != 2) {
        return fail(usage);
    }
    const std::string & path = paths[0];
    std::vector<unsigned char> data;
    std::string why;
    if (!elemental::tools::read_photo_file(path, data, why)) {
        return fail(why);
    }
    elemental::RgbImage image;
    if (const elemental::Error error = elemental::decode_photo(data.data(), data.size(), max_side, image)) {
        return fail(path + ": " + error.message);
    }
    FILE * f = std::fopen(paths[1].c_str(), "wb");
    if (!f) {
        return fail("cannot write " + paths[1]);
    }
    const bool written = std::fwrite(image.pixels.data(), 1, image.pixels.size(), f) == image.pixels.size();
    if (std::fclose(f) != 0 || !written) {
        return fail("cannot write " + paths[1]);
    }
    std::string line = "{\"width\": " + std::to_string(image.width) + ", \"height\": " + std::to_string(image.height);
    if (g_peak) {
        line += ", \"peak_rss_kib\": " + std::to_string(peak_rss_kib());
    }
    std::printf("%s}\n", line.c_str());
    return 0;
}
