// Toy kernels for the emulator tests: 16-bit float conversions, each
// written two ways (intrinsic and constructor / static_cast).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ long long global_index() {
  return 1LL * blockIdx.x * blockDim.x + threadIdx.x;
}

extern "C" __global__ void float_to_half(const float* __restrict__ x,  // [n]
                                         long long n,
                                         __half* __restrict__ a,  // [n] out
                                         __half* __restrict__ b,  // [n] out
                                         __half* __restrict__ c) {  // [n]
  const long long i = global_index();
  if (i >= n) return;
  a[i] = __float2half(x[i]);
  b[i] = __float2half_rn(x[i]);
  c[i] = __half(x[i]);
}

extern "C" __global__ void double_to_half(const double* __restrict__ x,
                                          long long n,
                                          __half* __restrict__ a,
                                          __half* __restrict__ b) {
  const long long i = global_index();
  if (i >= n) return;
  a[i] = __double2half(x[i]);
  b[i] = static_cast<__half>(x[i]);
}

extern "C" __global__ void half_to_float(const __half* __restrict__ x,
                                         long long n,
                                         float* __restrict__ a,
                                         float* __restrict__ b) {
  const long long i = global_index();
  if (i >= n) return;
  a[i] = __half2float(x[i]);
  b[i] = static_cast<float>(x[i]);
}

extern "C" __global__ void float_to_bf16(const float* __restrict__ x,
                                         long long n,
                                         __nv_bfloat16* __restrict__ a,
                                         __nv_bfloat16* __restrict__ b,
                                         __nv_bfloat16* __restrict__ c) {
  const long long i = global_index();
  if (i >= n) return;
  a[i] = __float2bfloat16(x[i]);
  b[i] = __float2bfloat16_rn(x[i]);
  c[i] = __nv_bfloat16(x[i]);
}

extern "C" __global__ void double_to_bf16(const double* __restrict__ x,
                                          long long n,
                                          __nv_bfloat16* __restrict__ a,
                                          __nv_bfloat16* __restrict__ b) {
  const long long i = global_index();
  if (i >= n) return;
  a[i] = __double2bfloat16(x[i]);
  b[i] = static_cast<__nv_bfloat16>(x[i]);
}

extern "C" __global__ void bf16_to_float(const __nv_bfloat16* __restrict__ x,
                                         long long n,
                                         float* __restrict__ a,
                                         float* __restrict__ b) {
  const long long i = global_index();
  if (i >= n) return;
  a[i] = __bfloat162float(x[i]);
  b[i] = float(x[i]);
}
