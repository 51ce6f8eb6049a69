// CUDA built-ins for compiling the project's .cu kernels with a host C++17
// compiler and running them on the CPU (arcface_ce/_emulator.py).
//
// How the .cu sees it: the Python side compiles with -DARCFACE_CE_EMULATE=1,
// force-includes this header (-include cuda_emu.h) and puts this folder
// first on the include path, where cuda_fp16.h, cuda_bf16.h and
// cuda_runtime.h are stubs that include this header. So a .cu may include
// the real CUDA headers unconditionally, or guard them with
// `#ifndef ARCFACE_CE_EMULATE`; both work.
//
// Execution model (fiber.h): blocks run one after another; the threads of
// a block are cooperative fibers in forward or reverse thread order that
// switch only at __syncthreads and warp collectives. Hence:
//   - __shared__ is function-static storage: one copy, used by one block at
//     a time. It is filled with 0xff bytes (NaN / -1) at the start of every
//     block, as shared memory is uninitialised on a GPU. Dynamic shared
//     memory (`extern __shared__ T name[];`) is rewritten by the Python side
//     into a pointer to a static buffer, poisoned the same way.
//   - atomics are plain read-modify-write operations: fibers never
//     interleave between two switch points.
//   - __syncthreads must be reached by every thread of the block; a thread
//     that returned while others wait is reported as a deadlock (it is
//     undefined behaviour on a GPU).
//   - warp collectives (shuffles, votes, __syncwarp) wait for all lanes of
//     the warp: a lane that never arrives is reported as a deadlock, lanes
//     meeting different collectives as an error.
//
// NOT emulated (stay inside this when writing kernels):
//   - lockstep warps: code that relies on implicit warp synchronisation
//     without __syncwarp / *_sync collectives gives arbitrary results;
//   - partial masks: warp collectives need a mask naming every lane of the
//     warp (0xffffffff, or the existing lanes of a block's last, partial
//     warp); anything else raises. __activemask is not provided;
//   - reading a lane that does not exist (block size not a multiple of 32)
//     raises instead of returning an undefined value;
//   - the memory model: fences are compiler barriers only, no data race
//     can be observed, so races between blocks go unnoticed;
//   - inter-block communication: spinning on a flag set by another block
//     hangs, cooperative groups and grid-wide sync are absent;
//   - dynamic parallelism, textures/surfaces, constant-memory uploads,
//     clock(), __CUDA_ARCH__ (undefined here), device-side assert (it
//     aborts the process; use __trap(), which raises);
//   - __half / __nv_bfloat16 arithmetic operators: these types convert
//     implicitly to float, so `a + b` computes in float (exact for products,
//     possibly double-rounded for sums when stored back);
//   - floating-point contraction: the host compiler does not fuse a*b+c
//     into an FMA as nvcc does by default, so last-bit differences from a
//     GPU are expected;
//   - deep recursion or large local arrays: a fiber has 256 KiB of stack
//     (ARCFACE_EMU_STACK_BYTES); overflowing it hits a guard page and
//     crashes the process;
//   - concurrency: launches of one module from several OS threads run one
//     at a time (a mutex), blocks never run in parallel.

#ifndef ARCFACE_CE_EMU_CUDA_EMU_H
#define ARCFACE_CE_EMU_CUDA_EMU_H

#ifndef ARCFACE_CE_EMULATE
#define ARCFACE_CE_EMULATE 1
#endif

#include <math.h>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <utility>

#include "fiber.h"

// ---------------------------------------------------------------------------
// Qualifiers.
// ---------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static storage in a named section, poisoned per block by the scheduler.
#define __shared__ static __attribute__((section("arcface_emu_shared")))
// __restrict__ is a GNU C++ keyword already.

// ---------------------------------------------------------------------------
// Launch geometry: per fiber (threadIdx) or per block (the others).
// ---------------------------------------------------------------------------

using arcface_emu::dim3;
using arcface_emu::uint3;

#define threadIdx \
  (static_cast<const ::uint3&>(::arcface_emu::g_current->tid))
#define blockIdx (static_cast<const ::uint3&>(::arcface_emu::g_block_idx))
#define blockDim (static_cast<const ::dim3&>(::arcface_emu::g_block_dim))
#define gridDim (static_cast<const ::dim3&>(::arcface_emu::g_grid_dim))

constexpr int warpSize = 32;

