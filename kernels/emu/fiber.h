// Fiber scheduler of the CPU emulation of the project's CUDA kernels.
//
// One kernel launch runs its blocks one after another on the calling OS
// thread. The threads of a block are cooperative fibers (one stack each,
// reused across blocks and launches). A fiber runs until it reaches a
// barrier (__syncthreads, a warp collective) or returns; the scheduler then
// runs the next ready fiber, in forward (0..n-1) or reverse thread order.
// When every fiber of the block is blocked, the barriers whose participants
// have all arrived are released and a new pass starts. When none can be
// released the launch stops with a deadlock report.
//
// Only the declarations that cuda_emu.h needs live here; the definitions
// are in fiber.cpp, which is compiled into the same translation unit as the
// kernel source (see arcface_ce/_emulator.py).

#ifndef ARCFACE_CE_EMU_FIBER_H
#define ARCFACE_CE_EMU_FIBER_H

#include <cstddef>
#include <cstdint>

namespace arcface_emu {

// CUDA's built-in index types (re-exported at global scope by cuda_emu.h).
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1,
                 unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

constexpr int kWarpSize = 32;

// What a fiber is doing, as seen by the scheduler.
enum FiberState : unsigned char {
  kReady = 0,      // runnable in the next pass
  kWaitBlock = 1,  // at __syncthreads
  kWaitWarp = 2,   // at a warp collective
  kDone = 3,       // returned from the kernel
};

// Warp collectives, recorded so that lanes meeting different ones are
// reported instead of silently exchanging values.
enum WarpOp : unsigned char {
  kOpNone = 0,
  kOpSyncWarp,
  kOpShflIdx,
  kOpShflUp,
  kOpShflDown,
  kOpShflXor,
  kOpBallot,
  kOpMatch,
};

struct Fiber {
  uint3 tid;                // threadIdx
  unsigned int linear;      // x + y * bx + z * bx * by
  unsigned char state;      // FiberState
  unsigned char parity;     // flips at each value-exchanging collective
  unsigned char warp_op;    // WarpOp of the collective being waited at
  unsigned char pad_;
};

struct Warp {
  unsigned int lanes;       // existing lanes (< 32 in a partial last warp)
  unsigned int arrived;     // lanes waiting at the warp barrier
  unsigned char op;         // WarpOp of the first lane that arrived
  unsigned char mismatch;   // a later lane arrived with another WarpOp
  // Values deposited by the lanes, double-buffered by fiber parity so that
  // a fast lane's next deposit cannot overwrite a value not yet read.
  std::uint64_t slot[2][kWarpSize];
};

// Per-OS-thread state is not needed: a launch holds a process-wide mutex
// of this shared object, and everything below belongs to that launch.
extern Fiber* g_current;  // the running fiber
extern uint3 g_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;

// Blocking operations, called from fibers only.
void sync_block();
int sync_block_count(int predicate);  // __syncthreads_count
void sync_warp(unsigned int mask);
// Deposits `bits`, waits for the warp, returns the value of `src_lane`.
std::uint64_t warp_exchange(unsigned int mask, WarpOp op,
                            std::uint64_t bits, unsigned int src_lane);
unsigned int warp_ballot(unsigned int mask, int predicate);

// Stops the launch with a message (printf format); never returns.
[[noreturn]] void fail(const char* fmt, ...)
    __attribute__((format(printf, 1, 2)));

// The type-erased kernel call that the generated launch wrapper builds.
typedef void (*InvokeFn)(void* context);

// Runs a whole grid. dims: grid x, y, z, block x, y, z. order: 0 forward,
// 1 reverse. Returns 0, or 1 with a message in err (NUL-terminated).
int run_grid(InvokeFn invoke, void* context, const unsigned int* dims,
             std::size_t shared_bytes, int order, char* err,
             std::size_t err_len);

// Dynamic shared memory: one static buffer at a fixed address, 227 KiB
// (the largest opt-in size of current GPUs; the Python side enforces the
// launch's limit). `extern __shared__ T name[];` is rewritten by the Python
// side into a constant pointer to it, valid at any scope.
constexpr std::size_t kDynamicSharedBytes = 227 * 1024;
extern unsigned char g_dynamic_shared[kDynamicSharedBytes];

}  // namespace arcface_emu

#endif  // ARCFACE_CE_EMU_FIBER_H
