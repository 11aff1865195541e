// The phone's call sequence, once: manifest checks, model loading, the cached instruction, and per photo
// the pre-shrink, the overview chunk and label scoring. elemental/classify/gguf.py is the same sequence
// in Python; tests/test_native.py holds the two to the same answers.
#include "elemental/classifier.h"
#include "elemental/photo.h"

#include "ggml-backend.h"
#include "llama.h"
#include "mtmd-helper.h"
#include "mtmd.h"

#include <nlohmann/json.hpp>

#include "verified.h"

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>

namespace elemental {
namespace {

using json = nlohmann::ordered_json;  // the manifest's files in their order: the first text GGUF is the default

constexpr const char * kFormat = "elemental-gguf/1";
constexpr const char * kManifest = "manifest.json";
constexpr const char * kAmxBuffer = "AMX";
constexpr llama_seq_id kSeq = 0;

// -- llama.cpp's log: the last warning/error (quoted in our errors) and the weight buffers of a load ----

struct LogCapture {
    std::mutex mutex;
    std::string last_problem;
    std::vector<std::string> buffers;  // "CPU_Mapped", "CPU_REPACK", "AMX", ... of the current load
    ggml_log_callback forward = nullptr;  // the callback before ours (the app's, or llama.cpp's default)
    void * forward_data = nullptr;
};

LogCapture & log_capture() {
    static LogCapture capture;
    return capture;
}

void on_log(ggml_log_level level, const char * text, void * /*user_data*/) {
    LogCapture & log = log_capture();
    {
        std::lock_guard<std::mutex> lock(log.mutex);
        std::string line(text ? text : "");
        while (!line.empty() && (line.back() == '\n' || line.back() == ' ')) {
            line.pop_back();
        }
        if ((level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR) && !line.empty()) {
            log.last_problem = line;
        }
        // "load_tensors:   CPU_REPACK model buffer size =    12.50 MiB"
        const size_t at = line.find(" model buffer size = ");
        if (at != std::string::npos) {
            const size_t start = line.find_last_of(' ', at - 1);
            log.buffers.push_back(line.substr(start == std::string::npos ? 0 : start + 1, at - start - 1));
        }
    }
    // Warnings and errors go on to the callback that was there before (the app's, or llama.cpp's own
    // stderr logger); its load and per-image chatter does not.
    if (log.forward && (level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR)) {
        log.forward(level, text, log.forward_data);
    }
}

std::string llama_said() {
    LogCapture & log = log_capture();
    std::lock_guard<std::mutex> lock(log.mutex);
    return log.last_problem.empty() ? std::string() : ": " + log.last_problem;
}

// A GGML_BACKEND_DL build's CPU backends in `dir`: one clear error unless the folder holds some.
Error check_backend_dir(const std::string & dir) {
    std::error_code ec;
    if (!std::filesystem::is_directory(dir, ec)) {
        return {"backend folder " + dir + " not found (this llama.cpp loads its CPU backend, libggml-cpu-*.so, from it)"};
    }
    for (const auto & entry : std::filesystem::directory_iterator(dir, ec)) {
        const std::string name = entry.path().filename().string();
        if (name.rfind("libggml-cpu", 0) == 0 && name.find(".so") != std::string::npos) {
            return {};
        }
    }
    return {"backend folder " + dir + " holds no libggml-cpu-*.so (this llama.cpp loads its CPU backend from it)"};
}

// Once per process: our log callback (chained to the app's), llama.cpp's backends, llama_backend_init.
// Returns the outcome of that first call every time.
Error init_llama(const std::string & backend_dir) {
    static std::once_flag once;
    static Error outcome;
    std::call_once(once, [&backend_dir] {
        LogCapture & log = log_capture();
        llama_log_get(&log.forward, &log.forward_data);
        if (log.forward == on_log) {
            log.forward = nullptr;
        }
        llama_log_set(on_log, nullptr);
        // A build with its backends linked in has registered them already; a GGML_BACKEND_DL build has none yet.
        if (ggml_backend_reg_by_name("CPU") == nullptr) {
            if (backend_dir.empty()) {
                ggml_backend_load_all();  // beside the executable
            } else if (!(outcome = check_backend_dir(backend_dir))) {
                ggml_backend_load_all_from_path(backend_dir.c_str());
            }
            if (!outcome && ggml_backend_reg_by_name("CPU") == nullptr) {
                outcome.message = backend_dir.empty()
                    ? "no CPU backend (libggml-cpu-*.so) found beside the executable: pass the folder that holds them"
                    : "no CPU backend in " + backend_dir + " runs on this CPU" + llama_said();
            }
        }
        if (!outcome) {
            llama_backend_init();
        }
    });
    llama_log_set(on_log, nullptr);
    mtmd_helper_log_set(on_log, nullptr);
    return outcome;
}

// -- files --------------------------------------------------------------------------------------------

using detail::join;

// -- the CPU: AMX ------------------------------------------------------------------------------------

// Whether this CPU may have AMX: its flags say so, or they cannot be read (assume the worst).
bool cpu_may_have_amx() {
    std::ifstream in("/proc/cpuinfo");
    if (!in) {
        return true;
    }
    std::string line;
    bool read_flags = false;
    while (std::getline(in, line)) {
        if (line.rfind("flags", 0) == 0 || line.rfind("Features", 0) == 0) {
            read_flags = true;
            std::istringstream words(line.substr(line.find(':') + 1));
            std::string flag;
            while (words >> flag) {
                if (flag == "amx_tile" || flag == "amx_int8" || flag == "amx_bf16") {
                    return true;
                }
            }
            break;
        }
    }
    return !read_flags;
}

bool build_has_amx() {
    return std::strstr(llama_print_system_info(), "AMX_INT8 = 1") != nullptr;
}

// -- manifest ------------------------------------------------------------------------------------------

struct FileEntry {
    std::string name, sha256, role, quant;
    long long size = -1;
};

struct Manifest {
    std::vector<std::string> labels;
    std::string prompt_prefix, prompt_suffix, overview_start;
    std::vector<llama_token> prefix_ids, suffix_ids;
    std::vector<std::vector<llama_token>> label_ids;
    bool first_token_scoring = true;
    int n_image_tokens = 0;
    int photo_max_side = 0;
    int longest_edge = 0;  // the square side libmtmd brings a photo to
    std::vector<FileEntry> files;
};

// Reads `key` (dotted) of `root` as T; on a missing field or a wrong type sets `error` naming it.
template <typename T>
bool field(const json & root, const std::string & key, T & out, const std::string & where, Error & error) {
    const json * node = &root;
    std::string::size_type start = 0;
    while (true) {
        const auto dot = key.find('.', start);
        const std::string part = key.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
        if (!node->is_object() || !node->contains(part)) {
            error.message = where + ": field '" + key + "' is missing";
            return false;
        }
        node = &(*node)[part];
        if (dot == std::string::npos) {
            break;
        }
        start = dot + 1;
    }
    try {
        out = node->get<T>();
    } catch (const json::exception &) {
        error.message = where + ": field '" + key + "' has the wrong type (" + node->type_name() + ")";
        return false;
    }
    return true;
}

bool read_manifest(const std::string & folder, Manifest & m, Error & error) {
    std::error_code ec;
    if (!std::filesystem::is_directory(folder, ec)) {
        error.message = "model folder not found: " + folder;
        return false;
    }
    const std::string path = join(folder, kManifest);
    std::ifstream in(path);
    if (!in) {
        error.message = folder + " has no " + kManifest + ": not a folder written by `elemental export`";
        return false;
    }
    json root;
    try {
        root = json::parse(in);
    } catch (const json::parse_error & e) {
        error.message = path + ": not valid JSON (byte " + std::to_string(e.byte) + ")";
        return false;
    }
    std::string format;
    if (!field(root, "format", format, path, error)) {
        return false;
    }
    if (format != kFormat) {
        error.message = path + ": format '" + format + "' is not one this library reads (" + kFormat +
                        "): export again with this elemental, or use a matching library";
        return false;
    }
    json files;
    if (!field(root, "labels", m.labels, path, error) || !field(root, "prompt_prefix", m.prompt_prefix, path, error) ||
        !field(root, "prompt_suffix", m.prompt_suffix, path, error) ||
        !field(root, "prompt_prefix_token_ids", m.prefix_ids, path, error) ||
        !field(root, "prompt_suffix_token_ids", m.suffix_ids, path, error) ||
        !field(root, "label_token_ids", m.label_ids, path, error) ||
        !field(root, "first_token_scoring", m.first_token_scoring, path, error) ||
        !field(root, "image.n_image_tokens", m.n_image_tokens, path, error) ||
        !field(root, "image.overview_start_token", m.overview_start, path, error) ||
        !field(root, "image.photo_max_side", m.photo_max_side, path, error) ||
        !field(root, "image.longest_edge", m.longest_edge, path, error) ||
        !field(root, "files", files, path, error)) {
        return false;
    }
    if (m.longest_edge < 1 || m.photo_max_side < 1) {
        error.message = path + ": image.longest_edge and image.photo_max_side must be positive";
        return false;
    }
    if (m.labels.size() < 2 || m.label_ids.size() != m.labels.size()) {
        error.message = path + ": needs at least 2 labels and one token list per label";
        return false;
    }
    for (const auto & ids : m.label_ids) {
        if (ids.empty()) {
            error.message = path + ": a label has no token ids";
            return false;
        }
    }
    if (!files.is_object()) {
        error.message = path + ": field 'files' has the wrong type (" + std::string(files.type_name()) + ")";
        return false;
    }
    for (const auto & [name, info] : files.items()) {
        FileEntry f;
        f.name = name;
        const std::string where = path + " files['" + name + "']";
        if (!field(info, "sha256", f.sha256, where, error) || !field(info, "size_bytes", f.size, where, error) ||
            !field(info, "role", f.role, where, error) || !field(info, "quant", f.quant, where, error)) {
            return false;
        }
        m.files.push_back(f);
    }
    return true;
}

// The export's file of `role` (and `quant`), present, of the manifest's size and sha256 (hashed unless
// verified.json vouches for it; `hashed` collects the files this call hashed).
bool checked_file(const std::string & folder, const Manifest & m, const std::string & role, const std::string & quant,
                  detail::VerifiedStamp & stamp, std::string & path, std::vector<std::string> & hashed, Error & error) {
    const FileEntry * found = nullptr;
    std::string have;
    for (const auto & f : m.files) {
        if (f.role == role) {
            have += (have.empty() ? "" : ", ") + f.quant;
            if (quant.empty() || f.quant == quant) {
                found = &f;
                break;
            }
        }
    }
    if (!found) {
        error.message = join(folder, kManifest) + " lists no " + role + " GGUF" + (quant.empty() ? "" : " of type " + quant) +
                        "; it has [" + have + "]";
        return false;
    }
    path = join(folder, found->name);
    bool did_hash = false;
    if ((error = stamp.check(found->name, found->sha256, found->size, did_hash))) {
        return false;
    }
    if (did_hash) {
        hashed.push_back(found->name);
    }
    return true;
}

std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text) {
    std::vector<llama_token> ids(text.size() + 16);
    int n = llama_tokenize(vocab, text.data(), static_cast<int32_t>(text.size()), ids.data(),
                           static_cast<int32_t>(ids.size()), /*add_special*/ false, /*parse_special*/ true);
    if (n < 0) {
        ids.resize(static_cast<size_t>(-n));
        n = llama_tokenize(vocab, text.data(), static_cast<int32_t>(text.size()), ids.data(),
                           static_cast<int32_t>(ids.size()), false, true);
    }
    ids.resize(static_cast<size_t>(std::max(n, 0)));
    return ids;
}

std::string ids_text(const std::vector<llama_token> & ids) {
    std::string s = "[";
    for (size_t i = 0; i < ids.size(); i++) {
        s += (i ? ", " : "") + std::to_string(ids[i]);
    }
    return s + "]";
}

}  // namespace