// ---------------------------------------------------------------------------
// Vector types (alignment as in CUDA's vector_types.h).
// ---------------------------------------------------------------------------

#define ARCFACE_EMU_VEC2(T, N, A)                         \
  struct alignas(A) N##2 {                                \
    T x, y;                                               \
  };                                                      \
  __forceinline__ N##2 make_##N##2(T x, T y) { return {x, y}; }
#define ARCFACE_EMU_VEC3(T, N)                                  \
  struct N##3 {                                                 \
    T x, y, z;                                                  \
  };                                                            \
  __forceinline__ N##3 make_##N##3(T x, T y, T z) { return {x, y, z}; }
#define ARCFACE_EMU_VEC4(T, N, A)                                 \
  struct alignas(A) N##4 {                                        \
    T x, y, z, w;                                                 \
  };                                                              \
  __forceinline__ N##4 make_##N##4(T x, T y, T z, T w) {          \
    return {x, y, z, w};                                          \
  }

ARCFACE_EMU_VEC2(float, float, 8)
ARCFACE_EMU_VEC3(float, float)
ARCFACE_EMU_VEC4(float, float, 16)
ARCFACE_EMU_VEC2(double, double, 16)
ARCFACE_EMU_VEC3(double, double)
ARCFACE_EMU_VEC4(double, double, 16)
ARCFACE_EMU_VEC2(int, int, 8)
ARCFACE_EMU_VEC3(int, int)
ARCFACE_EMU_VEC4(int, int, 16)
ARCFACE_EMU_VEC2(unsigned int, uint, 8)
ARCFACE_EMU_VEC4(unsigned int, uint, 16)
ARCFACE_EMU_VEC2(long long, longlong, 16)
ARCFACE_EMU_VEC2(unsigned long long, ulonglong, 16)
ARCFACE_EMU_VEC2(short, short, 4)
ARCFACE_EMU_VEC4(short, short, 8)
ARCFACE_EMU_VEC2(unsigned short, ushort, 4)
ARCFACE_EMU_VEC4(unsigned short, ushort, 8)
ARCFACE_EMU_VEC4(char, char, 4)
ARCFACE_EMU_VEC4(unsigned char, uchar, 4)

__forceinline__ uint3 make_uint3(unsigned int x, unsigned int y,
                                 unsigned int z) {
  return {x, y, z};
}

// ---------------------------------------------------------------------------
// Bit casts and integer intrinsics.
// ---------------------------------------------------------------------------

namespace arcface_emu {
template <typename To, typename From>
__forceinline__ To bit_cast(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}
}  // namespace arcface_emu

__forceinline__ float __int_as_float(int v) {
  return arcface_emu::bit_cast<float>(v);
}
__forceinline__ int __float_as_int(float v) {
  return arcface_emu::bit_cast<int>(v);
}
__forceinline__ float __uint_as_float(unsigned int v) {
  return arcface_emu::bit_cast<float>(v);
}
__forceinline__ unsigned int __float_as_uint(float v) {
  return arcface_emu::bit_cast<unsigned int>(v);
}
__forceinline__ double __longlong_as_double(long long v) {
  return arcface_emu::bit_cast<double>(v);
}
__forceinline__ long long __double_as_longlong(double v) {
  return arcface_emu::bit_cast<long long>(v);
}
__forceinline__ int __double2hiint(double v) {
  return static_cast<int>(__double_as_longlong(v) >> 32);
}
__forceinline__ int __double2loint(double v) {
  return static_cast<int>(__double_as_longlong(v) & 0xffffffffLL);
}
__forceinline__ double __hiloint2double(int hi, int lo) {
  const unsigned long long bits =
      (static_cast<unsigned long long>(static_cast<unsigned int>(hi))
       << 32) |
      static_cast<unsigned int>(lo);
  return arcface_emu::bit_cast<double>(bits);
}

