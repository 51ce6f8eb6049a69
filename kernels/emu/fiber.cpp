// Fiber scheduler of the CPU emulation (see fiber.h for the model).
//
// This file is #included at the end of the generated translation unit, so
// everything here is private to one emulated module (the shared object is
// built with -fvisibility=hidden; only the launch wrappers are exported).
//
// Context switch: on x86-64 a few instructions of assembly that save the
// callee-saved registers, MXCSR and the x87 control word on the old stack,
// swap stack pointers and restore the same from the new stack. Elsewhere
// (or with -DARCFACE_EMU_UCONTEXT) swapcontext(3) is used, which is about
// ten times slower because it also saves the signal mask.

#include <sys/mman.h>

#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <vector>

#include "fiber.h"

#if !defined(__x86_64__) && !defined(ARCFACE_EMU_UCONTEXT)
#define ARCFACE_EMU_UCONTEXT 1
#endif

#ifdef ARCFACE_EMU_UCONTEXT
#include <ucontext.h>
#endif

// Bytes of stack per fiber (virtual; pages are committed on first touch).
#ifndef ARCFACE_EMU_STACK_BYTES
#define ARCFACE_EMU_STACK_BYTES (256 * 1024)
#endif

// Static __shared__ variables are placed in this section so that they can
// be poisoned at the start of every block (see cuda_emu.h).
extern "C" unsigned char __start_arcface_emu_shared[]
    __attribute__((weak, visibility("hidden")));
extern "C" unsigned char __stop_arcface_emu_shared[]
    __attribute__((weak, visibility("hidden")));