// -- the classifier ------------------------------------------------------------------------------------

struct Classifier::Impl {
    Manifest manifest;
    std::string text_path, mmproj_path;
    llama_model * model = nullptr;
    llama_context * ctx = nullptr;
    mtmd_context * mctx = nullptr;
    const llama_vocab * vocab = nullptr;
    std::vector<llama_token> overview_start;
    std::vector<std::string> weight_buffers;
    std::vector<std::string> hashed_files;
    bool repack = true;
    int n_threads = 1;
    int n_batch = 0;
    int n_vocab = 0;
    llama_pos n_prefix = 0;

    ~Impl() {
        if (mctx) {
            mtmd_free(mctx);
        }
        if (ctx) {
            llama_free(ctx);
        }
        if (model) {
            llama_model_free(model);
        }
    }

    Error load_model(Repack choice);
    Error open_context();
    Error decode(const std::vector<llama_token> & tokens);
    Error truncate(llama_pos n_past);
    Error last_logprobs(std::vector<double> & out);
    Error overview_chunk(const mtmd_input_chunks * chunks, const mtmd_input_chunk *& chunk);
};

Error Classifier::Impl::load_model(Repack choice) {
    repack = choice == Repack::On || (choice == Repack::Auto && !(build_has_amx() && cpu_may_have_amx()));
    for (int attempt = 0; attempt < 2; attempt++) {
        llama_model_params params = llama_model_default_params();
        params.use_extra_bufts = repack;
        {
            std::lock_guard<std::mutex> lock(log_capture().mutex);
            log_capture().buffers.clear();
        }
        model = llama_model_load_from_file(text_path.c_str(), params);
        if (!model) {
            return {"llama.cpp could not load " + text_path + llama_said()};
        }
        {
            std::lock_guard<std::mutex> lock(log_capture().mutex);
            weight_buffers = log_capture().buffers;
        }
        if (weight_buffers.empty()) {
            return {"llama.cpp loaded " + text_path + " without reporting its weight buffers: cannot check them for AMX"};
        }
        if (std::find(weight_buffers.begin(), weight_buffers.end(), kAmxBuffer) == weight_buffers.end()) {
            return {};
        }
        // Weights in an AMX buffer crash at the first matmul (llama.cpp#20824): load again without repacking.
        llama_model_free(model);
        model = nullptr;
        repack = false;
    }
    return {"llama.cpp put the weights of " + text_path + " in an AMX buffer even without repacking"};
}

