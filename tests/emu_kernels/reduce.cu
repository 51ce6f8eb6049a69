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
