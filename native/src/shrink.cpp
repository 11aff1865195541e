// shrink_to(): a photo brought to the long side elemental trains and classifies at, with the same pixels
// as Pillow's `resize(size, LANCZOS, reducing_gap=1.0)` (elemental.images.bounded).
//
// Pillow does it in two steps, reproduced here from its documented behaviour and checked against it
// pixel for pixel by tests/test_native.py:
// 1. reduce: average blocks of fx x fy pixels, fx = int(width / target_width) (likewise fy), with 8-bit
//    rounding ((sum + n/2) * m) >> 24, m = (uint32)(2^32 / (256 n)) computed in float; the last column
//    and row average the pixels that are left.
// 2. resample the reduced image, whose box is (0, 0, width / fx, height / fy) in float, with a
//    separable Lanczos filter (support 3, stretched by the scale): per output pixel the weights are
//    taken around center = box0 + (i + 0.5) * scale, normalised, turned into 22-bit fixed point and
//    summed with rounding; the horizontal pass runs first, over the rows the vertical pass needs.
// This file is compiled with -ffp-contract=off: a fused multiply-add would change the weights' last bits.
#include "elemental/classifier.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace elemental {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;
constexpr double kLanczosSupport = 3.0;

double sinc(double x) {
    if (x == 0.0) {
        return 1.0;
    }
    x *= M_PI;
    return std::sin(x) / x;
}

double lanczos(double x) {
    return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3.0) : 0.0;
}

uint8_t clip8(int value) {
    const int v = value >> kPrecisionBits;  // arithmetic shift, as in Pillow
    return static_cast<uint8_t>(std::clamp(v, 0, 255));
}

// Per output pixel: the first input pixel and the fixed-point weights of the input pixels it reads.
struct Taps {
    std::vector<int> first;
    std::vector<std::vector<int32_t>> weights;
};

Taps lanczos_taps(int in_size, float in0, float in1, int out_size) {
    double scale = static_cast<double>(in1 - in0) / out_size;
    const double filterscale = std::max(scale, 1.0);
    const double support = kLanczosSupport * filterscale;
    const double inv_filterscale = 1.0 / filterscale;
    Taps taps;
    taps.first.resize(out_size);
    taps.weights.resize(out_size);
    for (int i = 0; i < out_size; i++) {
        const double center = in0 + (i + 0.5) * scale;
        const int lo = std::max(static_cast<int>(center - support + 0.5), 0);
        const int hi = std::min(static_cast<int>(center + support + 0.5), in_size);
        std::vector<double> w(std::max(hi - lo, 0));
        double total = 0.0;
        for (size_t k = 0; k < w.size(); k++) {
            w[k] = lanczos((static_cast<double>(k) + lo - center + 0.5) * inv_filterscale);
            total += w[k];
        }
        auto & fixed = taps.weights[i];
        fixed.resize(w.size());
        for (size_t k = 0; k < w.size(); k++) {
            const double v = total != 0.0 ? w[k] / total : w[k];
            fixed[k] = static_cast<int32_t>(v < 0 ? -0.5 + v * (1 << kPrecisionBits) : 0.5 + v * (1 << kPrecisionBits));
        }
        taps.first[i] = lo;
    }
    return taps;
}

// Pillow's reduction rounding: ((sum + n / 2) * m) >> 24 with m computed in single precision.
struct BlockMean {
    uint32_t amend, multiplier;
    explicit BlockMean(int n)
        : amend(static_cast<uint32_t>(n / 2)),
          multiplier(static_cast<uint32_t>(4294967296.0f / static_cast<float>(static_cast<uint32_t>(256 * n)))) {}
    uint8_t operator()(uint32_t sum) const { return static_cast<uint8_t>(((sum + amend) * multiplier) >> 24); }
};

RgbImage reduce(const RgbImage & in, int fx, int fy) {
    RgbImage out;
    out.width = (in.width + fx - 1) / fx;
    out.height = (in.height + fy - 1) / fy;
    out.pixels.resize(static_cast<size_t>(out.width) * out.height * 3);
    for (int y = 0; y < out.height; y++) {
        const int y0 = y * fy, y1 = std::min(y0 + fy, in.height);
        for (int x = 0; x < out.width; x++) {
            const int x0 = x * fx, x1 = std::min(x0 + fx, in.width);
            const BlockMean mean((x1 - x0) * (y1 - y0));
            uint32_t sum[3] = {0, 0, 0};
            for (int yy = y0; yy < y1; yy++) {
                const uint8_t * p = &in.pixels[(static_cast<size_t>(yy) * in.width + x0) * 3];
                for (int xx = x0; xx < x1; xx++, p += 3) {
                    sum[0] += p[0];
                    sum[1] += p[1];
                    sum[2] += p[2];
                }
            }
            uint8_t * o = &out.pixels[(static_cast<size_t>(y) * out.width + x) * 3];
            for (int c = 0; c < 3; c++) {
                o[c] = mean(sum[c]);
            }
        }
    }
    return out;
}

