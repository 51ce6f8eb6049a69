// Margin softmax cross-entropy (ArcFace / CosFace / SphereFace) kernels.
//
// Notation: N rows, C classes held by this rank, class_start the global id
// of this rank's first class. For row i the local target column is
// yl = label[i] - class_start; the row owns its target iff 0 <= yl < C.
// Scaled logits: z_ij = scale * x_ij, except the owned target whose value
// is z_t = scale * (cos(m1 * acos(clamp(x_i,yl, -1, 1)) + m2) - m3).
//
// Kernels (templates over the logits type T and the label type L, the
// instantiations are listed from Python as NVRTC name expressions):
//   mce_row_stats_warp     one warp per row, final stats; for short rows.
//   mce_row_stats_chunk    2-D grid (chunk, row), online max/sum partials.
//   mce_row_stats_combine  folds the chunk partials into the stats, in
//                          chunk order (deterministic).
//   mce_write              elementwise softmax / gradient over N x C.
//
// Stats layout, [N, 4] float64: shift (max of the non-target z), sumexp
// (sum of exp(z - shift) over non-target columns), the target z_t (0 if
// not owned), owned (1.0 or 0.0). Arithmetic is done in the accumulate
// type: float for half, bfloat16 and float logits, double for double.
//
// A bad label is not an error here: the row simply does not own a target.
// No device-side assert or trap is used. All sizes and indices are 64-bit.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Threads per block; a multiple of the warp size, at most 1024.
#ifndef BLOCK_SIZE
#define BLOCK_SIZE 256
#endif

// Columns handled by one block of mce_row_stats_chunk.
#ifndef CHUNK_SIZE
#define CHUNK_SIZE 4096
#endif

// Distance in radians kept between theta = acos(x) and the poles 0 and pi
// in the derivative of the margin, so that it stays finite at |x| = 1.
#ifndef THETA_EPS
#define THETA_EPS 1e-6
#endif

#define PI_DOUBLE 3.141592653589793

#define WARP_SIZE 32
#define NUM_WARPS (BLOCK_SIZE / WARP_SIZE)
#define FULL_MASK 0xffffffffu

static_assert(BLOCK_SIZE % WARP_SIZE == 0, "BLOCK_SIZE: whole warps");
static_assert(BLOCK_SIZE <= 1024, "BLOCK_SIZE: at most 1024 threads");
static_assert(CHUNK_SIZE > 0, "CHUNK_SIZE must be positive");

// ---------------------------------------------------------------------------
// Accumulate type, conversions and math in that type.
// ---------------------------------------------------------------------------

template <typename T>
struct AccType {
  typedef float type;
};
template <>
struct AccType<double> {
  typedef double type;
};

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

// Store rounds once, to nearest even.
__device__ __forceinline__ void store(__half* p, float v) {
  *p = __float2half_rn(v);
}
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

__device__ __forceinline__ float acc_exp(float v) { return expf(v); }
__device__ __forceinline__ double acc_exp(double v) { return exp(v); }
__device__ __forceinline__ float acc_acos(float v) { return acosf(v); }
__device__ __forceinline__ double acc_acos(double v) { return acos(v); }
__device__ __forceinline__ float acc_cos(float v) { return cosf(v); }
__device__ __forceinline__ double acc_cos(double v) { return cos(v); }
__device__ __forceinline__ float acc_sin(float v) { return sinf(v); }
__device__ __forceinline__ double acc_sin(double v) { return sin(v); }
__device__ __forceinline__ float acc_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double acc_sqrt(double v) { return sqrt(v); }

__device__ __forceinline__ float neg_inf(float) {
  return __int_as_float(0xff800000);
}
__device__ __forceinline__ double neg_inf(double) {
  return __longlong_as_double(0xfff0000000000000LL);
}

// ---------------------------------------------------------------------------
// Margin and its derivative.
// ---------------------------------------------------------------------------