__forceinline__ int __popc(unsigned int v) { return __builtin_popcount(v); }
__forceinline__ int __popcll(unsigned long long v) {
  return __builtin_popcountll(v);
}
__forceinline__ int __clz(int v) {
  return v == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(v));
}
__forceinline__ int __clzll(long long v) {
  return v == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(v));
}
__forceinline__ int __ffs(int v) { return __builtin_ffs(v); }
__forceinline__ int __ffsll(long long v) { return __builtin_ffsll(v); }
__forceinline__ unsigned int __brev(unsigned int v) {
  v = ((v >> 1) & 0x55555555u) | ((v & 0x55555555u) << 1);
  v = ((v >> 2) & 0x33333333u) | ((v & 0x33333333u) << 2);
  v = ((v >> 4) & 0x0f0f0f0fu) | ((v & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(v);
}
__forceinline__ unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((1ull * a * b) >> 32);
}
__forceinline__ int __mulhi(int a, int b) {
  return static_cast<int>((1ll * a * b) >> 32);
}
__forceinline__ unsigned long long __umul64hi(unsigned long long a,
                                              unsigned long long b) {
  return static_cast<unsigned long long>(
      (static_cast<unsigned __int128>(a) * b) >> 64);
}

// ---------------------------------------------------------------------------
// Floating-point intrinsics that the C library lacks. The fast versions
// (__expf, ...) are computed exactly here; on a GPU they are approximate.
// ---------------------------------------------------------------------------

__forceinline__ float __expf(float x) { return expf(x); }
__forceinline__ float __exp10f(float x) { return powf(10.0f, x); }
__forceinline__ float __logf(float x) { return logf(x); }
__forceinline__ float __log2f(float x) { return log2f(x); }
__forceinline__ float __log10f(float x) { return log10f(x); }
__forceinline__ float __sinf(float x) { return sinf(x); }
__forceinline__ float __cosf(float x) { return cosf(x); }
__forceinline__ float __tanf(float x) { return tanf(x); }
__forceinline__ float __powf(float x, float y) { return powf(x, y); }
__forceinline__ void __sincosf(float x, float* s, float* c) {
  *s = sinf(x);
  *c = cosf(x);
}
__forceinline__ float __fdividef(float a, float b) { return a / b; }
__forceinline__ float __fdiv_rn(float a, float b) { return a / b; }
__forceinline__ float __fadd_rn(float a, float b) { return a + b; }
__forceinline__ float __fsub_rn(float a, float b) { return a - b; }
__forceinline__ float __fmul_rn(float a, float b) { return a * b; }
__forceinline__ float __fmaf_rn(float a, float b, float c) {
  return fmaf(a, b, c);
}
__forceinline__ float __frcp_rn(float x) { return 1.0f / x; }
__forceinline__ float __fsqrt_rn(float x) { return sqrtf(x); }
__forceinline__ double __dadd_rn(double a, double b) { return a + b; }
__forceinline__ double __dsub_rn(double a, double b) { return a - b; }
__forceinline__ double __dmul_rn(double a, double b) { return a * b; }
__forceinline__ double __ddiv_rn(double a, double b) { return a / b; }
__forceinline__ double __fma_rn(double a, double b, double c) {
  return fma(a, b, c);
}
__forceinline__ double __drcp_rn(double x) { return 1.0 / x; }
__forceinline__ double __dsqrt_rn(double x) { return sqrt(x); }
__forceinline__ float rsqrtf(float x) { return 1.0f / sqrtf(x); }
__forceinline__ double rsqrt(double x) { return 1.0 / sqrt(x); }
__forceinline__ float rcbrtf(float x) { return 1.0f / cbrtf(x); }
__forceinline__ double rcbrt(double x) { return 1.0 / cbrt(x); }
__forceinline__ float __saturatef(float x) {
  return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f);  // NaN -> 0
}
__forceinline__ float __int2float_rn(int v) { return static_cast<float>(v); }
__forceinline__ float __ll2float_rn(long long v) {
  return static_cast<float>(v);
}
__forceinline__ double __int2double_rn(int v) { return v; }
__forceinline__ double __ll2double_rn(long long v) {
  return static_cast<double>(v);
}
__forceinline__ float __double2float_rn(double v) {
  return static_cast<float>(v);
}
__forceinline__ int __float2int_rn(float v) {
  return static_cast<int>(nearbyintf(v));
}
__forceinline__ int __float2int_rz(float v) { return static_cast<int>(v); }
__forceinline__ int __float2int_rd(float v) {
  return static_cast<int>(floorf(v));
}
__forceinline__ int __float2int_ru(float v) {
  return static_cast<int>(ceilf(v));
}
__forceinline__ long long __float2ll_rn(float v) {
  return static_cast<long long>(nearbyintf(v));
}
__forceinline__ int __double2int_rn(double v) {
  return static_cast<int>(nearbyint(v));
}
__forceinline__ long long __double2ll_rn(double v) {
  return static_cast<long long>(nearbyint(v));
}