Error Classifier::Impl::open_context() {
    const Manifest & m = manifest;
    size_t longest_label = 0;
    for (const auto & ids : m.label_ids) {
        longest_label = std::max(longest_label, ids.size());
    }
    const int prompt_len = static_cast<int>(m.prefix_ids.size() + m.suffix_ids.size());
    n_batch = std::max(512, prompt_len + m.n_image_tokens + static_cast<int>(longest_label) + 16);
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = static_cast<uint32_t>(n_batch);
    cparams.n_batch = cparams.n_ubatch = static_cast<uint32_t>(n_batch);  // a prompt or an image in one batch
    cparams.n_seq_max = 1;
    cparams.n_threads = cparams.n_threads_batch = n_threads;
    cparams.no_perf = true;
    ctx = llama_init_from_model(model, cparams);
    if (!ctx) {
        return {"llama.cpp could not start a context for " + text_path + llama_said()};
    }
    mtmd_context_params mparams = mtmd_context_params_default();
    mparams.n_threads = n_threads;
    mparams.print_timings = false;
    mctx = mtmd_init_from_file(mmproj_path.c_str(), model, mparams);
    if (!mctx) {
        return {"libmtmd could not load the projector " + mmproj_path + llama_said()};
    }
    vocab = llama_model_get_vocab(model);
    n_vocab = llama_vocab_n_tokens(vocab);
    return {};
}