// clamp(v, -1, 1) that keeps a NaN a NaN (fminf/fmaxf would drop it).
template <typename A>
__device__ __forceinline__ A clamp_cos(A v) {
  return v < A(-1) ? A(-1) : (v > A(1) ? A(1) : v);
}

// z_t = scale * (cos(m1 * acos(c) + m2) - m3), c = clamp(x, -1, 1).
// 1. Clamp first: a cosine rounded to 1.0000001 would make acos NaN.
// 2. Without angular margin (m1 == 1, m2 == 0) cos(acos(c)) is c; use c
//    itself rather than round-tripping through acos and cos.
// 3. In double whatever the logits type (once per row): in float, where
//    cos(m1 theta + m2) is near 0 its absolute error of about ulp(theta)
//    becomes tens of ulp of z_t; rounded once to A at the end.
template <typename A>
__device__ __forceinline__ A margin_target(double x, double m1, double m2,
                                           double m3, double scale) {
  const double c = clamp_cos(x);
  if (m1 == 1.0 && m2 == 0.0) {
    return A(scale * (c - m3));
  }
  return A(scale * (cos(m1 * acos(c) + m2) - m3));
}

// d(cos(m1 * theta + m2)) / dx with theta = acos(c), c = clamp(x, -1, 1):
//   m1 * sin(m1 * theta + m2) / sin(theta).
// 1. Exactly 1 without angular margin (m1 == 1, m2 == 0), whatever x.
// 2. theta is kept in [THETA_EPS, pi - THETA_EPS]: at |x| = 1 sin(theta)
//    would be 0. Clamping the angle (not sin(theta)) keeps the right limit
//    where one exists: m1^2 for SphereFace (m2 == 0), whose numerator
//    vanishes with sin(theta). sin(theta) is then accurate to a few ulp,
//    where sqrt(1 - c^2) would lose digits to cancellation near |c| = 1.
// 3. In double whatever A (it runs once per row, on the target only): near
//    theta = pi a float angle is 2.4e-7 coarse, a quarter of THETA_EPS,
//    which would move 1 / sin(theta) by 10 %.
template <typename A>
__device__ __forceinline__ A margin_dtdx(A x, double m1, double m2) {
  if (m1 == 1.0 && m2 == 0.0) {
    return A(1);
  }
  const double lo = THETA_EPS;
  const double hi = PI_DOUBLE - THETA_EPS;
  double theta = acos(clamp_cos(static_cast<double>(x)));
  theta = theta < lo ? lo : (theta > hi ? hi : theta);
  return A(m1 * sin(m1 * theta + m2) / sin(theta));
}

// Largest finite value of each logits type.
__device__ __forceinline__ float max_finite(__half) { return 65504.0f; }
__device__ __forceinline__ float max_finite(__nv_bfloat16) {
  return 3.38953139e38f;
}
__device__ __forceinline__ float max_finite(float) { return 3.40282347e38f; }
__device__ __forceinline__ double max_finite(double) {
  return 1.7976931348623157e308;
}

// Clamp to [-max, max] of the output type, keeping a NaN a NaN: the target
// gradient grows like 1 / sin(theta) near |x| = 1 and would overflow a
// float16 output to infinity.
template <typename T, typename A>
__device__ __forceinline__ A saturate(A v) {
  const A big = A(max_finite(T()));
  return v < -big ? -big : (v > big ? big : v);
}

// ---------------------------------------------------------------------------
// 16-byte loads and stores.
//
// Rows are read VEC elements at a time (four floats, two doubles, eight
// halves or bfloat16s: one 128-bit transaction per thread) from the first
// 16-byte boundary of the range on; the elements before it and the tail
// after the last whole vector are read one by one. Under the CPU emulation
// a misaligned vector access stops the launch with an error, as it would
// fault on a GPU.
// ---------------------------------------------------------------------------

template <typename T>
struct alignas(16) Pack {
  static const int VEC = 16 / sizeof(T);
  T v[VEC];
};

