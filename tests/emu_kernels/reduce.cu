// Toy kernels for the emulator tests: reductions and a grid-stride copy.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define FULL_MASK 0xffffffffu

// Sum over one warp with shuffles; every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(FULL_MASK, v, offset);
  }
  return v;
}

// out[row] = sum of x[row, :], one block per row (grid-stride over rows).
// Works for any block size >= 32: the block first reduces into shared
// memory, then warp 0 (always a full warp) finishes with shuffles.
extern "C" __global__ void row_sum(const float* __restrict__ x,  // [N, C]
                                   long long n_rows, long long n_cols,
                                   float* __restrict__ out) {  // [N]
  __shared__ float partial[1024];
  const unsigned int tid = threadIdx.x;
  for (long long row = blockIdx.x; row < n_rows; row += gridDim.x) {
    float acc = 0.0f;
    for (long long j = tid; j < n_cols; j += blockDim.x) {
      acc += x[row * n_cols + j];
    }
    partial[tid] = acc;
    __syncthreads();
    if (tid < 32) {
      float v = 0.0f;
      for (unsigned int k = tid; k < blockDim.x; k += 32) v += partial[k];
      v = warp_sum(v);
      if (tid == 0) out[row] = v;
    }
    __syncthreads();
  }
}

// The usual two-level reduction: every warp reduces with shuffles, warp 0
// reduces the warp sums. Needs a block size that is a multiple of 32 (on a
// GPU a partial last warp reads undefined lanes; the emulator raises).
extern "C" __global__ void row_sum_warps(const float* __restrict__ x,
                                         long long n_rows, long long n_cols,
                                         float* __restrict__ out) {
  __shared__ float warp_sums[32];
  const unsigned int tid = threadIdx.x;
  const unsigned int lane = tid % 32;
  const unsigned int warp = tid / 32;
  const unsigned int n_warps = (blockDim.x + 31) / 32;
  for (long long row = blockIdx.x; row < n_rows; row += gridDim.x) {
    float acc = 0.0f;
    for (long long j = tid; j < n_cols; j += blockDim.x) {
      acc += x[row * n_cols + j];
    }
    acc = warp_sum(acc);
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (warp == 0) {
      float v = lane < n_warps ? warp_sums[lane] : 0.0f;
      v = warp_sum(v);
      if (lane == 0) out[row] = v;
    }
    __syncthreads();
  }
}

// Conversions to the accumulate type (double for every T here).
__device__ __forceinline__ double to_double(float v) { return v; }
__device__ __forceinline__ double to_double(double v) { return v; }
__device__ __forceinline__ double to_double(__half v) {
  return __half2float(v);
}
__device__ __forceinline__ double to_double(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// out[row] = sum_j x[row, j] * scale in double, rounded to T, with a 2-D
// block (x: columns, y: rows of the block), dynamic shared memory holding
// blockDim.x * blockDim.y doubles and double shuffles.
template <typename T>
__global__ void row_sum_t(const T* __restrict__ x,  // [N, C] T
                          long long n_rows, long long n_cols, float scale,
                          T* __restrict__ out) {  // [N] T
  extern __shared__ __align__(8) double dyn[];
  const unsigned int tx = threadIdx.x;
  const long long row = 1LL * blockIdx.x * blockDim.y + threadIdx.y;
  double acc = 0.0;
  if (row < n_rows) {
    for (long long j = tx; j < n_cols; j += blockDim.x) {
      acc += to_double(x[row * n_cols + j]);
    }
  }
  double* mine = dyn + threadIdx.y * blockDim.x;
  mine[tx] = acc;
  __syncthreads();
  if (tx < 32) {
    double v = 0.0;
    for (unsigned int k = tx; k < blockDim.x; k += 32) v += mine[k];
    for (int offset = 16; offset > 0; offset /= 2) {
      v += __shfl_down_sync(FULL_MASK, v, offset);
    }
    if (tx == 0 && row < n_rows) out[row] = T(v * scale);
  }
}

// y[i] = T(float(x[i]) * a) over a grid-stride loop with 64-bit indices,
// starting at `first` so that indices past 2**31 are exercised without
// allocating that much.
template <typename T>
__global__ void scale_tail(const T* __restrict__ x,  // [n - first] T
                           long long first, long long n, float a,
                           T* __restrict__ y) {  // [n - first] T
  const long long stride = 1LL * blockDim.x * gridDim.x;
  for (long long i = first + 1LL * blockIdx.x * blockDim.x + threadIdx.x;
       i < n; i += stride) {
    y[i - first] = static_cast<T>(static_cast<float>(x[i - first]) * a);
  }
}
