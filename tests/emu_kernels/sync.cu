// Toy kernels for the emulator tests: barriers, warp collectives, atomics,
// launch geometry, and deliberate mistakes that must be reported.

#define FULL_MASK 0xffffffffu

// out[t] = x[t - 1] of the block (x[0] for t = 0) through shared memory.
// Correct only with the barrier: without it, forward order happens to work
// (thread t - 1 has already run to its end) and reverse order does not.
extern "C" __global__ void shift_right(const float* __restrict__ x,  // [B]
                                       int use_barrier,
                                       float* __restrict__ out) {  // [B]
  __shared__ float s[1024];
  const unsigned int t = threadIdx.x;
  s[t] = x[t];
  if (use_barrier) __syncthreads();
  out[t] = s[t == 0 ? 0 : t - 1];
}

// Shuffle semantics. out: [11, blockDim.x] int, one row per case.
extern "C" __global__ void shuffles(int* __restrict__ out) {
  const unsigned int t = threadIdx.x;
  const unsigned int n = blockDim.x;
  const int v = 100 + static_cast<int>(t);
  out[0 * n + t] = __shfl_sync(FULL_MASK, v, 5);
  out[1 * n + t] = __shfl_sync(FULL_MASK, v, 3 + static_cast<int>(t), 8);
  out[2 * n + t] = __shfl_up_sync(FULL_MASK, v, 3);
  out[3 * n + t] = __shfl_up_sync(FULL_MASK, v, 2, 8);
  out[4 * n + t] = __shfl_down_sync(FULL_MASK, v, 5);
  out[5 * n + t] = __shfl_down_sync(FULL_MASK, v, 3, 16);
  out[6 * n + t] = __shfl_xor_sync(FULL_MASK, v, 1);
  out[7 * n + t] = __shfl_xor_sync(FULL_MASK, v, 12, 8);
  out[8 * n + t] = static_cast<int>(__ballot_sync(FULL_MASK, t % 3 == 0));
  out[9 * n + t] = __any_sync(FULL_MASK, t == 40) +
                   2 * __all_sync(FULL_MASK, t < 40);
  out[10 * n + t] = __syncthreads_count(t % 5 == 0);
}

// Shuffles of 8-byte and 2-byte values (bit patterns kept).
extern "C" __global__ void shuffle_wide(const double* __restrict__ x,
                                        const long long* __restrict__ y,
                                        const unsigned short* __restrict__ z,
                                        double* __restrict__ xo,
                                        long long* __restrict__ yo,
                                        unsigned short* __restrict__ zo) {
  const unsigned int t = threadIdx.x;
  xo[t] = __shfl_xor_sync(FULL_MASK, x[t], 7);
  yo[t] = __shfl_down_sync(FULL_MASK, y[t], 1);
  zo[t] = __shfl_sync(FULL_MASK, z[t], 31);
}

// Atomics from every thread of every block. acc: [8], see the test.
extern "C" __global__ void atomics(const float* __restrict__ x,  // [n]
                                   long long n,
                                   float* __restrict__ fsum,
                                   int* __restrict__ acc) {
  const long long i = 1LL * blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int v = static_cast<int>(i % 1000) - 500;
  atomicAdd(fsum, x[i]);
  atomicAdd(&acc[0], 1);
  atomicMax(&acc[1], v);
  atomicMin(&acc[2], v);
  atomicOr(&acc[3], 1 << (i % 31));
  atomicAdd(reinterpret_cast<unsigned int*>(&acc[4]), 2u);
  atomicExch(&acc[5], 7);
  // Float max through a CAS loop, as written for GPUs without float max.
  int* address = &acc[6];
  int old = *address;
  while (__int_as_float(old) < x[i]) {
    const int seen = atomicCAS(address, old, __float_as_int(x[i]));
    if (seen == old) break;
    old = seen;
  }
}

// Every thread writes its coordinates: out [grid volume * block volume, 6].
extern "C" __global__ void coords(unsigned int* __restrict__ out) {
  const unsigned long long block = blockIdx.x + gridDim.x *
      (blockIdx.y + 1ULL * gridDim.y * blockIdx.z);
  const unsigned long long thread = threadIdx.x + blockDim.x *
      (threadIdx.y + 1ULL * blockDim.y * threadIdx.z);
  const unsigned long long row =
      block * blockDim.x * blockDim.y * blockDim.z + thread;
  unsigned int* o = out + 6 * row;
  o[0] = threadIdx.x;
  o[1] = threadIdx.y;
  o[2] = threadIdx.z;
  o[3] = blockIdx.x;
  o[4] = blockIdx.y;
  o[5] = blockIdx.z;
}

// Reads shared memory that no thread wrote (uninitialised on a GPU).
extern "C" __global__ void read_unwritten_shared(float* __restrict__ out) {
  __shared__ float s[64];
  out[threadIdx.x] = s[threadIdx.x];
}

// Deadlock: thread 5 returns while the others wait at __syncthreads.
extern "C" __global__ void early_exit(float* __restrict__ out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Deadlock: lanes 16..31 never reach the shuffle.
extern "C" __global__ void half_warp_shuffle(float* __restrict__ out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_down_sync(FULL_MASK, v, 8);
  out[threadIdx.x] = v;
}

// Not emulated: a mask naming half of the warp.
extern "C" __global__ void partial_mask(float* __restrict__ out) {
  float v = static_cast<float>(threadIdx.x);
  v = __shfl_xor_sync(0x0000ffffu, v, 1);
  out[threadIdx.x] = v;
}

// Lanes of one warp meeting different collectives.
extern "C" __global__ void mixed_collectives(float* __restrict__ out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 2 == 0) {
    v = __shfl_xor_sync(FULL_MASK, v, 1);
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = v;
}

extern "C" __global__ void trap_in_block_3(float* __restrict__ out) {
  if (blockIdx.x == 3 && threadIdx.x == 7) __trap();
  out[threadIdx.x] = 1.0f;
}
