// An export's files checked against manifest.json: by sha256 the first time, by a stamp after that.
//
// Hashing both GGUF files (hundreds of MB) at every open costs a phone seconds of cold start. So the first
// successful check of a file is recorded in `verified.json` beside it (its size, its modification time in
// ms and the digest that matched), and a later open trusts a file whose size and time still match that
// record and whose recorded digest is the one the manifest asks for. ModelStore (Kotlin) writes the same
// stamp when it installs a model, having hashed the bytes as they arrived. A file rewritten in place with
// the same size and time would slip through: that needs someone writing into the app's private storage,
// who could equally rewrite manifest.json.
#pragma once

#include "elemental/classifier.h"

#include <map>
#include <string>

namespace elemental::detail {

// `folder`/`name` (no doubled slash): the paths of an export's files.
std::string join(const std::string & folder, const std::string & name);

class VerifiedStamp {
public:
    static constexpr const char * kFile = "verified.json";

    // Reads `folder`/verified.json; an absent, unreadable or foreign stamp is an empty one.
    explicit VerifiedStamp(std::string folder);

    // Checks that `folder`/`name` has `size` bytes and the given sha256 (lower-case hex), hashing it unless
    // the stamp vouches for it. `hashed` tells which happened. The error names the file and what differs.
    Error check(const std::string & name, const std::string & sha256, long long size, bool & hashed);

    // Writes the stamp (temp file + rename) when a check hashed a file. Best effort: a read-only folder
    // keeps no stamp, and every open then hashes again.
    void save() const;

private:
    struct Entry {
        long long size = -1;
        long long mtime_ms = -1;
        std::string sha256;
    };
    std::string folder_;
    std::map<std::string, Entry> entries_;
    bool changed_ = false;
};

}  // namespace elemental::detail
