// CPU row kernels of the NumPy backend, compiled at run time by the host
// C++ compiler (see arcface_ce/_cpu_kernels.py) and called through ctypes,
// which releases the GIL: the backend's worker threads run them in
// parallel on disjoint row ranges.
//
// They do exactly what the NumPy block code of _numpy_backend.py does, in
// one pass over each row instead of six ufunc calls:
//
//   shift  = scale * max_{j != t} x[j]     (-inf, with sumexp 0, when
//                                           no such x[j] is finite)
//   e[j]   = exp(min(max(scale * x[j] - shift, floor), 0))
//   e[t]   = 0                              (t = the row's target column)
//   sumexp = sum_j e[j]
//
// and optionally keep e[] in a caller's output row. The row is read from
// memory once (for the max); the exponential pass finds it in cache.
// float16 and bfloat16 logits are computed in float32, like float32 ones;
// their outputs cannot hold unnormalised exponentials, so mce_cpu_write_*
// writes them from the logits and the per-row factors:
//
//   out[j] = sign * exp((scale * x[j] - shift) + offset),  out[t] = 0
//
// with offset = log|a| - (M - shift), 0 below the floor, inf past 88.
//
// The exponential is a Cody-Waite range reduction and a polynomial, written
// so that the compiler vectorises it without -ffast-math (NaN still
// propagates, the summation order is fixed). Its argument is clamped to
// [floor, 0] with floor >= -87 (float) or -700 (double), so results are
// always normal numbers and no special cases are needed.

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// float16 and bfloat16 as bit patterns. The conversions are branch-free
// bit arithmetic, so that loops over them vectorise; float -> 16 bits
// rounds to nearest even and keeps NaN a (quiet) NaN.
struct f16 {
    uint16_t bits;
};
struct bf16 {
    uint16_t bits;
};

inline float as_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline uint32_t as_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float to_compute(float v) { return v; }
inline double to_compute(double v) { return v; }
inline float to_compute(bf16 v) { return as_float(uint32_t(v.bits) << 16); }
inline float to_compute(f16 v) {
    uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
    uint32_t em = v.bits & 0x7FFFu;
    // Exponent rebias by a multiplication (also right for subnormals).
    uint32_t finite = as_bits(as_float(em << 13) * 0x1p112f);
    uint32_t special = 0x7F800000u | (em << 13);  // inf, NaN
    return as_float((em >= 0x7C00u ? special : finite) | sign);
}

template <typename T>
inline T from_compute(float v);
template <typename T>
inline T from_compute(double v);
template <>
inline float from_compute<float>(float v) { return v; }
template <>
inline double from_compute<double>(double v) { return v; }
template <>
inline bf16 from_compute<bf16>(float v) {
    uint32_t u = as_bits(v);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;  // quiet NaN, sign and payload kept
    return bf16{uint16_t(v != v ? nan : rounded)};
}
template <>
inline f16 from_compute<f16>(float v) {
    uint32_t u = as_bits(v);
    uint32_t sign = (u >> 16) & 0x8000u;
    u &= 0x7FFFFFFFu;
    // Overflow to inf (NaN stays NaN).
    uint32_t big = u > 0x7F800000u ? 0x7E00u : 0x7C00u;
    // Subnormal or zero: let the FPU round by adding 0.5f.
    uint32_t sub = as_bits(as_float(u) + 0.5f) - 0x3F000000u;
    // Normal: rebias, round to nearest even on the 13 dropped bits.
    uint32_t odd = (u >> 13) & 1u;
    uint32_t norm = (u + 0xC8000FFFu + odd) >> 13;
    uint32_t r = u >= 0x47800000u ? big : (u < 0x38800000u ? sub : norm);
    return f16{uint16_t(r | sign)};
}

template <typename T>
struct Compute {
    using type = float;
};
template <>
struct Compute<double> {
    using type = double;
};

constexpr int64_t kChunk = 1024;  // elements summed per double accumulation
constexpr int kLanes = 16;        // independent partial sums in a chunk

inline float exp_poly(float x) {
    const float magic = 12582912.0f;  // 1.5 * 2**23: round to integer
    float t = x * 1.44269504088896341f + magic;
    float n = t - magic;
    int32_t ti;
    std::memcpy(&ti, &t, sizeof ti);
    int32_t ni = ti - 0x4B400000;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float z = r * r;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * z + r + 1.0f;
    int32_t sb = (ni + 127) << 23;
    float s;
    std::memcpy(&s, &sb, sizeof s);
    return y * s;
}

