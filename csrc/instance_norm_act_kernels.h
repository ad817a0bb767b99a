// Kernel-side interface of instance_norm_act: plain pointers and sizes, no torch headers, so the
// CPU kernels (compiled once per ISA) and the CUDA kernels (nvcc) build fast. The torch wrappers
// (instance_norm_act.cpp, instance_norm_act_cuda.cpp) validate, allocate and fill these structs.
//
//   y = reflection_pad(act(xhat * weight + bias) + residual, pad),  xhat = (x - mean) * rstd
//
// Layouts: `channels_last == false` means every tensor (x, residual, y, dy, dx, dresidual) is
// NCHW-contiguous; `true` means all are NHWC-contiguous. y/dy have spatial size (H+2p, W+2p).
#pragma once

#include <cstdint>

namespace fastcgan {

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };
// The activations, named and numbered as Python's fastcgan.ops.Activation (the Triton kernels'
// ACT codes); kActivationNames[code] is the name the ops take. tests/test_native.py checks the
// two lists against each other through fastcgan._C.activations().
enum class Activation : int { NONE = 0, RELU = 1, LEAKY_RELU = 2 };
constexpr const char* kActivationNames[] = {"none", "relu", "leaky_relu"};
constexpr int kNumActivations = int(sizeof(kActivationNames) / sizeof(kActivationNames[0]));

// Accumulation ("acc") type: double for Float64 input, float otherwise. weight/bias are passed
// already converted to it; the saved statistics (mean, rstd) and the per-plane backward partial
// sums are written in it (fp32 statistics would limit an fp64 backward to fp32 accuracy).
struct FwdParams {
  const void* x = nullptr;
  const void* residual = nullptr;  // same dtype and layout as x, or null
  const void* weight = nullptr;    // (C,) acc dtype, or null (= 1)
  const void* bias = nullptr;      // (C,) acc dtype, or null (= 0)
  void* y = nullptr;
  void* mean = nullptr;  // (N, C) acc dtype
  void* rstd = nullptr;  // (N, C) acc dtype
  int64_t N = 0, C = 0, H = 0, W = 0, pad = 0;
  double eps = 1e-5, slope = 0.0;
  bool channels_last = false;
  DType dtype = DType::Float32;
  Activation act = Activation::RELU;
};

struct BwdParams {
  const void* dy = nullptr;  // (N, C, H+2p, W+2p), dtype of x
  const void* x = nullptr;
  const void* weight = nullptr;  // acc dtype or null
  const void* bias = nullptr;    // acc dtype or null (needed for the activation mask)
  const void* mean = nullptr;    // (N, C) acc dtype
  const void* rstd = nullptr;    // (N, C) acc dtype
  void* dx = nullptr;
  void* dres = nullptr;     // dL/dresidual = folded dy, dtype of x; null when there is no residual
  void* sum_gz = nullptr;   // (N, C) acc dtype: per-plane sum(gz) (for dbias), or null
  void* sum_gzx = nullptr;  // (N, C) acc dtype: per-plane sum(gz * xhat) (for dweight), or null
  int64_t N = 0, C = 0, H = 0, W = 0, pad = 0;
  double slope = 0.0;
  bool channels_last = false;
  DType dtype = DType::Float32;
  Activation act = Activation::RELU;
};

// ---- CPU ----------------------------------------------------------------------------------
// The wrapper runs each phase of a plan as at::parallel_for(0, tasks[phase], grain[phase]),
// phases in order, all sharing one scratch buffer of scratch_bytes.
//  * NCHW: one phase, one task per (n, c) plane (statistics, then the output, plane in cache).
//  * NHWC: three phases so that every pass streams whole contiguous rows of W*C values and the
//    parallelism is over pixels, not over channels (N is often 1):
//      forward : 0 partial statistics per (n, chunk of pixels) | 1 merge per n | 2 one padded row
//      backward: 0 partial sums per (n, interior row)          | 1 merge per n | 2 one dx row
struct CpuPlan {
  int phases = 1;
  int64_t tasks[3] = {0, 0, 0};
  int64_t grain[3] = {1, 1, 1};
  int64_t chunk_pixels = 0, num_chunks = 0;  // NHWC forward statistics chunks
  int64_t scratch_bytes = 0;
};