template <typename T>
__device__ __forceinline__ void check_aligned(const T* p) {
#ifdef ARCFACE_CE_EMULATE
  if (reinterpret_cast<unsigned long long>(p) % 16 != 0) {
    arcface_emu::fail("misaligned 16-byte access at %p",
                      static_cast<const void*>(p));
  }
#else
  (void)p;
#endif
}

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  check_aligned(p);
  return *reinterpret_cast<const Pack<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& v) {
  check_aligned(p);
  *reinterpret_cast<Pack<T>*>(p) = v;
}

// Elements of T from p to the next 16-byte boundary (0 when aligned).
template <typename T>
__device__ __forceinline__ long long head_elems(const T* p) {
  const unsigned long long off = reinterpret_cast<unsigned long long>(p) % 16;
  return off == 0 ? 0 : static_cast<long long>((16 - off) / sizeof(T));
}

// ---------------------------------------------------------------------------
// Online max / sum of exponentials.
//
// A pair (m, s) stands for s = sum_k exp(z_k - m) over the values seen so
// far, m their maximum; the empty pair is (-inf, 0). Keeping the sum
// relative to the running maximum means no exp() ever overflows, and one
// pass over the data suffices.
// ---------------------------------------------------------------------------

// Add one value z to (m, s):
//   z > m:  s' = s * exp(m - z) + 1,  m' = z   (rescale to the new max)
//   else:   s' = s + exp(z - m)
// z = -inf adds exp(-inf) = 0 and is skipped (-inf - -inf would be NaN);
// a NaN z fails both tests of the first branch and poisons s, as it should.
template <typename A>
__device__ __forceinline__ void online_add(A z, A& m, A& s) {
  if (z > m) {
    s = s * acc_exp(m - z) + A(1);
    m = z;
  } else if (!(z == neg_inf(z))) {
    s += acc_exp(z - m);
  }
}

// Merge (m2, s2) into (m, s):
//   M = max(m, m2),  s' = s * exp(m - M) + s2 * exp(m2 - M).
// Both empty stays empty. Symmetric in its two operands (the sum of two
// products commutes), so the shuffle tree below gives the same bits on
// every lane.
template <typename A>
__device__ __forceinline__ void online_merge(A& m, A& s, A m2, A s2) {
  const A top = m > m2 ? m : m2;
  if (top == neg_inf(top)) {
    return;
  }
  s = s * acc_exp(m - top) + s2 * acc_exp(m2 - top);
  m = top;
}

// Butterfly over the 32 lanes of a warp: every lane ends with the merge of
// all lanes. Full mask: every lane of the warp must call it.
template <typename A>
__device__ __forceinline__ void warp_merge(A& m, A& s) {
  for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
    const A m2 = __shfl_xor_sync(FULL_MASK, m, offset);
    const A s2 = __shfl_xor_sync(FULL_MASK, s, offset);
    online_merge(m, s, m2, s2);
  }
}

// Merge over the block: warps first, then warp 0 merges the NUM_WARPS
// warp results staged in shared memory. Thread 0 holds the result. Every
// thread of the block must call it (it synchronises twice).
template <typename A>
__device__ __forceinline__ void block_merge(A& m, A& s, A* shared_m,
                                            A* shared_s) {
  const int lane = threadIdx.x % WARP_SIZE;
  const int warp = threadIdx.x / WARP_SIZE;
  warp_merge(m, s);
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < NUM_WARPS ? shared_m[lane] : neg_inf(m);
    s = lane < NUM_WARPS ? shared_s[lane] : A(0);
    warp_merge(m, s);
  }
  // The staging arrays are reused for the next row of the caller.
  __syncthreads();
}

