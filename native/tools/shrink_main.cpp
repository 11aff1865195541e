// elemental-native-shrink PHOTO OUT.ppm [MAX_SIDE]: the pixels the native library hands to libmtmd for PHOTO
// (decoded at the reduced scale MAX_SIDE allows, upright, brought to MAX_SIDE, default 1024), as a binary PPM, as
// `elemental classify` makes them (open_image(max_side) then bounded). Tests compare them with Pillow's.
#include "elemental/classifier.h"
#include "photo.h"

#include <cstdio>
#include <string>

int main(int argc, char ** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "error: usage: elemental-native-shrink PHOTO OUT.ppm [MAX_SIDE]\n");
        return 2;
    }
    int max_side = 1024;
    if (argc > 3 && !elemental::tools::parse_side(argv[3], max_side)) {
        std::fprintf(stderr, "error: MAX_SIDE must be a whole number of pixels from 1, not '%s'\n", argv[3]);
        return 2;
    }
    elemental::RgbImage photo;
    std::string error;
    if (!elemental::tools::load_photo(argv[1], max_side, photo, error)) {
        std::fprintf(stderr, "error: %s\n", error.c_str());
        return 2;
    }
    const elemental::RgbImage out = elemental::shrink_to(photo.pixels.data(), photo.width, photo.height, max_side);
    FILE * f = std::fopen(argv[2], "wb");
    if (!f) {
        std::fprintf(stderr, "error: cannot write %s\n", argv[2]);
        return 2;
    }
    std::fprintf(f, "P6\n%d %d\n255\n", out.width, out.height);
    const bool ok = std::fwrite(out.pixels.data(), 1, out.pixels.size(), f) == out.pixels.size();
    return std::fclose(f) == 0 && ok ? 0 : 2;
}