Error Classifier::Impl::decode(const std::vector<llama_token> & tokens) {
    std::vector<llama_token> batch_tokens(tokens);  // llama_batch_get_one takes a non-const pointer
    const int rc = llama_decode(ctx, llama_batch_get_one(batch_tokens.data(), static_cast<int32_t>(batch_tokens.size())));
    if (rc != 0) {
        return {"llama.cpp failed to decode " + std::to_string(tokens.size()) + " tokens (code " + std::to_string(rc) +
                ")" + llama_said()};
    }
    return {};
}

Error Classifier::Impl::truncate(llama_pos n_past) {
    if (!llama_memory_seq_rm(llama_get_memory(ctx), kSeq, n_past, -1)) {
        return {"llama.cpp could not roll back its KV cache"};
    }
    return {};
}

Error Classifier::Impl::last_logprobs(std::vector<double> & out) {
    const float * logits = llama_get_logits_ith(ctx, -1);
    if (!logits) {
        return {"llama.cpp returned no logits for the last token" + llama_said()};
    }
    out.assign(logits, logits + n_vocab);
    const double top = *std::max_element(out.begin(), out.end());
    double total = 0.0;
    for (double v : out) {
        total += std::exp(v - top);
    }
    const double log_total = top + std::log(total);
    for (double & v : out) {
        v -= log_total;
    }
    return {};
}