// CUDA's global min/max overloads for arithmetic types (common type).
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic_v<A> &&
                                      std::is_arithmetic_v<B>>>
__forceinline__ std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) > static_cast<C>(b) ? static_cast<C>(a)
                                               : static_cast<C>(b);
}
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic_v<A> &&
                                      std::is_arithmetic_v<B>>>
__forceinline__ std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a)
                                               : static_cast<C>(b);
}

// ---------------------------------------------------------------------------
// Memory-access hints, fences, traps.
// ---------------------------------------------------------------------------

template <typename T>
__forceinline__ T __ldg(const T* p) {
  return *p;
}
template <typename T>
__forceinline__ T __ldcg(const T* p) {
  return *p;
}
template <typename T>
__forceinline__ T __ldca(const T* p) {
  return *p;
}
template <typename T>
__forceinline__ T __ldcs(const T* p) {
  return *p;
}
template <typename T>
__forceinline__ T __ldlu(const T* p) {
  return *p;
}
template <typename T>
__forceinline__ void __stcg(T* p, T v) {
  *p = v;
}
template <typename T>
__forceinline__ void __stcs(T* p, T v) {
  *p = v;
}
template <typename T>
__forceinline__ void __stwb(T* p, T v) {
  *p = v;
}

__forceinline__ void __threadfence() { asm volatile("" ::: "memory"); }
__forceinline__ void __threadfence_block() { asm volatile("" ::: "memory"); }
__forceinline__ void __threadfence_system() {
  asm volatile("" ::: "memory");
}
[[noreturn]] inline void __trap() { arcface_emu::fail("__trap() called"); }

// ---------------------------------------------------------------------------
// Block and warp synchronisation.
// ---------------------------------------------------------------------------

__forceinline__ void __syncthreads() { arcface_emu::sync_block(); }
__forceinline__ int __syncthreads_count(int predicate) {
  return arcface_emu::sync_block_count(predicate);
}
__forceinline__ int __syncthreads_and(int predicate) {
  return arcface_emu::sync_block_count(predicate) ==
         static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
}
__forceinline__ int __syncthreads_or(int predicate) {
  return arcface_emu::sync_block_count(predicate) != 0;
}
__forceinline__ void __syncwarp(unsigned int mask = 0xffffffffu) {
  arcface_emu::sync_warp(mask);
}

namespace arcface_emu {

constexpr unsigned int kWarpSizeU = 32;

__forceinline__ unsigned int lane_id() {
  return g_current->linear % kWarpSize;
}

// Width of a shuffle segment: a power of two in [1, 32].
__forceinline__ unsigned int checked_width(int width) {
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
    fail("shuffle width %d is not a power of two in [1, 32]", width);
  }
  return static_cast<unsigned int>(width);
}

// Exchanges a value of up to 8 bytes through the warp; src is the lane
// whose value the caller receives.
template <typename T>
__forceinline__ T shuffle(unsigned int mask, WarpOp op, T var,
                          unsigned int src) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "warp shuffles move trivially copyable values of at most "
                "8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_exchange(mask, op, bits, src);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace arcface_emu