// Fold x[begin:end), except the target column yl, into (m, s): thread
// `tid` of `nthreads` takes every nthreads-th element of the unaligned
// head, every nthreads-th 16-byte vector of the aligned middle (each
// thread reads whole vectors, consecutive threads consecutive vectors:
// coalesced), and every nthreads-th element of the tail.
template <typename T, typename A>
__device__ __forceinline__ void fold_range(const T* x, long long begin,
                                           long long end, long long yl,
                                           long long tid, long long nthreads,
                                           A scale, A& m, A& s) {
  const int VEC = Pack<T>::VEC;
  long long head = head_elems(x + begin);
  head = begin + (head < end - begin ? head : end - begin);
  for (long long j = begin + tid; j < head; j += nthreads) {
    if (j != yl) {
      online_add(scale * to_acc(x[j]), m, s);
    }
  }
  const long long nvec = (end - head) / VEC;
  for (long long k = tid; k < nvec; k += nthreads) {
    const long long j0 = head + k * VEC;
    const Pack<T> p = load_pack(x + j0);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (j0 + e != yl) {
        online_add(scale * to_acc(p.v[e]), m, s);
      }
    }
  }
  for (long long j = head + nvec * VEC + tid; j < end; j += nthreads) {
    if (j != yl) {
      online_add(scale * to_acc(x[j]), m, s);
    }
  }
}

// Write the [4] stats of one row given its non-target pair (m, s).
// The target is not part of (m, s): its margin-adjusted value z_t is kept
// apart, so the merge across ranks can form the loss as
// softplus(log S_other + M - z_t) without cancelling log S against z_t.
template <typename T, typename A>
__device__ __forceinline__ void write_row_stats(
    double* stats,    // [4] float64, out
    const T* x,       // [C] T, in: the row of logits
    long long yl,     // local target column (owned iff 0 <= yl < C)
    long long C, A m, A s, double m1, double m2, double m3, double scale) {
  const bool owned = yl >= 0 && yl < C;
  A target = A(0);
  if (owned) {
    const double xt = static_cast<double>(to_acc(x[yl]));
    target = margin_target<A>(xt, m1, m2, m3, scale);
  }
  stats[0] = static_cast<double>(m);
  stats[1] = static_cast<double>(s);
  stats[2] = static_cast<double>(target);
  stats[3] = owned ? 1.0 : 0.0;
}

// ---------------------------------------------------------------------------
// Kernels.
// ---------------------------------------------------------------------------

// Short rows: one warp per row, NUM_WARPS rows per block, rows in a
// grid-stride loop. Lanes read consecutive 16-byte vectors (coalesced, see
// fold_range), keep their own (m, s), and a butterfly merges the lanes. Launch: block BLOCK_SIZE,
// any grid.
template <typename T, typename L>
__global__ void mce_row_stats_warp(
    const T* __restrict__ logits,  // [N, C] T, in
    const L* __restrict__ label,   // [N] L, in: global class ids
    long long class_start,         // global id of local column 0
    long long N, long long C,      // rows, local classes
    double m1, double m2, double m3, double scale,
    double* __restrict__ stats) {  // [N, 4] float64, out
  typedef typename AccType<T>::type A;
  const A a_scale = A(scale);
  const int lane = threadIdx.x % WARP_SIZE;
  const long long first =
      (long long)blockIdx.x * NUM_WARPS + threadIdx.x / WARP_SIZE;
  const long long step = (long long)gridDim.x * NUM_WARPS;
  // The row depends on the warp only, so all lanes of a warp run the same
  // number of iterations and reach the shuffles together.
  for (long long row = first; row < N; row += step) {
    const T* x = logits + row * C;
    const long long yl = (long long)label[row] - class_start;
    A m = neg_inf(a_scale);
    A s = A(0);
    fold_range(x, 0, C, yl, lane, WARP_SIZE, a_scale, m, s);
    warp_merge(m, s);
    if (lane == 0) {
      write_row_stats(stats + row * 4, x, yl, C, m, s, m1, m2, m3, scale);
    }
  }
}

