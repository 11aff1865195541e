// elemental-native-classify MODEL_DIR PHOTO|FOLDER...: what `elemental classify --model_path MODEL_DIR` prints,
// one JSON line per photo, computed by the native library (the code the Android app runs).
//
// Options: --threads N, --quant Q8_0|Q4_K_M|F16, --repack auto|on|off. Exit code 2 with one `error:` line on
// bad input (a missing or unreadable photo, an export the library refuses).
#include "elemental/classifier.h"
#include "photo.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

int fail(const std::string & message) {
    std::fprintf(stderr, "error: %s\n", message.c_str());
    return 2;
}

// Photos of a folder, sorted, as `elemental classify` takes them (the same extensions, searched recursively).
std::vector<std::string> photos_in(const std::string & arg) {
    static const std::vector<std::string> exts = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"};
    if (!fs::is_directory(arg)) {
        return {arg};
    }
    std::vector<std::string> found;
    for (const auto & entry : fs::recursive_directory_iterator(arg)) {
        std::string ext = entry.path().extension().string();
        std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
        if (entry.is_regular_file() && std::find(exts.begin(), exts.end(), ext) != exts.end()) {
            found.push_back(entry.path().string());
        }
    }
    std::sort(found.begin(), found.end());
    return found;
}

}  // namespace

int main(int argc, char ** argv) {
    elemental::Options options;
    std::vector<std::string> args;
    for (int i = 1; i < argc; i++) {
        const std::string a = argv[i];
        const bool has_value = i + 1 < argc;
        if (a == "--threads" && has_value) {
            options.n_threads = std::atoi(argv[++i]);
        } else if (a == "--quant" && has_value) {
            options.quant = argv[++i];
        } else if (a == "--repack" && has_value) {
            const std::string v = argv[++i];
            if (v != "auto" && v != "on" && v != "off") {
                return fail("--repack takes auto, on or off, not '" + v + "'");
            }
            options.repack = v == "on" ? elemental::Repack::On : v == "off" ? elemental::Repack::Off : elemental::Repack::Auto;
        } else if (a == "-h" || a == "--help") {
            std::printf("usage: elemental-native-classify [--threads N] [--quant Q8_0] [--repack auto|on|off] "
                        "MODEL_DIR PHOTO|FOLDER...\n");
            return 0;
        } else if (a.rfind("--", 0) == 0) {
            return fail("unknown option " + a);
        } else {
            args.push_back(a);
        }
    }
    if (args.size() < 2) {
        return fail("usage: elemental-native-classify [options] MODEL_DIR PHOTO|FOLDER...");
    }
    elemental::Error error;
    const auto classifier = elemental::Classifier::open(args[0], options, error);
    if (!classifier) {
        return fail(error.message);
    }
    const auto & labels = classifier->labels();
    for (size_t a = 1; a < args.size(); a++) {
        for (const std::string & path : photos_in(args[a])) {
            elemental::RgbImage photo;
            std::string why;
            if (!elemental::tools::load_photo(path, photo, why)) {
                return fail(why);
            }
            elemental::Prediction p;
            if ((error = classifier->classify(photo.pixels.data(), photo.pixels.size(), photo.width, photo.height, p))) {
                return fail(path + ": " + error.message);
            }
            nlohmann::ordered_json line;
            line["path"] = path;
            line["label"] = p.label;
            line["top_k"] = nlohmann::ordered_json::array({{p.label, p.probabilities[p.label_index]}});
            nlohmann::ordered_json probs = nlohmann::ordered_json::object();
            for (size_t i = 0; i < labels.size(); i++) {
                probs[labels[i]] = p.probabilities[i];
            }
            line["probabilities"] = probs;
            line["ms"] = std::round(p.ms * 100.0) / 100.0;
            std::printf("%s\n", line.dump().c_str());
            std::fflush(stdout);
        }
    }
    return 0;
}