// Lane arithmetic as in the PTX shfl instruction: segments of `width`
// lanes; the offset / lane mask / source lane is taken modulo 32; a source
// outside the caller's segment (up, down) or above it (xor) yields the
// caller's own value.
template <typename T>
__forceinline__ T __shfl_sync(unsigned int mask, T var, int src_lane,
                              int width = warpSize) {
  const unsigned int w = arcface_emu::checked_width(width);
  const unsigned int lane = arcface_emu::lane_id();
  const unsigned int src =
      (lane & ~(w - 1)) | (static_cast<unsigned int>(src_lane) & (w - 1));
  return arcface_emu::shuffle(mask, arcface_emu::kOpShflIdx, var, src);
}
template <typename T>
__forceinline__ T __shfl_up_sync(unsigned int mask, T var,
                                 unsigned int delta, int width = warpSize) {
  const unsigned int w = arcface_emu::checked_width(width);
  const unsigned int lane = arcface_emu::lane_id();
  const unsigned int d = delta % arcface_emu::kWarpSizeU;
  const unsigned int src = (lane & (w - 1)) >= d ? lane - d : lane;
  return arcface_emu::shuffle(mask, arcface_emu::kOpShflUp, var, src);
}
template <typename T>
__forceinline__ T __shfl_down_sync(unsigned int mask, T var,
                                   unsigned int delta,
                                   int width = warpSize) {
  const unsigned int w = arcface_emu::checked_width(width);
  const unsigned int lane = arcface_emu::lane_id();
  const unsigned int d = delta % arcface_emu::kWarpSizeU;
  const unsigned int src = (lane & (w - 1)) + d < w ? lane + d : lane;
  return arcface_emu::shuffle(mask, arcface_emu::kOpShflDown, var, src);
}
template <typename T>
__forceinline__ T __shfl_xor_sync(unsigned int mask, T var, int lane_mask,
                                  int width = warpSize) {
  const unsigned int w = arcface_emu::checked_width(width);
  const unsigned int lane = arcface_emu::lane_id();
  const unsigned int other =
      lane ^ (static_cast<unsigned int>(lane_mask) % arcface_emu::kWarpSizeU);
  const unsigned int src = other > (lane | (w - 1)) ? lane : other;
  return arcface_emu::shuffle(mask, arcface_emu::kOpShflXor, var, src);
}

__forceinline__ unsigned int __ballot_sync(unsigned int mask,
                                           int predicate) {
  return arcface_emu::warp_ballot(mask, predicate);
}
__forceinline__ int __any_sync(unsigned int mask, int predicate) {
  return arcface_emu::warp_ballot(mask, predicate) != 0;
}
__forceinline__ int __all_sync(unsigned int mask, int predicate) {
  return arcface_emu::warp_ballot(mask, !predicate) == 0;
}

// ---------------------------------------------------------------------------
// Atomics: plain operations (fibers do not interleave between switches).
// Each returns the old value, as in CUDA.
// ---------------------------------------------------------------------------

#define ARCFACE_EMU_ATOMIC(NAME, T, EXPR) \
  __forceinline__ T NAME(T* address, T val) { \
    const T old = *address;                   \
    *address = (EXPR);                        \
    return old;                               \
  }

ARCFACE_EMU_ATOMIC(atomicAdd, int, old + val)
ARCFACE_EMU_ATOMIC(atomicAdd, unsigned int, old + val)
ARCFACE_EMU_ATOMIC(atomicAdd, unsigned long long, old + val)
ARCFACE_EMU_ATOMIC(atomicAdd, float, old + val)
ARCFACE_EMU_ATOMIC(atomicAdd, double, old + val)
ARCFACE_EMU_ATOMIC(atomicSub, int, old - val)
ARCFACE_EMU_ATOMIC(atomicSub, unsigned int, old - val)
ARCFACE_EMU_ATOMIC(atomicExch, int, val)
ARCFACE_EMU_ATOMIC(atomicExch, unsigned int, val)
ARCFACE_EMU_ATOMIC(atomicExch, unsigned long long, val)
ARCFACE_EMU_ATOMIC(atomicExch, float, val)
ARCFACE_EMU_ATOMIC(atomicMin, int, val < old ? val : old)
ARCFACE_EMU_ATOMIC(atomicMin, unsigned int, val < old ? val : old)
ARCFACE_EMU_ATOMIC(atomicMin, long long, val < old ? val : old)
ARCFACE_EMU_ATOMIC(atomicMin, unsigned long long, val < old ? val : old)
ARCFACE_EMU_ATOMIC(atomicMax, int, val > old ? val : old)
ARCFACE_EMU_ATOMIC(atomicMax, unsigned int, val > old ? val : old)
ARCFACE_EMU_ATOMIC(atomicMax, long long, val > old ? val : old)
ARCFACE_EMU_ATOMIC(atomicMax, unsigned long long, val > old ? val : old)
ARCFACE_EMU_ATOMIC(atomicAnd, int, old & val)
ARCFACE_EMU_ATOMIC(atomicAnd, unsigned int, old & val)
ARCFACE_EMU_ATOMIC(atomicAnd, unsigned long long, old & val)
ARCFACE_EMU_ATOMIC(atomicOr, int, old | val)
ARCFACE_EMU_ATOMIC(atomicOr, unsigned int, old | val)
ARCFACE_EMU_ATOMIC(atomicOr, unsigned long long, old | val)
ARCFACE_EMU_ATOMIC(atomicXor, int, old ^ val)
ARCFACE_EMU_ATOMIC(atomicXor, unsigned int, old ^ val)
ARCFACE_EMU_ATOMIC(atomicXor, unsigned long long, old ^ val)
ARCFACE_EMU_ATOMIC(atomicInc, unsigned int, old >= val ? 0u : old + 1u)
ARCFACE_EMU_ATOMIC(atomicDec, unsigned int,
                   (old == 0u || old > val) ? val : old - 1u)