// Long rows, first step: block (blockIdx.x, blockIdx.y) reduces columns
// [chunk * CHUNK_SIZE, (chunk + 1) * CHUNK_SIZE) of row blockIdx.y (and of
// every gridDim.y-th row after it) to one (m, s) pair.
// 1. Each thread folds the vectors tid, tid + BLOCK_SIZE, ... of the chunk
//    (coalesced 16-byte loads, see fold_range) with online_add, skipping
//    the target column.
// 2. block_merge combines the BLOCK_SIZE pairs in a fixed tree.
// 3. Thread 0 stores the pair in partials[row, chunk, :].
// Launch: block BLOCK_SIZE, grid (min(num_chunks, 2^31 - 1),
// min(N, 65535)).
template <typename T, typename L>
__global__ void mce_row_stats_chunk(
    const T* __restrict__ logits,  // [N, C] T, in
    const L* __restrict__ label,   // [N] L, in: global class ids
    long long class_start,         // global id of local column 0
    long long N, long long C,      // rows, local classes
    long long num_chunks,          // ceil(C / CHUNK_SIZE), at least 1
    double scale,
    // [N, num_chunks, 2] accumulate type, out: (m, s) per row and chunk
    typename AccType<T>::type* __restrict__ partials) {
  typedef typename AccType<T>::type A;
  __shared__ A shared_m[NUM_WARPS];
  __shared__ A shared_s[NUM_WARPS];
  const A a_scale = A(scale);
  for (long long row = blockIdx.y; row < N; row += gridDim.y) {
    const T* x = logits + row * C;
    const long long yl = (long long)label[row] - class_start;
    for (long long chunk = blockIdx.x; chunk < num_chunks;
         chunk += gridDim.x) {
      const long long begin = chunk * CHUNK_SIZE;
      const long long end = begin + CHUNK_SIZE < C ? begin + CHUNK_SIZE : C;
      A m = neg_inf(a_scale);
      A s = A(0);
      fold_range(x, begin, end, yl, threadIdx.x, BLOCK_SIZE, a_scale, m, s);
      block_merge(m, s, shared_m, shared_s);
      if (threadIdx.x == 0) {
        A* out = partials + (row * num_chunks + chunk) * 2;
        out[0] = m;
        out[1] = s;
      }
    }
  }
}

// Long rows, second step: one thread per row folds the chunk partials in
// chunk order 0, 1, ... (the same order on every run: deterministic) and
// adds the target and ownership columns. Launch: block BLOCK_SIZE, any
// grid.
template <typename T, typename L>
__global__ void mce_row_stats_combine(
    const T* __restrict__ logits,  // [N, C] T, in
    const L* __restrict__ label,   // [N] L, in: global class ids
    long long class_start,         // global id of local column 0
    long long N, long long C,      // rows, local classes
    long long num_chunks,          // chunks per row in partials
    double m1, double m2, double m3, double scale,
    // [N, num_chunks, 2] accumulate type, in: (m, s) per row and chunk
    const typename AccType<T>::type* __restrict__ partials,
    double* __restrict__ stats) {  // [N, 4] float64, out
  typedef typename AccType<T>::type A;
  const A a_scale = A(scale);
  const long long step = (long long)gridDim.x * BLOCK_SIZE;
  for (long long row = (long long)blockIdx.x * BLOCK_SIZE + threadIdx.x;
       row < N; row += step) {
    const A* part = partials + row * num_chunks * 2;
    A m = neg_inf(a_scale);
    A s = A(0);
    for (long long chunk = 0; chunk < num_chunks; ++chunk) {
      online_merge(m, s, part[2 * chunk], part[2 * chunk + 1]);
    }
    const long long yl = (long long)label[row] - class_start;
    write_row_stats(stats + row * 4, logits + row * C, yl, C, m, s, m1, m2,
                    m3, scale);
  }
}

