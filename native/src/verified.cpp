#include "verified.h"

#include <nlohmann/json.hpp>

extern "C" {
#include "sha256/sha256.h"
}

#include <sys/stat.h>

#include <cstdio>
#include <fstream>
#include <vector>

namespace elemental::detail {

std::string join(const std::string & folder, const std::string & name) {
    return folder.empty() || folder.back() == '/' ? folder + name : folder + "/" + name;
}

namespace {

using json = nlohmann::json;

bool file_sha256(const std::string & path, std::string & hex) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        return false;
    }
    sha256_t state;
    sha256_init(&state);
    std::vector<char> buf(1 << 20);
    while (in) {
        in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
        const std::streamsize n = in.gcount();
        if (n > 0) {
            sha256_update(&state, reinterpret_cast<const unsigned char *>(buf.data()), static_cast<size_t>(n));
        }
    }
    if (in.bad()) {
        return false;
    }
    unsigned char digest[SHA256_DIGEST_SIZE];
    sha256_final(&state, digest);
    static const char * hexdigits = "0123456789abcdef";
    hex.clear();
    for (unsigned char b : digest) {
        hex += hexdigits[b >> 4];
        hex += hexdigits[b & 15];
    }
    return true;
}

// Size and modification time in ms (what java.io.File.lastModified() gives, so Kotlin can write the stamp).
bool file_stat(const std::string & path, long long & size, long long & mtime_ms) {
    struct stat st {};
    if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
        return false;
    }
    size = static_cast<long long>(st.st_size);
    mtime_ms = static_cast<long long>(st.st_mtim.tv_sec) * 1000 + st.st_mtim.tv_nsec / 1000000;
    return true;
}

}  // namespace

VerifiedStamp::VerifiedStamp(std::string folder) : folder_(std::move(folder)) {
    std::ifstream in(join(folder_, kFile));
    if (!in) {
        return;
    }
    const json stamp = json::parse(in, nullptr, /*allow_exceptions*/ false);
    if (!stamp.is_object() || stamp.value("format", 0) != 1 || !stamp.contains("files") || !stamp["files"].is_object()) {
        return;
    }
    for (const auto & [name, info] : stamp["files"].items()) {
        if (info.is_object() && info.value("size", json()).is_number_integer() &&
            info.value("mtime_ms", json()).is_number_integer() && info.value("sha256", json()).is_string()) {
            entries_[name] = {info["size"].get<long long>(), info["mtime_ms"].get<long long>(),
                              info["sha256"].get<std::string>()};
        }
    }
}

Error VerifiedStamp::check(const std::string & name, const std::string & sha256, long long size, bool & hashed) {
    const std::string path = join(folder_, name);
    const std::string listed = " (listed in " + join(folder_, "manifest.json") + ")";
    long long have = 0, mtime_ms = 0;
    if (!file_stat(path, have, mtime_ms)) {
        return {"GGUF file missing or unreadable: " + path + listed};
    }
    if (have != size) {
        return {path + " is " + std::to_string(have) + " bytes, the manifest says " + std::to_string(size)};
    }
    const auto known = entries_.find(name);
    hashed = !(known != entries_.end() && known->second.size == have && known->second.mtime_ms == mtime_ms &&
               known->second.sha256 == sha256);
    if (!hashed) {
        return {};
    }
    std::string digest;
    if (!file_sha256(path, digest)) {
        return {"GGUF file missing or unreadable: " + path + listed};
    }
    if (digest != sha256) {
        entries_.erase(name);
        changed_ = true;
        return {path + ": sha256 " + digest.substr(0, 12) + "... differs from " + join(folder_, "manifest.json") +
                " (file changed or from another export; copy the export again)"};
    }
    entries_[name] = {have, mtime_ms, digest};
    changed_ = true;
    return {};
}

void VerifiedStamp::save() const {
    if (!changed_) {
        return;
    }
    json files = json::object();
    for (const auto & [name, e] : entries_) {
        files[name] = {{"size", e.size}, {"mtime_ms", e.mtime_ms}, {"sha256", e.sha256}};
    }
    const std::string path = join(folder_, kFile);
    const std::string tmp = path + ".tmp";
    {
        std::ofstream out(tmp, std::ios::trunc);
        out << json{{"format", 1}, {"files", files}}.dump(2) << "\n";
        if (!out.flush()) {
            std::remove(tmp.c_str());
            return;
        }
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        std::remove(tmp.c_str());
    }
}

}  // namespace elemental::detail
