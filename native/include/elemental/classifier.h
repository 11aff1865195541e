// elemental's on-device classifier: the one implementation of what an app runs per photo.
//
// It reads a folder written by `elemental export` (manifest.json, the text GGUF, the mmproj GGUF) and
// answers exactly as `elemental classify --model_path FOLDER` does through llama.cpp: the photo is
// brought to the manifest's `image.photo_max_side` with the filter training used (Pillow's reduce +
// Lanczos), libmtmd preprocesses it, only the overview image chunk is evaluated between the
// manifest's prompt tokens (the instruction's KV cache is computed once), and every label is scored
// from the next-token log-probabilities. Nothing is generated.
//
// Errors are values, never asserts or exceptions: every call that can fail returns an `Error` whose
// message names the file, field or step, and leaves the classifier usable (or not created).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace elemental {

// An error message; empty means success.
struct Error {
    std::string message;
    explicit operator bool() const { return !message.empty(); }
};

// llama.cpp's weight repacking ("extra buffer types"): the fast path on phones (Q8_0/Q4_0 with
// dotprod/i8mm kernels), a crash with llama.cpp's AMX kernels on Intel CPUs with AMX (llama.cpp#20824).
enum class Repack {
    Auto,  // on, unless this llama.cpp has AMX kernels and the CPU may have AMX
    On,    // on; weights that land in an AMX buffer are still loaded again without it
    Off,   // off (llama.cpp's --no-repack)
};

// The most threads llama.cpp computes with (ggml's GGML_MAX_N_THREADS); more is an error, not a crash.
constexpr int kMaxThreads = 512;

// The thread count a classifier gets by default: the CPU's big cores. ggml splits every matrix multiplication
// evenly over its threads and waits for the slowest, so on a phone's big.LITTLE CPU the little cores would hold
// the big ones back; the cores with the lowest top frequency (cpufreq's cpuinfo_max_freq) are left out. Where
// all cores are alike, or cpufreq is not readable (desktop VMs, emulators), every online core. `cpu_dir` is
// where Linux describes the CPUs (a parameter so tests can describe a phone's).
int default_threads(const std::string & cpu_dir = "/sys/devices/system/cpu");

struct Options {
    int n_threads = 0;           // 0: default_threads(); else 1..kMaxThreads
    Repack repack = Repack::Auto;
    // Which text GGUF of the export to load ("Q8_0", "Q4_0", ...); empty: the first one the manifest lists, as
    // `elemental classify` picks without --quant.
    std::string quant;
    // Only for a llama.cpp built with GGML_BACKEND_DL (the Android module and `make native-arm64` are): the
    // folder holding its libggml-cpu-<variant>.so, e.g. the app's nativeLibraryDir; the best variant for this
    // CPU is loaded from it. Empty: found next to the executable. Ignored by a build with backends linked in.
    std::string backend_dir;
};

// The CPU backend llama.cpp computes on, as ggml reports it.
struct BackendInfo {
    std::string variant;                // "armv8.2_2" for libggml-cpu-armv8.2_2.so; "linked" when built in
    std::string library;                // the file its code was loaded from
    std::vector<std::pair<std::string, std::string>> features;  // ggml's list: {"NEON", "1"}, {"SVE_CNT", "32"}, ...
};

// Loads llama.cpp's backends (once per process: the first call's `backend_dir`, as in Options, is the one
// used) and describes the CPU backend. Fails, naming the folder, when a GGML_BACKEND_DL build finds no
// folder, no libggml-cpu-*.so in it, or no variant that runs on this CPU.
Error cpu_backend(const std::string & backend_dir, BackendInfo & out);

struct Prediction {
    std::string label;                 // the most probable label
    int label_index = -1;              // its index in labels()
    std::vector<double> probabilities; // one per label, in labels() order, summing to 1
    double ms = 0.0;                   // time of classify(), pre-shrink included
};

// An 8-bit RGB image, rows top to bottom, 3 bytes per pixel, no padding.
struct RgbImage {
    int width = 0;
    int height = 0;
    std::vector<uint8_t> pixels;
};

// `rgb` brought to at most `max_side` on its long side (aspect kept, never upscaled) with the same
// arithmetic as Pillow's `Image.resize(size, LANCZOS, reducing_gap=1.0)`, which is how elemental's
// Python side shrinks photos (`images.bounded`): an integer box reduction, then Lanczos (a = 3) in
// 8-bit fixed point. The result is pixel-identical to Pillow's for RGB images (tested).
RgbImage shrink_to(const uint8_t * rgb, int width, int height, int max_side);

class Classifier {
public:
    // Opens an export folder: checks manifest.json (format, fields), every file's size and sha256 (hashing
    // only files that verified.json does not vouch for, then recording them there: see verified.h), loads the text model and the projector, checks that llama.cpp tokenizes the prompt as the
    // export recorded, and decodes the instruction once. Returns nullptr and sets `error` on failure.
    static std::unique_ptr<Classifier> open(const std::string & folder, const Options & options, Error & error);

    ~Classifier();
    Classifier(const Classifier &) = delete;
    Classifier & operator=(const Classifier &) = delete;

    // Classifies one photo given as RGB888 (`size` bytes, at least width * height * 3), upright.
    // One call at a time per Classifier (llama.cpp's context is not thread-safe); open one per thread.
    Error classify(const uint8_t * rgb, size_t size, int width, int height, Prediction & out);

    // Classifies a JPEG file's bytes, decoded here as `elemental classify` decodes it (elemental/photo.h: Pillow's
    // pixels, at the reduced scale photo_max_side allows, upright by EXIF): what an app should use for JPEGs, since
    // its platform decoder gives other pixels and a full-size bitmap. `out.ms` includes the decode.
    Error classify_jpeg(const uint8_t * data, size_t size, Prediction & out);

    const std::vector<std::string> & labels() const;
    // The long side classify() brings a photo down to first (manifest image.photo_max_side); classify_jpeg decodes
    // at the reduced scale this allows, and so may a caller that decodes photos itself.
    int photo_max_side() const;
    // Where the text model's weights live, as llama.cpp reported them at load ("CPU_Mapped", ...).
    const std::vector<std::string> & weight_buffers() const;
    bool repack() const;     // whether weight repacking ended up on
    // The export's files whose sha256 this open computed; the others were vouched for by verified.json.
    const std::vector<std::string> & hashed_files() const;
    int n_threads() const;

    struct Impl;

private:
    explicit Classifier(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
};

}  // namespace elemental