// Grid-stride loop of mce_write over "slots" of V consecutive elements of
// one row (V = 1, or V = Pack<T>::VEC when C is a multiple of it and both
// arrays start on a 16-byte boundary, so every slot is one aligned vector).
// The (row, slot) pair is advanced incrementally so only the first slot of
// a thread pays for a 64-bit division.
template <int V, typename T, typename L, typename A>
__device__ __forceinline__ void write_slots(
    T* __restrict__ out, const T* __restrict__ logits,
    const L* __restrict__ label, long long class_start, long long N,
    long long C, const double* __restrict__ row_max,
    const double* __restrict__ row_a, const double* __restrict__ row_t,
    int apply_dt, double m1, double m2, A scale) {
  const long long per_row = C / V;
  const long long total = N * per_row;
  const long long stride = (long long)gridDim.x * BLOCK_SIZE;
  long long idx = (long long)blockIdx.x * BLOCK_SIZE + threadIdx.x;
  if (idx >= total) {
    return;
  }
  long long row = idx / per_row;
  long long slot = idx - row * per_row;
  const long long row_step = stride / per_row;
  const long long slot_step = stride - row_step * per_row;
  long long cached_row = -1;
  long long yl = 0;
  A shift = A(0), a = A(0), t = A(0);
  for (; idx < total; idx += stride) {
    if (row != cached_row) {
      cached_row = row;
      yl = (long long)label[row] - class_start;
      shift = A(row_max[row]);
      a = A(row_a[row]);
      t = A(row_t[row]);
    }
    const long long e0 = row * C + slot * V;
    Pack<T> in, res;
    if (V == 1) {
      in.v[0] = logits[e0];
    } else {
      in = load_pack(logits + e0);
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const A x = to_acc(in.v[e]);
      A value;
      if (slot * V + e == yl) {
        value = apply_dt ? saturate<T>(t * margin_dtdx(x, m1, m2)) : t;
      } else {
        value = a * acc_exp(scale * x - shift);
      }
      store(&res.v[e], value);
    }
    if (V == 1) {
      out[e0] = res.v[0];
    } else {
      store_pack(out + e0, res);
    }
    slot += slot_step;
    row += row_step;
    if (slot >= per_row) {
      slot -= per_row;
      ++row;
    }
  }
}

// Softmax or gradient, elementwise over the N x C logits:
//   out_ij   = row_a_i * exp(z_ij - row_max_i)           (j != yl)
//   out_i,yl = row_t_i * (apply_dt ? dtdx(x_i,yl) : 1)   (owned target)
// the target saturating at the largest finite value of T.
// row_max_i >= every z_ij, so the exponent is <= 0 and cannot overflow.
// 16-byte loads and stores where C and the two arrays allow (see
// write_slots), else one element at a time; 64-bit indices. Launch: block
// BLOCK_SIZE, any grid.
template <typename T, typename L>
__global__ void mce_write(
    T* __restrict__ out,                 // [N, C] T, out
    const T* __restrict__ logits,        // [N, C] T, in
    const L* __restrict__ label,         // [N] L, in: global class ids
    long long class_start,               // global id of local column 0
    long long N, long long C,            // rows, local classes (C > 0)
    const double* __restrict__ row_max,  // [N] float64, in: global shift
    const double* __restrict__ row_a,    // [N] float64, in: non-target
    const double* __restrict__ row_t,    // [N] float64, in: target
    int apply_dt,                        // multiply the target by dtdx
    double m1, double m2, double m3, double scale) {
  typedef typename AccType<T>::type A;
  (void)m3;  // the derivative does not depend on the cosine margin
  const int VEC = Pack<T>::VEC;
  if (C % VEC == 0 && head_elems(out) == 0 && head_elems(logits) == 0) {
    write_slots<Pack<T>::VEC>(out, logits, label, class_start, N, C,
                              row_max, row_a, row_t, apply_dt, m1, m2,
                              A(scale));
  } else {
    write_slots<1>(out, logits, label, class_start, N, C, row_max, row_a,
                   row_t, apply_dt, m1, m2, A(scale));
  }
}
