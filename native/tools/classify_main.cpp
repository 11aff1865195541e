// elemental-native-classify MODEL_DIR PHOTO|FOLDER...: what `elemental classify --model_path MODEL_DIR` prints,
// one JSON line per photo, computed by the native library (the code the Android app runs).
//
// Options: --threads N, --quant Q8_0|Q4_0|Q4_K_M|F16, --repack auto|on|off, --backend-dir DIR (a GGML_BACKEND_DL
// build's libggml-cpu-*.so; default: ../lib beside the executable, as `make native-arm64` lays it out).
// `--print-backend [MODEL_DIR]` prints one JSON line naming the CPU backend variant llama.cpp loaded, its features
// and the default thread count (the big cores, read from /sys/devices/system/cpu or --cpu-sysfs DIR); with a model:
// where its weights landed (e.g. CPU_REPACK), its threads and which files this open hashed (the others were vouched
// for by verified.json), and exits.
//
// Bad input of the run (an option, a photo argument that does not exist, an export the library refuses, a
// backend folder without backends): one `error:` line and exit code 2 before any photo is classified. A photo
// that fails on its own (it does not decode, its format is not one the tool reads, it is over the pixel cap or too
// wide or tall for the model) does not stop the run: it gets a JSON line {"path", "error"} in its place and an
// `error:` line on stderr, the other photos are classified, and the exit code is 2 once all are done.
#include "elemental/classifier.h"
#include "photo.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <charconv>
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

// Photos of a folder as `elemental classify` takes them: elemental.images.IMAGE_SUFFIXES, searched recursively,
// sorted by path components as pathlib sorts. The list is Python's, not what the tool decodes, so that both
// tools yield the same files from a folder; a WebP, TIFF, HEIC or AVIF then gets its own error line.
std::vector<std::string> photos_in(const std::string & arg) {
    static const std::vector<std::string> exts = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp",
                                                  ".gif", ".tif",  ".tiff", ".heic", ".heif", ".avif"};
    if (!fs::is_directory(arg)) {
        return {arg};
    }
    std::vector<fs::path> found;
    for (const auto & entry : fs::recursive_directory_iterator(arg, fs::directory_options::skip_permission_denied)) {
        std::string ext = entry.path().extension().string();
        std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
        if (!entry.is_directory() && std::find(exts.begin(), exts.end(), ext) != exts.end()) {
            found.push_back(entry.path());
        }
    }
    std::sort(found.begin(), found.end());
    return {found.begin(), found.end()};
}

// --threads: a whole number from 0 (the big cores) to ggml's thread limit. atoi took "abc" as 0 (the default) and
// handed "100000" to ggml, which crashed on it (the library refuses it too now: this names the option).
bool parse_threads(const std::string & text, int & out) {
    const char * end = text.data() + text.size();
    int value = 0;
    const auto [stop, ec] = std::from_chars(text.data(), end, value);
    if (text.empty() || text[0] == '-' || ec != std::errc() || stop != end || value > elemental::kMaxThreads) {
        return false;
    }
    out = value;
    return true;
}

// One photo that failed: its JSON line where its answer would be, and the reason on stderr.
void photo_failed(const std::string & path, const std::string & message) {
    nlohmann::ordered_json line;
    line["path"] = path;
    line["error"] = message;
    std::printf("%s\n", line.dump().c_str());
    std::fflush(stdout);
    std::fprintf(stderr, "error: %s\n", message.c_str());
}

// A GGML_BACKEND_DL build's backends, laid out as `make native-arm64` does: bin/this-tool, lib/libggml-cpu-*.so.
std::string default_backend_dir() {
    std::error_code ec;
    const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
    return ec ? std::string() : (exe.parent_path().parent_path() / "lib").string();
}

}  // namespace

