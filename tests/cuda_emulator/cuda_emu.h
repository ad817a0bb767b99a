// A CPU emulator for the CUDA kernels of csrc/instance_norm_act_cuda.cu, for tests on machines
// without a GPU (most sessions of this project). tests/cuda_emu.py compiles that file as C++ with
// this header in front and its `<<<grid, block, smem, stream>>>(args)` launches rewritten to
// emu::launch_kernel(grid, block, smem, stream, &kernel, args).
//
// Execution model: the blocks of a launch run one after another; the threads of a block are
// fibers (ucontext) switched at every __syncthreads and warp shuffle, so barriers and shuffles
// have their CUDA meaning: a block barrier waits for every thread of the block, a shuffle for the
// 32 lanes of its warp. __shared__ variables are function statics (one copy, shared by the
// block's threads; blocks do not overlap). What CUDA leaves undefined is reported as a launch
// error instead of run: a barrier that a thread has exited before reaching, a full-mask shuffle
// in a partial warp or with exited lanes, a deadlock. What it does not model: inter-block races
// (none of these kernels communicate between blocks of one launch), memory-model subtleties, and
// the GPU's fp32 intrinsics (the host's IEEE arithmetic stands in; fma contraction may differ).
// sm_count() sees 132 SMs (an H100), so launch plans match the GPU's.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---- fp16 / bf16 storage types and the conversions the kernels use -------------------------
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};
static_assert(sizeof(__nv_bfloat16) == 2 && sizeof(__half) == 2, "2-byte storage types");

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return float(v);
}
inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);  // IEEE round to nearest even
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}
inline int __float2int_rz(float x) { return int(x); }

// ---- the runtime API the launchers use -------------------------------------------------------
using cudaStream_t = void*;
enum cudaError_t : int { cudaSuccess = 0, cudaErrorLaunchFailure = 719 };
enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };

namespace emu {

struct Fiber {
  ucontext_t ctx;
  int state = 0;  // 0 ready, 1 at a block barrier, 2 at a warp barrier, 3 exited
};

// Fiber stacks, allocated once per OS thread and reused by every block (uninitialised memory:
// a launch may run hundreds of blocks of hundreds of threads).
constexpr size_t kStackBytes = 64 * 1024;
inline char* fiber_stack(int t) {
  static thread_local std::vector<std::unique_ptr<char[]>> pool;
  while (int(pool.size()) <= t) pool.emplace_back(new char[kStackBytes]);
  return pool[t].get();
}

struct BlockRun {
  dim3 block_idx, block_dim;
  int n = 0, current = 0;
  std::vector<Fiber> fibers;
  std::vector<uint64_t> lanes;  // shuffle exchange slots, one per thread
  ucontext_t sched;
  const std::function<void()>* body = nullptr;
};

inline BlockRun*& current_block() {
  static thread_local BlockRun* b = nullptr;
  return b;
}
inline std::string& last_error() {
  static thread_local std::string e;
  return e;
}

inline dim3 thread_idx() { return dim3(unsigned(current_block()->current), 0, 0); }
inline dim3 block_idx() { return current_block()->block_idx; }
inline dim3 block_dim() { return current_block()->block_dim; }

inline void yield_with(int state) {
  BlockRun& b = *current_block();
  Fiber& f = b.fibers[b.current];
  f.state = state;
  swapcontext(&f.ctx, &b.sched);
}

inline void fiber_entry() {
  BlockRun& b = *current_block();
  (*b.body)();
  b.fibers[b.current].state = 3;  // uc_link returns to the scheduler
}

// Runs one block to completion; false (and last_error()) on a barrier CUDA leaves undefined.
inline bool run_block(dim3 bidx, dim3 bdim, const std::function<void()>& body) {
  BlockRun b;
  b.block_idx = bidx, b.block_dim = bdim;
  b.n = int(bdim.x * bdim.y * bdim.z);
  b.fibers.resize(b.n);
  b.lanes.assign(b.n, 0);
  b.body = &body;
  current_block() = &b;
  for (int t = 0; t < b.n; ++t) {
    Fiber& f = b.fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = fiber_stack(t);
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  auto fail = [&](const std::string& why) {
    last_error() = "emulated block (" + std::to_string(bidx.x) + ", " + std::to_string(bidx.y) + "): " + why;
    current_block() = nullptr;
    return false;
  };
  for (;;) {
    for (int t = 0; t < b.n; ++t) {
      if (b.fibers[t].state != 0) continue;
      b.current = t;
      swapcontext(&b.sched, &b.fibers[t].ctx);
    }
    int exited = 0, at_block = 0;
    for (const Fiber& f : b.fibers) exited += f.state == 3, at_block += f.state == 1;
    if (exited == b.n) break;
    bool released = false;
    for (int w0 = 0; w0 < b.n; w0 += 32) {  // warp barriers (shuffles)
      const int w1 = std::min(b.n, w0 + 32);
      int waiting = 0, gone = 0;
      for (int t = w0; t < w1; ++t) waiting += b.fibers[t].state == 2, gone += b.fibers[t].state == 3;
      if (waiting == 0) continue;
      if (w1 - w0 < 32) return fail("full-mask warp shuffle in a partial warp of " + std::to_string(w1 - w0));
      if (waiting + gone == 32 && gone > 0) return fail("warp shuffle with exited lanes");
      if (waiting == 32) {
        for (int t = w0; t < w1; ++t) b.fibers[t].state = 0;
        released = true;
      }
    }
    if (!released && at_block > 0) {
      if (at_block + exited < b.n) {
        // some threads wait elsewhere (a warp barrier not complete): wait for them
      } else if (exited > 0) {
        return fail("__syncthreads after " + std::to_string(exited) + " threads exited");
      } else {
        for (Fiber& f : b.fibers) f.state = 0;
        released = true;
      }
    }
    if (!released) return fail("deadlock: no thread can proceed");
  }
  current_block() = nullptr;
  return true;
}

template <class... P, class... Args>
void launch_kernel(dim3 grid, dim3 block, size_t /*smem*/, cudaStream_t /*stream*/, void (*kernel)(P...),
                   Args&&... args) {
  if (!last_error().empty()) return;  // sticky, as a CUDA launch error would be
  std::tuple<std::decay_t<P>...> params(std::forward<Args>(args)...);
  const std::function<void()> body = [&] { std::apply(kernel, params); };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x)
        if (!run_block(dim3(x, y, z), block, body)) return;
}

template <class T>
T exchange(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  BlockRun& b = *current_block();
  const int me = b.current, base = me & ~31;
  std::memcpy(&b.lanes[me], &v, sizeof(T));
  yield_with(2);  // every lane has written
  T out;
  std::memcpy(&out, &b.lanes[base + src_lane], sizeof(T));
  yield_with(2);  // every lane has read before the slots are reused
  return out;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())

inline void __syncthreads() { ::emu::yield_with(1); }

template <class T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  return ::emu::exchange(v, (::emu::current_block()->current & 31) ^ lane_mask);
}
template <class T>
T __shfl_down_sync(unsigned /*mask*/, T v, unsigned delta) {
  const int lane = ::emu::current_block()->current & 31;
  const int src = lane + int(delta);
  T out = ::emu::exchange(v, src < 32 ? src : lane);  // out of range: the caller's own value
  return out;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = 132;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  if (::emu::last_error().empty()) return cudaSuccess;
  return cudaErrorLaunchFailure;
}
inline const char* cudaGetErrorString(cudaError_t) { return ::emu::last_error().c_str(); }