// Rows [row0, row0 + rows) of `in`, resampled horizontally to `taps.first.size()` columns.
RgbImage resample_rows(const RgbImage & in, const Taps & taps, int row0, int rows) {
    RgbImage out;
    out.width = static_cast<int>(taps.first.size());
    out.height = rows;
    out.pixels.resize(static_cast<size_t>(out.width) * rows * 3);
    for (int y = 0; y < rows; y++) {
        const uint8_t * line = &in.pixels[static_cast<size_t>(y + row0) * in.width * 3];
        uint8_t * o = &out.pixels[static_cast<size_t>(y) * out.width * 3];
        for (int x = 0; x < out.width; x++) {
            const auto & w = taps.weights[x];
            const uint8_t * p = line + static_cast<size_t>(taps.first[x]) * 3;
            int ss[3] = {1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1)};
            for (size_t k = 0; k < w.size(); k++, p += 3) {
                ss[0] += p[0] * w[k];
                ss[1] += p[1] * w[k];
                ss[2] += p[2] * w[k];
            }
            for (int c = 0; c < 3; c++) {
                o[x * 3 + c] = clip8(ss[c]);
            }
        }
    }
    return out;
}

// `in` resampled vertically; taps.first[] counts rows from `row0` of the original image.
RgbImage resample_columns(const RgbImage & in, const Taps & taps, int row0) {
    RgbImage out;
    out.width = in.width;
    out.height = static_cast<int>(taps.first.size());
    out.pixels.resize(static_cast<size_t>(out.width) * out.height * 3);
    const size_t stride = static_cast<size_t>(in.width) * 3;
    for (int y = 0; y < out.height; y++) {
        const auto & w = taps.weights[y];
        const uint8_t * top = &in.pixels[static_cast<size_t>(taps.first[y] - row0) * stride];
        uint8_t * o = &out.pixels[static_cast<size_t>(y) * stride];
        for (size_t i = 0; i < stride; i++) {
            int ss = 1 << (kPrecisionBits - 1);
            for (size_t k = 0; k < w.size(); k++) {
                ss += top[k * stride + i] * w[k];
            }
            o[i] = clip8(ss);
        }
    }
    return out;
}

// Pillow's ImagingResample for 8-bit RGB: horizontal pass (only where needed) over the rows the
// vertical pass reads, then the vertical pass (only where needed).
RgbImage resample(const RgbImage & in, int out_w, int out_h, const float box[4]) {
    const bool horizontal = out_w != in.width || box[0] != 0.0f || box[2] != static_cast<float>(out_w);
    const bool vertical = out_h != in.height || box[1] != 0.0f || box[3] != static_cast<float>(out_h);
    const Taps rows = lanczos_taps(in.height, box[1], box[3], out_h);
    const int first_row = rows.first.front();
    const int last_row = rows.first.back() + static_cast<int>(rows.weights.back().size());
    RgbImage tmp;
    const RgbImage * src = &in;
    int row0 = 0;
    if (horizontal) {
        tmp = resample_rows(in, lanczos_taps(in.width, box[0], box[2], out_w), first_row, last_row - first_row);
        src = &tmp;
        row0 = first_row;
    }
    if (vertical) {
        return resample_columns(*src, rows, row0);
    }
    return *src;
}

}  // namespace

RgbImage shrink_to(const uint8_t * rgb, int width, int height, int max_side) {
    RgbImage image;
    image.width = width;
    image.height = height;
    image.pixels.assign(rgb, rgb + static_cast<size_t>(width) * height * 3);
    const double scale = static_cast<double>(max_side) / std::max(width, height);
    if (scale >= 1.0) {
        return image;
    }
    // Python's round() rounds halves to even, as nearbyint does in the default rounding mode.
    const int out_w = std::max(1, static_cast<int>(std::nearbyint(width * scale)));
    const int out_h = std::max(1, static_cast<int>(std::nearbyint(height * scale)));
    const int fx = std::max(1, static_cast<int>(static_cast<double>(width) / out_w));
    const int fy = std::max(1, static_cast<int>(static_cast<double>(height) / out_h));
    // The reduction box Pillow computes around the whole image is the whole image.
    float box[4] = {0.0f, 0.0f, static_cast<float>(width), static_cast<float>(height)};
    if (fx > 1 || fy > 1) {
        image = reduce(image, fx, fy);
        box[2] = static_cast<float>(static_cast<double>(width) / fx);
        box[3] = static_cast<float>(static_cast<double>(height) / fy);
    }
    if (image.height > image.width * 100 && out_h < image.height) {
        // Pillow resizes extremely tall images one axis at a time.
        const float first[4] = {0.0f, box[1], static_cast<float>(image.width), box[3]};
        const RgbImage tall = resample(image, image.width, out_h, first);
        const float second[4] = {box[0], 0.0f, box[2], static_cast<float>(out_h)};
        return resample(tall, out_w, out_h, second);
    }
    return resample(image, out_w, out_h, box);
}

}  // namespace elemental