// The image chunk right after the text chunk that opens the overview (ends with <global-img>).
Error Classifier::Impl::overview_chunk(const mtmd_input_chunks * chunks, const mtmd_input_chunk *& chunk) {
    std::vector<llama_token> previous;
    for (size_t i = 0; i < mtmd_input_chunks_size(chunks); i++) {
        const mtmd_input_chunk * c = mtmd_input_chunks_get(chunks, i);
        const auto type = mtmd_input_chunk_get_type(c);
        if (type == MTMD_INPUT_CHUNK_TYPE_TEXT) {
            size_t n = 0;
            const llama_token * t = mtmd_input_chunk_get_tokens_text(c, &n);
            previous.assign(t, t + n);
            continue;
        }
        const bool opens_overview = previous.size() >= overview_start.size() &&
                                    std::equal(overview_start.begin(), overview_start.end(),
                                               previous.end() - static_cast<long>(overview_start.size()));
        if (type == MTMD_INPUT_CHUNK_TYPE_IMAGE && opens_overview) {
            const size_t n = mtmd_input_chunk_get_n_tokens(c);
            if (static_cast<int>(n) != manifest.n_image_tokens) {
                return {mmproj_path + ": overview image is " + std::to_string(n) + " tokens, the manifest says " +
                        std::to_string(manifest.n_image_tokens)};
            }
            chunk = c;
            return {};
        }
        previous.clear();
    }
    return {mmproj_path + ": libmtmd gave no overview image chunk (not a SmolVLM mmproj?)"};
}