inline double exp_poly(double x) {
    const double magic = 6755399441055744.0;  // 1.5 * 2**52
    double t = x * 1.4426950408889634074 + magic;
    double n = t - magic;
    int64_t ti;
    std::memcpy(&ti, &t, sizeof ti);
    int64_t ni = ti - INT64_C(0x4338000000000000);
    double r = x - n * 6.93145751953125e-1;
    r = r - n * 1.42860682030941723212e-6;
    // Taylor series to degree 13: |r| <= 0.35 leaves < 1e-17 relative.
    double y = 1.0 / 6227020800.0;
    y = y * r + 1.0 / 479001600.0;
    y = y * r + 1.0 / 39916800.0;
    y = y * r + 1.0 / 3628800.0;
    y = y * r + 1.0 / 362880.0;
    y = y * r + 1.0 / 40320.0;
    y = y * r + 1.0 / 5040.0;
    y = y * r + 1.0 / 720.0;
    y = y * r + 1.0 / 120.0;
    y = y * r + 1.0 / 24.0;
    y = y * r + 1.0 / 6.0;
    y = y * r + 0.5;
    y = y * r + 1.0;
    y = y * r + 1.0;
    int64_t sb = (ni + 1023) << 52;
    double s;
    std::memcpy(&s, &sb, sizeof s);
    return y * s;
}

// Row maximum; NaN entries are skipped (they reach the sum instead, except
// in a row with no other finite value, see stats()).
template <typename T, typename TIn>
T row_max(const TIn* x, int64_t c) {
    T part[kLanes];
    for (int k = 0; k < kLanes; ++k) part[k] = -INFINITY;
    int64_t j = 0;
    for (; j + kLanes <= c; j += kLanes)
        for (int k = 0; k < kLanes; ++k) {
            T v = to_compute(x[j + k]);
            part[k] = v > part[k] ? v : part[k];
        }
    T m = -INFINITY;
    for (; j < c; ++j) {
        T v = to_compute(x[j]);
        m = v > m ? v : m;
    }
    for (int k = 0; k < kLanes; ++k) m = part[k] > m ? part[k] : m;
    return m;
}

template <typename TIn>
bool any_nan(const TIn* x, int64_t c, int64_t skip) {
    for (int64_t j = 0; j < c; ++j)
        if (j != skip && to_compute(x[j]) != to_compute(x[j])) return true;
    return false;
}

// e[0:len] = exp(clamp(scale * x - shift, floor, 0)); returns the sum.
template <typename T, typename TIn>
double exp_chunk(const TIn* x, T* e, int64_t len, T scale, T shift, T floor,
                 int64_t target) {
    for (int64_t j = 0; j < len; ++j) {
        const T v = to_compute(x[j]) * scale - shift;
        // Clamped to [floor, 0] for exp_poly (NaN passes both tests);
        // below the floor the term is 0: it is < 1e-26 of the row's
        // largest term, and a -inf (masked) logit must get exactly 0.
        T c = v < floor ? floor : v;
        c = c > T(0) ? T(0) : c;
        const T ev = exp_poly(c);
        e[j] = v < floor ? T(0) : ev;
    }
    if (target >= 0 && target < len) e[target] = T(0);
    T part[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= len; j += kLanes)
        for (int k = 0; k < kLanes; ++k) part[k] += e[j + k];
    double sum = 0.0;
    for (; j < len; ++j) sum += e[j];
    for (int k = 0; k < kLanes; ++k) sum += part[k];
    return sum;
}

template <typename TIn, typename T = typename Compute<TIn>::type>
void stats(const TIn* x, int64_t ldx, int64_t rows, int64_t c,
           const int64_t* tcol, double scale_d, double floor_d,
           double* shift_out, double* sum_out, T* ex, int64_t ldex) {
    const T scale = T(scale_d), floor = T(floor_d);
    T tmp[kChunk];
    for (int64_t i = 0; i < rows; ++i) {
        const TIn* xr = x + i * ldx;
        // The max skips the target, whose raw value may be anything (it is
        // clamped to a cosine before use): an infinite target must not
        // make the row's shift infinite.
        const int64_t t = tcol[i];
        T m;
        if (t >= 0 && t < c) {
            T a = row_max<T>(xr, t), b = row_max<T>(xr + t + 1, c - t - 1);
            m = a > b ? a : b;
        } else {
            m = row_max<T>(xr, c);
        }
        if (m == -INFINITY) {
            // No finite non-target logit: exactly no mass, (-inf, 0) as
            // from a rank without columns (the clamp would invent some);
            // unless a NaN was skipped by the max: then a NaN row.
            const bool nan = any_nan(xr, c, t);
            shift_out[i] = -INFINITY;
            sum_out[i] = nan ? double(NAN) : 0.0;
            if (ex)
                for (int64_t j = 0; j < c; ++j) ex[i * ldex + j] = T(0);
            continue;
        }
        // +inf (an infinite logit, or scale * x overflowing) is kept:
        // inf - inf makes the row's sum NaN, and so its loss and gradient.
        T shift = m * scale;
        double sum = 0.0;
        for (int64_t j0 = 0; j0 < c; j0 += kChunk) {
            int64_t len = c - j0 < kChunk ? c - j0 : kChunk;
            T* e = ex ? ex + i * ldex + j0 : tmp;
            sum += exp_chunk(xr + j0, e, len, scale, shift, floor,
                             tcol[i] - j0);
        }
        shift_out[i] = double(shift);
        sum_out[i] = sum;
    }
}