#undef ARCFACE_EMU_ATOMIC

#define ARCFACE_EMU_ATOMIC_CAS(T)                             \
  __forceinline__ T atomicCAS(T* address, T compare, T val) { \
    const T old = *address;                                   \
    if (old == compare) *address = val;                       \
    return old;                                               \
  }
ARCFACE_EMU_ATOMIC_CAS(int)
ARCFACE_EMU_ATOMIC_CAS(unsigned int)
ARCFACE_EMU_ATOMIC_CAS(unsigned long long)
ARCFACE_EMU_ATOMIC_CAS(unsigned short)
#undef ARCFACE_EMU_ATOMIC_CAS

// ---------------------------------------------------------------------------
// 16-bit floating point: __half (IEEE binary16) and __nv_bfloat16.
// Conversions from float or double round to nearest even in one step,
// NaN stays NaN (quiet, sign and leading payload bits kept), overflow
// gives infinity, underflow gives subnormals then signed zero.
// ---------------------------------------------------------------------------

namespace arcface_emu {

// Rounds a double to the binary format with EXP_BITS exponent bits and
// MAN_BITS stored mantissa bits; returns its bit pattern.
template <int EXP_BITS, int MAN_BITS>
__forceinline__ unsigned short round_to_bits(double value) {
  const std::uint64_t b = bit_cast<std::uint64_t>(value);
  const unsigned int sign =
      static_cast<unsigned int>(b >> 63) << (EXP_BITS + MAN_BITS);
  const int exp_field = static_cast<int>((b >> 52) & 0x7ff);
  const std::uint64_t man = b & ((1ull << 52) - 1);
  const unsigned int inf = ((1u << EXP_BITS) - 1) << MAN_BITS;
  if (exp_field == 0x7ff) {
    if (man == 0) return static_cast<unsigned short>(sign | inf);
    const unsigned int payload = static_cast<unsigned int>(
        man >> (52 - MAN_BITS));
    return static_cast<unsigned short>(sign | inf | payload |
                                       (1u << (MAN_BITS - 1)));
  }
  // Double subnormals are far below the smallest 16-bit subnormal.
  if (exp_field == 0) return static_cast<unsigned short>(sign);
  const int bias = (1 << (EXP_BITS - 1)) - 1;
  const int emin = 1 - bias;  // exponent of the smallest normal
  const int e = exp_field - 1023;
  const std::uint64_t sig = man | (1ull << 52);  // value = sig * 2^(e-52)
  // Drop `shift` bits so that one unit is the target's ulp at this
  // exponent (subnormals: the fixed ulp 2^(emin - MAN_BITS)).
  const int shift = 52 - MAN_BITS + (e < emin ? emin - e : 0);
  if (shift >= 54) return static_cast<unsigned short>(sign);  // < ulp / 2
  std::uint64_t q = sig >> shift;
  const std::uint64_t rem = sig & ((1ull << shift) - 1);
  const std::uint64_t half_ulp = 1ull << (shift - 1);
  if (rem > half_ulp || (rem == half_ulp && (q & 1))) ++q;
  // For normals q includes the implicit bit (2^MAN_BITS), which adds one to
  // the exponent field; a carry out of the mantissa does the same.
  std::uint64_t bits = q;
  if (e >= emin) bits += static_cast<std::uint64_t>(e + bias - 1) << MAN_BITS;
  if (bits > inf) bits = inf;
  return static_cast<unsigned short>(sign | bits);
}

__forceinline__ float half_bits_to_float(unsigned short h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp_field = (h >> 10) & 0x1fu;
  const std::uint32_t man = h & 0x3ffu;
  if (exp_field == 0x1f) {
    return bit_cast<float>(sign | 0x7f800000u | (man << 13));
  }
  if (exp_field == 0) {  // zero or subnormal: man * 2^-24, exact in float
    const float mag = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -mag : mag;
  }
  return bit_cast<float>(sign | ((exp_field + 112u) << 23) | (man << 13));
}

__forceinline__ float bf16_bits_to_float(unsigned short h) {
  return bit_cast<float>(static_cast<std::uint32_t>(h) << 16);
}

}  // namespace arcface_emu