namespace arcface_emu {

Fiber* g_current = nullptr;
uint3 g_block_idx = {0, 0, 0};
dim3 g_block_dim;
dim3 g_grid_dim;
alignas(256) unsigned char g_dynamic_shared[kDynamicSharedBytes];

namespace {

constexpr unsigned int kMaxThreads = 1024;
constexpr std::size_t kGuardBytes = 4096;
// Byte written over shared memory at the start of each block: reads of
// shared memory not written by this block give NaN (floats) or -1 (ints).
constexpr unsigned char kPoison = 0xff;

// ---------------------------------------------------------------------------
// Context switch.
// ---------------------------------------------------------------------------

#ifndef ARCFACE_EMU_UCONTEXT

struct Context {
  void* sp;
};

extern "C" void arcface_emu_switch(void** save_sp, void* new_sp)
    __attribute__((visibility("hidden")));
extern "C" void arcface_emu_fiber_start()
    __attribute__((visibility("hidden")));

// arcface_emu_switch(save_sp, new_sp): push rbp, rbx, r12-r15 and a 16-byte
// slot holding the x87 control word (at 0) and MXCSR (at 8), store rsp in
// *save_sp, load new_sp, undo the same in reverse and return into the new
// context. arcface_emu_fiber_start is the first return address of a fresh
// fiber: it calls the function in r13 with the argument in r12.
asm(R"(
  .pushsection .text
  .globl arcface_emu_switch
  .hidden arcface_emu_switch
  .type arcface_emu_switch, @function
  .p2align 4
arcface_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size arcface_emu_switch, .-arcface_emu_switch

  .globl arcface_emu_fiber_start
  .hidden arcface_emu_fiber_start
  .type arcface_emu_fiber_start, @function
  .p2align 4
arcface_emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size arcface_emu_fiber_start, .-arcface_emu_fiber_start
  .popsection
)");

inline void ctx_switch(Context* from, Context* to) {
  arcface_emu_switch(&from->sp, to->sp);
}

// Builds the frame that arcface_emu_switch pops: 16-byte control slot, six
// registers, return address. The stack top is 16-byte aligned and the frame
// leaves rsp 16-byte aligned before fiber_start's call, as the ABI wants.
void ctx_init(Context* ctx, unsigned char* stack_top, void (*fn)()) {
  std::uint64_t* sp = reinterpret_cast<std::uint64_t*>(stack_top) - 11;
  std::uint16_t fpu_cw;
  std::uint32_t mxcsr;
  asm volatile("fnstcw %0" : "=m"(fpu_cw));
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  sp[0] = fpu_cw;
  sp[1] = mxcsr;
  sp[2] = 0;                                         // r15
  sp[3] = 0;                                         // r14
  sp[4] = reinterpret_cast<std::uint64_t>(fn);       // r13
  sp[5] = 0;                                         // r12
  sp[6] = 0;                                         // rbx
  sp[7] = 0;                                         // rbp
  sp[8] = reinterpret_cast<std::uint64_t>(&arcface_emu_fiber_start);
  sp[9] = 0;
  sp[10] = 0;
  ctx->sp = sp;
}

#else  // ARCFACE_EMU_UCONTEXT

struct Context {
  ucontext_t uc;
};

inline void ctx_switch(Context* from, Context* to) {
  swapcontext(&from->uc, &to->uc);
}

void ctx_init(Context* ctx, unsigned char* stack_top, void (*fn)()) {
  getcontext(&ctx->uc);
  ctx->uc.uc_stack.ss_sp = stack_top - ARCFACE_EMU_STACK_BYTES;
  ctx->uc.uc_stack.ss_size = ARCFACE_EMU_STACK_BYTES;
  ctx->uc.uc_link = nullptr;
  makecontext(&ctx->uc, fn, 0);
}

#endif  // ARCFACE_EMU_UCONTEXT

// ---------------------------------------------------------------------------
// State of the launch in progress (one at a time per module: g_mutex).
// ---------------------------------------------------------------------------

std::mutex g_mutex;
std::vector<unsigned char*> g_stacks;  // top of each fiber's stack
Context g_sched;                       // the scheduler (OS thread stack)
Context g_ctx[kMaxThreads];
Fiber g_fibers[kMaxThreads];
Warp g_warps[kMaxThreads / kWarpSize];
unsigned int g_nthreads = 0;
unsigned int g_nwarps = 0;
unsigned int g_block_arrived = 0;  // fibers waiting at __syncthreads
unsigned int g_block_gen = 0;      // __syncthreads released so far
int g_block_count[2] = {0, 0};     // __syncthreads_count, by g_block_gen
unsigned int g_ndone = 0;
InvokeFn g_invoke = nullptr;
void* g_invoke_ctx = nullptr;
bool g_failed = false;
char g_msg[1024];

const char* op_name(unsigned char op) {
  switch (op) {
    case kOpSyncWarp:
      return "__syncwarp";
    case kOpShflIdx:
      return "__shfl_sync";
    case kOpShflUp:
      return "__shfl_up_sync";
    case kOpShflDown:
      return "__shfl_down_sync";
    case kOpShflXor:
      return "__shfl_xor_sync";
    case kOpBallot:
      return "__ballot_sync/__any_sync/__all_sync";
    default:
      return "a warp collective";
  }
}

// Appends to g_msg (bounded).
void msg_append(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void msg_append(const char* fmt, ...) {
  std::size_t used = std::strlen(g_msg);
  if (used + 1 >= sizeof(g_msg)) return;
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(g_msg + used, sizeof(g_msg) - used, fmt, ap);
  va_end(ap);
}

void msg_block_prefix() {
  g_msg[0] = '\0';
  msg_append("block (%u, %u, %u): ", g_block_idx.x, g_block_idx.y,
             g_block_idx.z);
}

bool ensure_stacks(unsigned int n) {
  while (g_stacks.size() < n) {
    const std::size_t bytes = ARCFACE_EMU_STACK_BYTES + kGuardBytes;
    void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) return false;
    // Guard page below the stack: an overflow faults instead of silently
    // corrupting the neighbouring fiber.
    mprotect(base, kGuardBytes, PROT_NONE);
    g_stacks.push_back(static_cast<unsigned char*>(base) + bytes);
  }
  return true;
}

// Returns to the scheduler; resumes when the scheduler runs this fiber.
inline void yield_to_scheduler() {
  ctx_switch(&g_ctx[g_current->linear], &g_sched);
}

void fiber_main() {
  g_invoke(g_invoke_ctx);
  g_current->state = kDone;
  ++g_ndone;
  yield_to_scheduler();
  __builtin_unreachable();  // a finished fiber is never resumed
}

unsigned int existing_lanes(const Warp& w) {
  return w.lanes == 32 ? 0xffffffffu : ((1u << w.lanes) - 1u);
}

void check_mask(unsigned int mask, const Warp& w, WarpOp op) {
  const unsigned int need = existing_lanes(w);
  if ((mask & need) != need) {
    fail("%s with mask 0x%08x: partial-mask warp collectives are not "
         "emulated (the mask must name all %u lanes of warp %u)",
         op_name(op), mask, w.lanes, g_current->linear / kWarpSize);
  }
}

void arrive_warp(Warp& w, WarpOp op) {
  if (w.arrived == 0) {
    w.op = op;
  } else if (w.op != op) {
    w.mismatch = op;
  }
  ++w.arrived;
  g_current->state = kWaitWarp;
  g_current->warp_op = op;
  yield_to_scheduler();
}

// Describes why no fiber of the block can make progress.
void report_deadlock() {
  msg_block_prefix();
  unsigned int at_block = 0;
  for (unsigned int i = 0; i < g_nthreads; ++i) {
    at_block += g_fibers[i].state == kWaitBlock;
  }
  msg_append("deadlock: %u of %u threads wait at __syncthreads, %u have "
             "returned",
             at_block, g_nthreads, g_ndone);
  for (unsigned int w = 0; w < g_nwarps; ++w) {
    if (g_warps[w].arrived == 0) continue;
    unsigned int done = 0, blocked = 0;
    for (unsigned int l = 0; l < g_warps[w].lanes; ++l) {
      const Fiber& f = g_fibers[w * kWarpSize + l];
      done += f.state == kDone;
      blocked += f.state == kWaitBlock;
    }
    msg_append("; warp %u: %u of %u lanes wait at %s (warp barrier), %u "
               "returned, %u at __syncthreads",
               w, g_warps[w].arrived, g_warps[w].lanes,
               op_name(g_warps[w].op), done, blocked);
  }
}

// Releases the barriers whose participants have all arrived. Returns false
// (with g_msg set) on a mismatch of warp collectives or when nothing could
// be released although some fibers have not returned.
bool release_barriers() {
  bool released = false;
  if (g_block_arrived != 0 && g_block_arrived == g_nthreads) {
    for (unsigned int i = 0; i < g_nthreads; ++i) g_fibers[i].state = kReady;
    g_block_arrived = 0;
    ++g_block_gen;
    g_block_count[g_block_gen & 1] = 0;  // the buffer the next one uses
    released = true;
  }
  for (unsigned int w = 0; w < g_nwarps; ++w) {
    Warp& warp = g_warps[w];
    if (warp.arrived == 0 || warp.arrived != warp.lanes) continue;
    if (warp.mismatch != kOpNone) {
      msg_block_prefix();
      msg_append("lanes of warp %u met different warp collectives (%s and "
                 "%s); divergent warp collectives are not emulated",
                 w, op_name(warp.op), op_name(warp.mismatch));
      return false;
    }
    for (unsigned int l = 0; l < warp.lanes; ++l) {
      g_fibers[w * kWarpSize + l].state = kReady;
    }
    warp.arrived = 0;
    warp.op = kOpNone;
    released = true;
  }
  if (!released) report_deadlock();
  return released;
}

// Poisons static and dynamic shared memory (uninitialised on a GPU).
void poison_shared(std::size_t shared_bytes) {
  if (__start_arcface_emu_shared != nullptr &&
      __stop_arcface_emu_shared > __start_arcface_emu_shared) {
    std::memset(__start_arcface_emu_shared, kPoison,
                static_cast<std::size_t>(__stop_arcface_emu_shared -
                                         __start_arcface_emu_shared));
  }
  std::memset(g_dynamic_shared, kPoison, shared_bytes);
}

// Runs one block to completion. Returns false with g_msg set on failure.
bool run_block(std::size_t shared_bytes, int order) {
  poison_shared(shared_bytes);
  for (unsigned int i = 0; i < g_nthreads; ++i) {
    Fiber& f = g_fibers[i];
    f.state = kReady;
    f.parity = 0;
    f.warp_op = kOpNone;
    ctx_init(&g_ctx[i], g_stacks[i], &fiber_main);
  }
  for (unsigned int w = 0; w < g_nwarps; ++w) {
    g_warps[w].arrived = 0;
    g_warps[w].op = kOpNone;
    g_warps[w].mismatch = kOpNone;
  }
  g_block_arrived = 0;
  g_block_gen = 0;
  g_block_count[0] = g_block_count[1] = 0;
  g_ndone = 0;
  const unsigned int n = g_nthreads;
  for (;;) {
    // One pass: every ready fiber runs until it blocks or returns.
    for (unsigned int k = 0; k < n; ++k) {
      const unsigned int i = order ? n - 1 - k : k;
      if (g_fibers[i].state != kReady) continue;
      g_current = &g_fibers[i];
      ctx_switch(&g_sched, &g_ctx[i]);
      if (g_failed) return false;
    }
    if (g_ndone == n) return true;
    if (!release_barriers()) return false;
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Operations called from kernel code.
// ---------------------------------------------------------------------------

void fail(const char* fmt, ...) {
  msg_block_prefix();
  const uint3 t = g_current->tid;
  msg_append("thread (%u, %u, %u): ", t.x, t.y, t.z);
  std::size_t used = std::strlen(g_msg);
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(g_msg + used, sizeof(g_msg) - used, fmt, ap);
  va_end(ap);
  g_failed = true;
  yield_to_scheduler();
  __builtin_unreachable();  // the launch is abandoned
}

void sync_block() {
  g_current->state = kWaitBlock;
  ++g_block_arrived;
  yield_to_scheduler();
}

int sync_block_count(int predicate) {
  // All arrivals of one barrier see the same g_block_gen; the buffer of
  // the previous barrier is cleared when this one is released.
  const unsigned int buf = g_block_gen & 1;
  g_block_count[buf] += predicate != 0;
  sync_block();
  return g_block_count[buf];
}

void sync_warp(unsigned int mask) {
  Warp& w = g_warps[g_current->linear / kWarpSize];
  check_mask(mask, w, kOpSyncWarp);
  arrive_warp(w, kOpSyncWarp);
}

std::uint64_t warp_exchange(unsigned int mask, WarpOp op,
                            std::uint64_t bits, unsigned int src_lane) {
  Fiber* f = g_current;
  Warp& w = g_warps[f->linear / kWarpSize];
  check_mask(mask, w, op);
  if (src_lane >= w.lanes) {
    fail("%s reads lane %u of warp %u, which has only %u lanes (block of "
         "%u threads): undefined on a GPU",
         op_name(op), src_lane, f->linear / kWarpSize, w.lanes,
         g_nthreads);
  }
  const unsigned int buf = f->parity;
  w.slot[buf][f->linear % kWarpSize] = bits;
  arrive_warp(w, op);
  f->parity ^= 1;
  return w.slot[buf][src_lane];
}

unsigned int warp_ballot(unsigned int mask, int predicate) {
  Fiber* f = g_current;
  Warp& w = g_warps[f->linear / kWarpSize];
  check_mask(mask, w, kOpBallot);
  const unsigned int buf = f->parity;
  w.slot[buf][f->linear % kWarpSize] = predicate != 0;
  arrive_warp(w, kOpBallot);
  f->parity ^= 1;
  unsigned int result = 0;
  for (unsigned int l = 0; l < w.lanes; ++l) {
    result |= static_cast<unsigned int>(w.slot[buf][l] != 0) << l;
  }
  return result & mask;
}

int run_grid(InvokeFn invoke, void* context, const unsigned int* dims,
             std::size_t shared_bytes, int order, char* err,
             std::size_t err_len) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const dim3 grid(dims[0], dims[1], dims[2]);
  const dim3 block(dims[3], dims[4], dims[5]);
  const unsigned long long n =
      1ull * block.x * block.y * block.z;  // checked in Python too
  g_failed = false;
  g_msg[0] = '\0';
  if (n == 0 || n > kMaxThreads || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || shared_bytes > kDynamicSharedBytes) {
    std::snprintf(err, err_len, "invalid launch configuration");
    return 1;
  }
  if (!ensure_stacks(static_cast<unsigned int>(n))) {
    std::snprintf(err, err_len, "cannot allocate fiber stacks");
    return 1;
  }
  g_nthreads = static_cast<unsigned int>(n);
  g_nwarps = (g_nthreads + kWarpSize - 1) / kWarpSize;
  g_grid_dim = grid;
  g_block_dim = block;
  g_invoke = invoke;
  g_invoke_ctx = context;
  for (unsigned int z = 0, i = 0; z < block.z; ++z) {
    for (unsigned int y = 0; y < block.y; ++y) {
      for (unsigned int x = 0; x < block.x; ++x, ++i) {
        g_fibers[i].tid = uint3{x, y, z};
        g_fibers[i].linear = i;
      }
    }
  }
  for (unsigned int w = 0; w < g_nwarps; ++w) {
    const unsigned int left = g_nthreads - w * kWarpSize;
    g_warps[w].lanes = left < kWarpSize ? left : kWarpSize;
  }
  for (unsigned int bz = 0; bz < grid.z; ++bz) {
    for (unsigned int by = 0; by < grid.y; ++by) {
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        g_block_idx = uint3{bx, by, bz};
        if (!run_block(shared_bytes, order)) {
          g_current = nullptr;
          std::snprintf(err, err_len, "%s", g_msg);
          return 1;
        }
      }
    }
  }
  g_current = nullptr;
  return 0;
}

}  // namespace arcface_emu