template <typename TIn, typename T = typename Compute<TIn>::type>
void write_rows(const TIn* x, int64_t ldx, int64_t rows, int64_t c,
                const int64_t* tcol, double scale_d, const double* shift,
                const double* offset, const double* sign, double floor_d,
                TIn* out, int64_t ldo) {
    const T scale = T(scale_d), floor = T(floor_d);
    // exp() of more than this is past the type's range.
    const T top = sizeof(T) == 4 ? T(88) : T(709);
    for (int64_t i = 0; i < rows; ++i) {
        const TIn* xr = x + i * ldx;
        TIn* o = out + i * ldo;
        const T sh = T(shift[i]), off = T(offset[i]), sg = T(sign[i]);
        for (int64_t j = 0; j < c; ++j) {
            // (scale x - sh) is formed first, as in the statistics pass:
            // both terms may be large, their difference is small; the
            // small offset is added after.
            const T v = (to_compute(xr[j]) * scale - sh) + off;
            // Below the floor: 0 (the result would be subnormal, and a
            // -inf logit gets exactly 0); above `top`: inf.
            const T e = sg * exp_poly(v < floor ? floor : (v > top ? top : v));
            const T r = v < floor ? T(0) : (v > top ? sg * T(INFINITY) : e);
            o[j] = from_compute<TIn>(r);
        }
        if (tcol[i] >= 0 && tcol[i] < c) o[tcol[i]] = from_compute<TIn>(T(0));
    }
}

template <typename T>
void scale_rows(T* out, int64_t ld, int64_t rows, int64_t c,
                const double* factor) {
    for (int64_t i = 0; i < rows; ++i) {
        T f = T(factor[i]);
        T* o = out + i * ld;
        for (int64_t j = 0; j < c; ++j) o[j] *= f;
    }
}

}  // namespace

// The exported functions, one set per logits type T (name suffix S); E is
// the type the exponentials are kept in (the compute type).
//
// mce_cpu_stats_S: row statistics of `rows` rows of x (row stride ldx
// elements, c columns); tcol[i] is row i's local target column or -1; ex
// (row stride ldex) may be null, otherwise it receives the exponentials.
// mce_cpu_write_S: output rows from the logits, the row's own shift, the
// offset log|a| - (M - shift) and the sign of a (see the header comment).
// mce_cpu_scale_S: out[i, :] *= factor[i].
#define MCE_EXPORT_STATS_WRITE(S, T, E)                                     \
    void mce_cpu_stats_##S(const T* x, int64_t ldx, int64_t rows,           \
                           int64_t c, const int64_t* tcol, double scale,    \
                           double floor, double* shift, double* sum, E* ex, \
                           int64_t ldex) {                                  \
        stats(x, ldx, rows, c, tcol, scale, floor, shift, sum, ex, ldex);   \
    }                                                                       \
    void mce_cpu_write_##S(const T* x, int64_t ldx, int64_t rows,           \
                           int64_t c, const int64_t* tcol, double scale,    \
                           const double* shift, const double* offset,       \
                           const double* sign, double floor, T* out,        \
                           int64_t ldo) {                                   \
        write_rows(x, ldx, rows, c, tcol, scale, shift, offset, sign,       \
                   floor, out, ldo);                                        \
    }
#define MCE_EXPORT_SCALE(S, T)                                              \
    void mce_cpu_scale_##S(T* out, int64_t ld, int64_t rows, int64_t c,     \
                           const double* factor) {                          \
        scale_rows(out, ld, rows, c, factor);                               \
    }

extern "C" {

MCE_EXPORT_STATS_WRITE(f32, float, float)
MCE_EXPORT_STATS_WRITE(f64, double, double)
MCE_EXPORT_STATS_WRITE(f16, f16, float)
MCE_EXPORT_STATS_WRITE(bf16, bf16, float)
MCE_EXPORT_SCALE(f32, float)
MCE_EXPORT_SCALE(f64, double)

// Exponential of the kernels, for tests of its accuracy.
void mce_cpu_exp_f32(const float* x, float* y, int64_t n) {
    for (int64_t j = 0; j < n; ++j) y[j] = exp_poly(x[j]);
}

void mce_cpu_exp_f64(const double* x, double* y, int64_t n) {
    for (int64_t j = 0; j < n; ++j) y[j] = exp_poly(x[j]);
}

// The 16-bit conversions of the kernels, for exhaustive tests.
void mce_cpu_widen_f16(const f16* x, float* y, int64_t n) {
    for (int64_t j = 0; j < n; ++j) y[j] = to_compute(x[j]);
}

void mce_cpu_widen_bf16(const bf16* x, float* y, int64_t n) {
    for (int64_t j = 0; j < n; ++j) y[j] = to_compute(x[j]);
}

void mce_cpu_narrow_f16(const float* x, f16* y, int64_t n) {
    for (int64_t j = 0; j < n; ++j) y[j] = from_compute<f16>(x[j]);
}

void mce_cpu_narrow_bf16(const float* x, bf16* y, int64_t n) {
    for (int64_t j = 0; j < n; ++j) y[j] = from_compute<bf16>(x[j]);
}

}  // extern "C"