inline int64_t cpu_grain_for(int64_t elems_per_task) {  // >= ~32k elements per parallel chunk
  return elems_per_task >= 32768 ? 1 : 32768 / (elems_per_task > 0 ? elems_per_task : 1);
}

inline CpuPlan cpu_plan(bool channels_last, bool backward, int64_t N, int64_t C, int64_t H, int64_t W, int64_t pad) {
  CpuPlan plan;
  if (!channels_last) {
    plan.tasks[0] = N * C;
    plan.grain[0] = cpu_grain_for(H * W);
    return plan;
  }
  const int64_t HW = H * W;
  plan.phases = 3;
  plan.tasks[1] = N;
  plan.grain[1] = 1;
  if (!backward) {
    int64_t cp = 16384 / C;
    plan.chunk_pixels = cp < 1 ? 1 : (cp > HW ? HW : cp);
    plan.num_chunks = (HW + plan.chunk_pixels - 1) / plan.chunk_pixels;
    plan.tasks[0] = N * plan.num_chunks;
    plan.grain[0] = cpu_grain_for(plan.chunk_pixels * C);
    plan.tasks[2] = N * (H + 2 * pad);
    plan.grain[2] = cpu_grain_for((W + 2 * pad) * C);
    // doubles: (mean, m2) per (n, chunk, c), then (mean, rstd) per (n, c)
    plan.scratch_bytes = int64_t(sizeof(double)) * (2 * N * plan.num_chunks * C + 2 * N * C);
  } else {
    plan.tasks[0] = N * H;
    plan.grain[0] = cpu_grain_for(W * C);
    plan.tasks[2] = N * H;
    plan.grain[2] = cpu_grain_for(W * C);
    // doubles: (sum gz, sum gz*xhat) per (n, row, c), then (c1, c2) per (n, c)
    plan.scratch_bytes = int64_t(sizeof(double)) * (2 * N * H * C + 2 * N * C);
  }
  return plan;
}

// The kernels are compiled twice: baseline x86-64/other (cpu_default) and AVX2+FMA+F16C
// (cpu_avx2, only when FASTCGAN_HAVE_CPU_AVX2). The wrapper picks one at run time.
namespace cpu_default {
void fwd(const FwdParams& p, const CpuPlan& plan, double* scratch, int phase, int64_t begin, int64_t end);
void bwd(const BwdParams& p, const CpuPlan& plan, double* scratch, int phase, int64_t begin, int64_t end);
}  // namespace cpu_default
namespace cpu_avx2 {
void fwd(const FwdParams& p, const CpuPlan& plan, double* scratch, int phase, int64_t begin, int64_t end);
void bwd(const BwdParams& p, const CpuPlan& plan, double* scratch, int phase, int64_t begin, int64_t end);
}  // namespace cpu_avx2

// CPU ISA selection (0 = auto, 1 = default, 2 = avx2); the python module exposes it for tests.
int cpu_isa_request();
void set_cpu_isa_request(int isa);
const char* cpu_isa_active();  // "avx2" or "default": what the next call will use

// ---- CUDA ----------------------------------------------------------------------------------
// Each launcher needs a scratch buffer of `*_workspace_elems` acc-dtype elements (partial
// statistics of the blocks that split one plane) and enqueues its kernels on `stream`
// (a cudaStream_t). Returns a cudaError_t as int (0 = success).
int64_t cuda_fwd_workspace_elems(const FwdParams& p, int device);
int cuda_fwd(const FwdParams& p, void* workspace, int device, void* stream);
int64_t cuda_bwd_workspace_elems(const BwdParams& p, int device);
int cuda_bwd(const BwdParams& p, void* workspace, int device, void* stream);
const char* cuda_error_string(int err);

}  // namespace fastcgan