int main(int argc, char ** argv) {
    elemental::Options options;
    std::vector<std::string> args;
    bool print_backend = false;
    bool backend_dir_given = false;
    std::string cpu_sysfs = "/sys/devices/system/cpu";
    for (int i = 1; i < argc; i++) {
        const std::string a = argv[i];
        const bool has_value = i + 1 < argc;
        if (a == "--threads" && has_value) {
            const std::string v = argv[++i];
            if (!parse_threads(v, options.n_threads)) {
                return fail("--threads takes a whole number from 0 (the big cores) to " + std::to_string(elemental::kMaxThreads) +
                            ", not '" + v + "'");
            }
        } else if (a == "--quant" && has_value) {
            options.quant = argv[++i];
        } else if (a == "--repack" && has_value) {
            const std::string v = argv[++i];
            if (v != "auto" && v != "on" && v != "off") {
                return fail("--repack takes auto, on or off, not '" + v + "'");
            }
            options.repack = v == "on" ? elemental::Repack::On : v == "off" ? elemental::Repack::Off : elemental::Repack::Auto;
        } else if (a == "--backend-dir" && has_value) {
            options.backend_dir = argv[++i];
            backend_dir_given = true;
        } else if (a == "--print-backend") {
            print_backend = true;
        } else if (a == "--cpu-sysfs" && has_value) {
            cpu_sysfs = argv[++i];
        } else if (a == "-h" || a == "--help") {
            std::printf("usage: elemental-native-classify [--threads N] [--quant Q8_0] [--repack auto|on|off] "
                        "[--backend-dir DIR] MODEL_DIR PHOTO|FOLDER...\n"
                        "       elemental-native-classify [--backend-dir DIR] [--cpu-sysfs DIR] [options] --print-backend "
                        "[MODEL_DIR]\n");
            return 0;
        } else if (a.rfind("--", 0) == 0) {
            return fail("unknown option " + a);
        } else {
            args.push_back(a);
        }
    }
    if (!backend_dir_given) {
        options.backend_dir = default_backend_dir();
        std::error_code ec;
        if (!fs::is_directory(options.backend_dir, ec)) {
            options.backend_dir.clear();  // a build with its backends linked in (make native) needs none
        }
    }
    elemental::Error error;
    if (print_backend) {
        elemental::BackendInfo backend;
        if ((error = elemental::cpu_backend(options.backend_dir, backend))) {
            return fail(error.message);
        }
        nlohmann::ordered_json line;
        line["backend"] = "CPU";
        line["variant"] = backend.variant;
        line["library"] = backend.library;
        nlohmann::ordered_json features = nlohmann::ordered_json::object();
        for (const auto & [name, value] : backend.features) {
            features[name] = value;
        }
        line["features"] = features;
        line["default_threads"] = elemental::default_threads(cpu_sysfs);
        if (!args.empty()) {  // and where a model's weights land with these options (CPU_REPACK: repacked)
            const auto classifier = elemental::Classifier::open(args[0], options, error);
            if (!classifier) {
                return fail(error.message);
            }
            line["repack"] = classifier->repack();
            line["weight_buffers"] = classifier->weight_buffers();
            line["threads"] = classifier->n_threads();
            line["hashed"] = classifier->hashed_files();
        }
        std::printf("%s\n", line.dump().c_str());
        return 0;
    }
    if (args.size() < 2) {
        return fail("usage: elemental-native-classify [options] MODEL_DIR PHOTO|FOLDER...");
    }
    for (size_t a = 1; a < args.size(); a++) {  // as `elemental classify`: a named path must exist
        std::error_code ec;
        if (!fs::exists(args[a], ec)) {
            return fail("photo not found: " + args[a]);
        }
    }
    const auto classifier = elemental::Classifier::open(args[0], options, error);
    if (!classifier) {
        return fail(error.message);
    }
    const auto & labels = classifier->labels();
    bool any_failed = false;
    for (size_t a = 1; a < args.size(); a++) {
        for (const std::string & path : photos_in(args[a])) {
            elemental::RgbImage photo;
            std::string why;
            if (!elemental::tools::load_photo(path, classifier->photo_max_side(), photo, why)) {
                photo_failed(path, why);
                any_failed = true;
                continue;
            }
            elemental::Prediction p;
            if ((error = classifier->classify(photo.pixels.data(), photo.pixels.size(), photo.width, photo.height, p))) {
                photo_failed(path, path + ": " + error.message);
                any_failed = true;
                continue;
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
    return any_failed ? 2 : 0;
}