struct __half_raw {
  unsigned short x;
};
struct __nv_bfloat16_raw {
  unsigned short x;
};

struct alignas(2) __half {
  unsigned short __x;
  __half() = default;
  __half(const __half_raw& r) : __x(r.x) {}
  __half(float f) : __x(arcface_emu::round_to_bits<5, 10>(f)) {}
  __half(double d) : __x(arcface_emu::round_to_bits<5, 10>(d)) {}
  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  __half(I v) : __x(arcface_emu::round_to_bits<5, 10>(
                    static_cast<double>(v))) {}
  operator float() const { return arcface_emu::half_bits_to_float(__x); }
  operator __half_raw() const { return __half_raw{__x}; }
};

struct alignas(2) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
  __nv_bfloat16(float f) : __x(arcface_emu::round_to_bits<8, 7>(f)) {}
  __nv_bfloat16(double d) : __x(arcface_emu::round_to_bits<8, 7>(d)) {}
  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  __nv_bfloat16(I v)
      : __x(arcface_emu::round_to_bits<8, 7>(static_cast<double>(v))) {}
  operator float() const { return arcface_emu::bf16_bits_to_float(__x); }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};

struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

__forceinline__ float __half2float(__half h) { return static_cast<float>(h); }
__forceinline__ __half __float2half(float f) { return __half(f); }
__forceinline__ __half __float2half_rn(float f) { return __half(f); }
__forceinline__ __half __double2half(double d) { return __half(d); }
__forceinline__ unsigned short __half_as_ushort(__half h) { return h.__x; }
__forceinline__ short __half_as_short(__half h) {
  return static_cast<short>(h.__x);
}
__forceinline__ __half __ushort_as_half(unsigned short v) {
  return __half_raw{v};
}
__forceinline__ __half __short_as_half(short v) {
  return __half_raw{static_cast<unsigned short>(v)};
}
__forceinline__ bool __hisnan(__half h) {
  return (h.__x & 0x7fffu) > 0x7c00u;
}
__forceinline__ int __hisinf(__half h) {
  return (h.__x & 0x7fffu) != 0x7c00u ? 0 : ((h.__x & 0x8000u) ? -1 : 1);
}

__forceinline__ float __bfloat162float(__nv_bfloat16 h) {
  return static_cast<float>(h);
}
__forceinline__ __nv_bfloat16 __float2bfloat16(float f) {
  return __nv_bfloat16(f);
}
__forceinline__ __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16(f);
}
__forceinline__ __nv_bfloat16 __double2bfloat16(double d) {
  return __nv_bfloat16(d);
}
__forceinline__ unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) {
  return h.__x;
}
__forceinline__ short __bfloat16_as_short(__nv_bfloat16 h) {
  return static_cast<short>(h.__x);
}
__forceinline__ __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) {
  return __nv_bfloat16_raw{v};
}
__forceinline__ __nv_bfloat16 __short_as_bfloat16(short v) {
  return __nv_bfloat16_raw{static_cast<unsigned short>(v)};
}
__forceinline__ bool __hisnan(__nv_bfloat16 h) {
  return (h.__x & 0x7fffu) > 0x7f80u;
}

__forceinline__ __half2 __halves2half2(__half a, __half b) { return {a, b}; }
__forceinline__ __half2 __floats2half2_rn(float a, float b) {
  return {__half(a), __half(b)};
}
__forceinline__ __half2 __float2half2_rn(float a) {
  return {__half(a), __half(a)};
}
__forceinline__ float2 __half22float2(__half2 h) {
  return {static_cast<float>(h.x), static_cast<float>(h.y)};
}
__forceinline__ __half __low2half(__half2 h) { return h.x; }
__forceinline__ __half __high2half(__half2 h) { return h.y; }
__forceinline__ float __low2float(__half2 h) { return h.x; }
__forceinline__ float __high2float(__half2 h) { return h.y; }
__forceinline__ __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a,
                                                  __nv_bfloat16 b) {
  return {a, b};
}
__forceinline__ __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__nv_bfloat16(a), __nv_bfloat16(b)};
}
__forceinline__ float2 __bfloat1622float2(__nv_bfloat162 h) {
  return {static_cast<float>(h.x), static_cast<float>(h.y)};
}
__forceinline__ __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) {
  return h.x;
}
__forceinline__ __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) {
  return h.y;
}
__forceinline__ float __low2float(__nv_bfloat162 h) { return h.x; }
__forceinline__ float __high2float(__nv_bfloat162 h) { return h.y; }

