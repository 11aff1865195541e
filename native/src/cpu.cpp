// How many threads a photo gets by default: the CPU's big cores.
#include "elemental/classifier.h"

#include "ggml.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <thread>
#include <vector>

namespace elemental {

static_assert(kMaxThreads == GGML_MAX_N_THREADS, "kMaxThreads must be ggml's thread limit");

namespace {

// The integer in a one-line sysfs file; -1 when absent or unreadable.
long long read_number(const std::filesystem::path & path) {
    std::ifstream in(path);
    long long value = -1;
    return in >> value ? value : -1;
}

}  // namespace

int default_threads(const std::string & cpu_dir) {
    const unsigned hw = std::thread::hardware_concurrency();
    const int all = static_cast<int>(std::clamp(hw, 1u, static_cast<unsigned>(kMaxThreads)));
    std::vector<long long> top_freq;  // cpuinfo_max_freq of each online CPU whose cpufreq is readable
    std::error_code ec;
    for (const auto & entry : std::filesystem::directory_iterator(cpu_dir, ec)) {
        const std::string name = entry.path().filename().string();
        if (name.size() < 4 || name.compare(0, 3, "cpu") != 0 ||
            !std::all_of(name.begin() + 3, name.end(), [](unsigned char c) { return std::isdigit(c); })) {
            continue;
        }
        if (read_number(entry.path() / "online") == 0) {  // cpu0 has no "online" file: it is always online
            continue;
        }
        const long long freq = read_number(entry.path() / "cpufreq" / "cpuinfo_max_freq");
        if (freq > 0) {
            top_freq.push_back(freq);
        }
    }
    if (top_freq.size() < 2) {
        return all;  // no cpufreq (desktop VMs, emulators): every core
    }
    const long long slowest = *std::min_element(top_freq.begin(), top_freq.end());
    const auto big = std::count_if(top_freq.begin(), top_freq.end(), [slowest](long long f) { return f > slowest; });
    return big == 0 ? static_cast<int>(std::min<size_t>(top_freq.size(), kMaxThreads)) : static_cast<int>(big);
}

}  // namespace elemental