Classifier::Classifier(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Classifier::~Classifier() = default;

const std::vector<std::string> & Classifier::labels() const { return impl_->manifest.labels; }
int Classifier::photo_max_side() const { return impl_->manifest.photo_max_side; }
const std::vector<std::string> & Classifier::weight_buffers() const { return impl_->weight_buffers; }
bool Classifier::repack() const { return impl_->repack; }
int Classifier::n_threads() const { return impl_->n_threads; }
const std::vector<std::string> & Classifier::hashed_files() const { return impl_->hashed_files; }

std::unique_ptr<Classifier> Classifier::open(const std::string & folder, const Options & options, Error & error) {
    auto impl = std::make_unique<Impl>();
    Manifest & m = impl->manifest;
    if (options.n_threads < 0 || options.n_threads > kMaxThreads) {
        error.message = "threads must be 0 (the big cores) or 1.." + std::to_string(kMaxThreads) + ", not " +
                        std::to_string(options.n_threads);
        return nullptr;
    }
    detail::VerifiedStamp stamp(folder);
    if (!read_manifest(folder, m, error) ||
        !checked_file(folder, m, "text", options.quant, stamp, impl->text_path, impl->hashed_files, error) ||
        !checked_file(folder, m, "mmproj", "", stamp, impl->mmproj_path, impl->hashed_files, error)) {
        stamp.save();  // a file that was verified stays verified, whatever the other one did
        return nullptr;
    }
    stamp.save();
    impl->n_threads = options.n_threads > 0 ? options.n_threads : default_threads();
    if ((error = init_llama(options.backend_dir))) {
        return nullptr;
    }
    if ((error = impl->load_model(options.repack)) || (error = impl->open_context())) {
        return nullptr;
    }
    const std::vector<llama_token> prefix = tokenize(impl->vocab, m.prompt_prefix);
    const std::vector<llama_token> suffix = tokenize(impl->vocab, m.prompt_suffix);
    if (prefix != m.prefix_ids || suffix != m.suffix_ids) {
        const bool p = prefix != m.prefix_ids;
        error.message = impl->text_path + ": llama.cpp tokenizes " + (p ? "prompt_prefix" : "prompt_suffix") + " as " +
                        ids_text(p ? prefix : suffix) + ", the manifest says " + ids_text(p ? m.prefix_ids : m.suffix_ids) +
                        " (files from another export?)";
        return nullptr;
    }
    for (size_t i = 0; i < m.label_ids.size(); i++) {
        for (llama_token id : m.label_ids[i]) {
            if (id < 0 || id >= impl->n_vocab) {
                error.message = impl->text_path + ": label '" + m.labels[i] + "' has token id " + std::to_string(id) +
                                ", outside the vocabulary of " + std::to_string(impl->n_vocab) + " (files from another export?)";
                return nullptr;
            }
        }
    }
    impl->overview_start = tokenize(impl->vocab, m.overview_start);
    if (impl->overview_start.empty()) {
        error.message = impl->text_path + ": the manifest's overview_start_token has no tokens";
        return nullptr;
    }
    if ((error = impl->decode(m.prefix_ids))) {  // the photo-independent KV cache, computed once
        return nullptr;
    }
    impl->n_prefix = static_cast<llama_pos>(m.prefix_ids.size());
    return std::unique_ptr<Classifier>(new Classifier(std::move(impl)));
}

Error Classifier::classify_jpeg(const uint8_t * data, size_t size, Prediction & out) {
    const auto t0 = std::chrono::steady_clock::now();
    RgbImage photo;
    Error error = decode_photo(data, size, impl_->manifest.photo_max_side, photo);
    if (error || (error = classify(photo.pixels.data(), photo.pixels.size(), photo.width, photo.height, out))) {
        return error;
    }
    out.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return {};
}

Error Classifier::classify(const uint8_t * rgb, size_t size, int width, int height, Prediction & out) {
    const auto t0 = std::chrono::steady_clock::now();
    Impl & s = *impl_;
    if (!rgb || width < 1 || height < 1) {
        return {"bitmap is empty (" + std::to_string(width) + "x" + std::to_string(height) + ")"};
    }
    const unsigned long long needed = 3ULL * static_cast<unsigned>(width) * static_cast<unsigned>(height);
    if (size < needed) {
        return {"bitmap too small: " + std::to_string(size) + " bytes for a " + std::to_string(width) + "x" +
                std::to_string(height) + " RGB image (needs " + std::to_string(needed) + ")"};
    }
    const RgbImage photo = shrink_to(rgb, width, height, s.manifest.photo_max_side);
    // libmtmd brings the long side to the model's image size (manifest image.longest_edge, the mmproj's
    // preproc_image_size) and truncates the short one to an int (tools/mtmd/mtmd-image.cpp:1068/1072); at 0 px its
    // resize throws (:447) and mtmd_tokenize fails with a log line. Refused here first, by elemental/classify/gguf.py's
    // rule in its words and libmtmd's double arithmetic.
    const int longest_edge = s.manifest.longest_edge;
    const double aspect = static_cast<double>(photo.width) / photo.height;
    const int short_side = photo.width >= photo.height ? static_cast<int>(longest_edge / aspect)
                                                       : static_cast<int>(longest_edge * aspect);
    if (short_side < 1) {
        return {std::to_string(width) + "x" + std::to_string(height) + " photo is too wide or tall for the model: " +
                "brought to " + std::to_string(longest_edge) + " px on its long side, its short side is under 1 px"};
    }

    const mtmd::bitmap_ptr bitmap(mtmd_bitmap_init(static_cast<uint32_t>(photo.width),
                                                   static_cast<uint32_t>(photo.height), photo.pixels.data()));
    const mtmd::input_chunks_ptr chunks(mtmd_input_chunks_init());
    if (!bitmap || !chunks) {
        return {"libmtmd could not allocate a bitmap"};
    }
    const char * marker = mtmd_default_marker();  // the text is the marker alone: we bring our own tokens
    const mtmd_input_text text = {marker, std::strlen(marker), /*add_special*/ false, /*parse_special*/ true};
    const mtmd_bitmap * bitmaps[] = {bitmap.get()};
    const int32_t rc = mtmd_tokenize(s.mctx, chunks.get(), &text, bitmaps, 1);
    if (rc != 0) {
        return {"libmtmd could not preprocess a " + std::to_string(photo.width) + "x" + std::to_string(photo.height) +
                " image (code " + std::to_string(rc) + ")" + llama_said()};
    }
    const mtmd_input_chunk * overview = nullptr;
    Error error;
    if ((error = s.overview_chunk(chunks.get(), overview)) || (error = s.truncate(s.n_prefix))) {
        return error;
    }
    llama_pos n_past = s.n_prefix;  // the helper adds to it for text chunks: start at n_prefix
    if (mtmd_helper_eval_chunk_single(s.mctx, s.ctx, overview, s.n_prefix, kSeq, s.n_batch, false, &n_past) != 0) {
        return {"libmtmd failed to evaluate the image" + llama_said()};
    }
    std::vector<double> logp;
    if ((error = s.decode(s.manifest.suffix_ids)) || (error = s.last_logprobs(logp))) {
        return error;
    }
    const auto & label_ids = s.manifest.label_ids;
    std::vector<double> scores(label_ids.size(), 0.0);
    if (s.manifest.first_token_scoring) {
        for (size_t i = 0; i < label_ids.size(); i++) {
            scores[i] = logp[static_cast<size_t>(label_ids[i][0])];
        }
    } else {  // each label's tokens one by one, then back to the end of the prompt
        const llama_pos n_prompt = llama_memory_seq_pos_max(llama_get_memory(s.ctx), kSeq) + 1;
        for (size_t i = 0; i < label_ids.size(); i++) {
            std::vector<double> step = logp;
            for (size_t j = 0; j < label_ids[i].size(); j++) {
                scores[i] += step[static_cast<size_t>(label_ids[i][j])];
                if (j + 1 < label_ids[i].size() &&
                    ((error = s.decode({label_ids[i][j]})) || (error = s.last_logprobs(step)))) {
                    return error;
                }
            }
            if ((error = s.truncate(n_prompt))) {
                return error;
            }
        }
    }
    // Probabilities: softmax of the label scores over the labels; the answer: the first highest.
    const double top = *std::max_element(scores.begin(), scores.end());
    double total = 0.0;
    out.probabilities.assign(scores.size(), 0.0);
    for (size_t i = 0; i < scores.size(); i++) {
        out.probabilities[i] = std::exp(scores[i] - top);
        total += out.probabilities[i];
    }
    for (double & p : out.probabilities) {
        p /= total;
    }
    out.label_index = static_cast<int>(std::max_element(scores.begin(), scores.end()) - scores.begin());
    out.label = s.manifest.labels[static_cast<size_t>(out.label_index)];
    out.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return {};
}

Error cpu_backend(const std::string & backend_dir, BackendInfo & out) {
    Error error;
    if ((error = init_llama(backend_dir))) {
        return error;
    }
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("CPU");
    using features_fn = ggml_backend_feature * (*)(ggml_backend_reg_t);
    auto features = reinterpret_cast<features_fn>(ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features"));
    if (!features) {
        return {"llama.cpp's CPU backend does not list its features"};
    }
    out = {};
    for (const ggml_backend_feature * f = features(reg); f->name; f++) {
        out.features.emplace_back(f->name, f->value);
    }
    // The library the backend's code lives in: libggml-cpu-<variant>.so when loaded from a backend folder.
    Dl_info info{};
    if (dladdr(reinterpret_cast<void *>(features), &info) && info.dli_fname) {
        out.library = info.dli_fname;
    }
    const std::string name = std::filesystem::path(out.library).filename().string();
    const std::string prefix = "libggml-cpu-";
    const auto so = name.find(".so");
    out.variant = name.rfind(prefix, 0) == 0 && so != std::string::npos ? name.substr(prefix.size(), so - prefix.size())
                                                                          : "linked";
    return {};
}

}  // namespace elemental