__forceinline__ __half atomicAdd(__half* address, __half val) {
  const __half old = *address;
  *address = __half(static_cast<float>(old) + static_cast<float>(val));
  return old;
}
__forceinline__ __nv_bfloat16 atomicAdd(__nv_bfloat16* address,
                                        __nv_bfloat16 val) {
  const __nv_bfloat16 old = *address;
  *address =
      __nv_bfloat16(static_cast<float>(old) + static_cast<float>(val));
  return old;
}

// ---------------------------------------------------------------------------
// Launch glue used by the wrappers that the Python side generates, one per
// name expression: unpacks CuPy-style argument pointers with a parameter
// pack, and describes the parameters so that Python can check arguments.
// ---------------------------------------------------------------------------

namespace arcface_emu {

// Parameter kinds reported to Python (keep in sync with _emulator.py).
enum ParamKind : int {
  kKindOther = 0,
  kKindSigned = 1,
  kKindUnsigned = 2,
  kKindFloat = 3,
  kKindBool = 4,
  kKindPointer = 5,
  kKindHalf = 6,
  kKindBfloat16 = 7,
};

template <typename T>
constexpr int param_kind() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, bool>) {
    return kKindBool;
  } else if constexpr (std::is_same_v<U, __half>) {
    return kKindHalf;
  } else if constexpr (std::is_same_v<U, __nv_bfloat16>) {
    return kKindBfloat16;
  } else if constexpr (std::is_pointer_v<U>) {
    return kKindPointer;
  } else if constexpr (std::is_floating_point_v<U>) {
    return kKindFloat;
  } else if constexpr (std::is_integral_v<U>) {
    return std::is_signed_v<U> ? kKindSigned : kKindUnsigned;
  } else {
    return kKindOther;
  }
}

template <typename T>
constexpr long long size_or_zero() {
  if constexpr (std::is_void_v<T>) {
    return 0;
  } else {
    return static_cast<long long>(sizeof(T));
  }
}

template <typename T>
void describe_param(long long* out) {
  out[0] = param_kind<T>();
  out[1] = size_or_zero<T>();
  if constexpr (std::is_pointer_v<T>) {
    using P = std::remove_pointer_t<T>;
    out[2] = param_kind<P>();
    out[3] = size_or_zero<P>();
  } else {
    out[2] = 0;
    out[3] = 0;
  }
}

// Writes 4 numbers per parameter (kind, size, pointee kind, pointee size)
// into out (room for `cap` parameters); returns the parameter count.
template <typename... A>
int signature(void (*)(A...), long long* out, int cap) {
  constexpr int n = static_cast<int>(sizeof...(A));
  if (n <= cap) {
    int i = 0;
    (describe_param<A>(out + 4 * i++), ...);
  }
  return n;
}

template <typename... A>
struct LaunchArgs {
  void (*kernel)(A...);
  void** args;
};

// Each fiber calls the kernel with its own copies of the parameters.
template <typename... A, std::size_t... I>
__forceinline__ void call_kernel(const LaunchArgs<A...>* la,
                                 std::index_sequence<I...>) {
  la->kernel(*static_cast<const A*>(la->args[I])...);
}

template <typename... A>
void invoke_kernel(void* context) {
  call_kernel(static_cast<const LaunchArgs<A...>*>(context),
              std::index_sequence_for<A...>{});
}

template <typename... A>
int launch(void (*kernel)(A...), const unsigned int* dims, void** args,
           unsigned long long shared_bytes, int order, char* err,
           unsigned long long err_len) {
  LaunchArgs<A...> la{kernel, args};
  return run_grid(&invoke_kernel<A...>, &la, dims,
                  static_cast<std::size_t>(shared_bytes), order, err,
                  static_cast<std::size_t>(err_len));
}

}  // namespace arcface_emu

#endif  // ARCFACE_CE_EMU_CUDA_EMU_H
