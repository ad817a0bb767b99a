// instance_norm_act as torch ops: schema, boundary checks, CPU registration.
//
//   fastcgan::instance_norm_act_native_fwd(x, weight?, bias?, residual?, activation, negative_slope,
//                                          pad, eps) -> (y, mean, rstd)
//   fastcgan::instance_norm_act_native_bwd(dy, x, weight?, bias?, mean, rstd, activation,
//                                          negative_slope, pad, has_residual)
//                                          -> (dx, dweight, dbias, dresidual)
//
// Contract (the executable spec is contract_forward / contract_backward in
// fastcgan/ops/instance_norm_act.py): mean/rstd are fp32 (N, C);
// y/dx/dresidual are channels_last iff x is channels_last-contiguous and not NCHW-contiguous;
// gradients that are not needed come back as empty (0,) tensors; dbias has weight's shape and
// dtype when there is a weight but no bias. A residual of another dtype than x is cast to x's
// before it is added (the spec adds it in fp32: for an fp32 residual with bf16 x, one bf16 step
// apart in a third of the outputs), so instance_norm_act() sends such calls to the reference; a
// ResNet block's residual has x's dtype.
#include "instance_norm_act.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace fastcgan {
namespace {

constexpr const char* kFwdName = "fastcgan::instance_norm_act_native_fwd";
constexpr const char* kBwdName = "fastcgan::instance_norm_act_native_bwd";

bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }

Activation parse_activation(const char* op, c10::string_view a) {
  for (int code = 0; code < kNumActivations; ++code)
    if (a == kActivationNames[code]) return static_cast<Activation>(code);
  std::string names;  // formatted like the Python message: ('none', 'relu', 'leaky_relu')
  for (int code = 0; code < kNumActivations; ++code)
    names += std::string(code ? ", '" : "'") + kActivationNames[code] + "'";
  TORCH_CHECK(false, op, ": activation must be one of (", names, "), got '", std::string(a), "'");
}

DType kernel_dtype(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_x(const char* op, const at::Tensor& x, c10::DeviceType device_type) {
  TORCH_CHECK(x.defined(), op, ": x is undefined");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got shape ", x.sizes());
  kernel_dtype(op, "x", x);
  TORCH_CHECK(x.numel() > 0, op, ": x must not be empty, got shape ", x.sizes());
  TORCH_CHECK(x.device().type() == device_type, op, ": the ", c10::DeviceTypeName(device_type),
              " kernel got x on ", x.device());
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

void check_param(const char* op, const char* name, const OptTensor& p, const at::Tensor& x) {
  if (!defined(p)) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1), op, ": ", name, " must have shape (", x.size(1),
              ",) to match x's channels, got ", p->sizes());
  TORCH_CHECK(p->is_floating_point(), op, ": ", name, " must be floating point, got ", p->scalar_type());
  check_same_device(op, name, *p, x);
}

void check_pad(const char* op, int64_t pad, int64_t H, int64_t W) {
  TORCH_CHECK(pad >= 0, op, ": pad must be >= 0, got ", pad);
  TORCH_CHECK(pad == 0 || (pad < H && pad < W), op, ": reflection pad ", pad,
              " must be smaller than H and W (got H=", H, ", W=", W, ")");
  // The CUDA kernels index within one (padded) plane in 32-bit.
  TORCH_CHECK((H + 2 * pad) * (W + 2 * pad) < (int64_t(1) << 31), op, ": a padded plane of ", H + 2 * pad, "x",
              W + 2 * pad, " exceeds 2^31 elements");
}

at::ScalarType acc_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::MemoryFormat layout_of(const at::Tensor& x) {
  // Same rule as fastcgan.ops.output_memory_format.
  return (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ? at::MemoryFormat::ChannelsLast
                                                                                  : at::MemoryFormat::Contiguous;
}

at::Tensor acc_param(const OptTensor& p, at::ScalarType acc) {
  return defined(p) ? p->to(acc).contiguous() : at::Tensor();
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

at::Tensor empty_grad(const at::Tensor& x) { return at::empty({0}, x.options()); }

}  // namespace

FwdCall prepare_fwd(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
                    c10::string_view activation, double negative_slope, int64_t pad, double eps,
                    c10::DeviceType device_type) {
  const char* op = kFwdName;
  check_x(op, x, device_type);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  check_param(op, "weight", weight, x);
  check_param(op, "bias", bias, x);
  if (defined(residual)) {
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual must have x's shape ", x.sizes(), ", got ",
                residual->sizes());
    TORCH_CHECK(residual->is_floating_point(), op, ": residual must be floating point, got ",
                residual->scalar_type());
    check_same_device(op, "residual", *residual, x);
  }
  check_pad(op, pad, H, W);
  TORCH_CHECK(eps > 0, op, ": eps must be positive, got ", eps);
  const Activation act = parse_activation(op, activation);

  FwdCall call;
  const at::MemoryFormat fmt = layout_of(x);
  const at::ScalarType acc = acc_dtype(x);
  call.x = x.contiguous(fmt);
  if (defined(residual)) call.residual = residual->to(x.scalar_type()).contiguous(fmt);
  call.weight = acc_param(weight, acc);
  call.bias = acc_param(bias, acc);
  call.y = at::empty({N, C, H + 2 * pad, W + 2 * pad}, x.options().memory_format(fmt));
  call.mean = at::empty({N, C}, x.options().dtype(acc));  // fp64 statistics for fp64 input
  call.rstd = at::empty({N, C}, x.options().dtype(acc));

  FwdParams& p = call.params;
  p.x = call.x.const_data_ptr();
  p.residual = ptr_or_null(call.residual);
  p.weight = ptr_or_null(call.weight);
  p.bias = ptr_or_null(call.bias);
  p.y = call.y.data_ptr();
  p.mean = call.mean.data_ptr();
  p.rstd = call.rstd.data_ptr();
  p.N = N, p.C = C, p.H = H, p.W = W, p.pad = pad;
  p.eps = eps;
  p.slope = negative_slope;
  p.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  p.dtype = kernel_dtype(op, "x", x);
  p.act = act;
  return call;
}

BwdCall prepare_bwd(const at::Tensor& dy, const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                    const at::Tensor& mean, const at::Tensor& rstd, c10::string_view activation,
                    double negative_slope, int64_t pad, bool has_residual, c10::DeviceType device_type) {
  const char* op = kBwdName;
  check_x(op, x, device_type);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  check_param(op, "weight", weight, x);
  check_param(op, "bias", bias, x);
  check_pad(op, pad, H, W);
  TORCH_CHECK(dy.defined() && dy.dim() == 4 && dy.size(0) == N && dy.size(1) == C && dy.size(2) == H + 2 * pad &&
                  dy.size(3) == W + 2 * pad,
              op, ": dy must have shape (", N, ", ", C, ", ", H + 2 * pad, ", ", W + 2 * pad,
              ") for x of shape ", x.sizes(), " and pad ", pad, ", got ", dy.sizes());
  TORCH_CHECK(dy.is_floating_point(), op, ": dy must be floating point, got ", dy.scalar_type());
  check_same_device(op, "dy", dy, x);
  auto check_stat = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.defined() && t.dim() == 2 && t.size(0) == N && t.size(1) == C, op, ": ", name,
                " must have shape (", N, ", ", C, "), got ", t.sizes());
    TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be floating point, got ", t.scalar_type());
    check_same_device(op, name, t, x);
  };
  check_stat("mean", mean);
  check_stat("rstd", rstd);
  const Activation act = parse_activation(op, activation);

  BwdCall call;
  const at::MemoryFormat fmt = layout_of(x);
  const at::ScalarType acc = acc_dtype(x);
  call.weight_in = weight;
  call.bias_in = bias;
  call.x = x.contiguous(fmt);
  call.dy = dy.to(x.scalar_type()).contiguous(fmt);
  call.weight = acc_param(weight, acc);
  call.bias = acc_param(bias, acc);
  call.mean = mean.to(acc).contiguous();
  call.rstd = rstd.to(acc).contiguous();
  call.dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (has_residual) call.dres = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (defined(weight) || defined(bias)) call.sum_gz = at::empty({N, C}, x.options().dtype(acc));
  if (defined(weight)) call.sum_gzx = at::empty({N, C}, x.options().dtype(acc));

  BwdParams& p = call.params;
  p.dy = call.dy.const_data_ptr();
  p.x = call.x.const_data_ptr();
  p.weight = ptr_or_null(call.weight);
  p.bias = ptr_or_null(call.bias);
  p.mean = call.mean.const_data_ptr();
  p.rstd = call.rstd.const_data_ptr();
  p.dx = call.dx.data_ptr();
  p.dres = call.dres.defined() ? call.dres.data_ptr() : nullptr;
  p.sum_gz = call.sum_gz.defined() ? call.sum_gz.data_ptr() : nullptr;
  p.sum_gzx = call.sum_gzx.defined() ? call.sum_gzx.data_ptr() : nullptr;
  p.N = N, p.C = C, p.H = H, p.W = W, p.pad = pad;
  p.slope = negative_slope;
  p.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  p.dtype = kernel_dtype(op, "x", x);
  p.act = act;
  return call;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_bwd(BwdCall& call) {
  const int64_t dim0[1] = {0};
  const at::IntArrayRef over_n(dim0, 1);  // sum the per-plane partials over the batch
  at::Tensor dw = empty_grad(call.x), db = empty_grad(call.x);
  if (defined(call.weight_in)) dw = call.sum_gzx.sum(over_n).to(call.weight_in->scalar_type());
  if (defined(call.bias_in))
    db = call.sum_gz.sum(over_n).to(call.bias_in->scalar_type());
  else if (defined(call.weight_in))  // unused by autograd; keeps the fake's shape/dtype contract
    db = call.sum_gz.sum(over_n).to(call.weight_in->scalar_type());
  at::Tensor dres = call.dres.defined() ? call.dres : empty_grad(call.x);
  return {call.dx, dw, db, dres};
}

// ---- CPU ISA selection ---------------------------------------------------------------------
namespace {
std::atomic<int> g_isa_request{-1};  // -1: not yet read from FASTCGAN_CPU_ISA

bool avx2_usable() {
#if defined(FASTCGAN_HAVE_CPU_AVX2) && (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}
}  // namespace

int cpu_isa_request() {
  int r = g_isa_request.load();
  if (r < 0) {
    const char* env = std::getenv("FASTCGAN_CPU_ISA");  // "default" forces the baseline kernels
    r = (env && std::strcmp(env, "default") == 0) ? 1 : 0;
    g_isa_request.store(r);
  }
  return r;
}

void set_cpu_isa_request(int isa) {
  TORCH_CHECK(isa >= 0 && isa <= 2, "fastcgan: cpu isa request must be 0 (auto), 1 (default) or 2 (avx2)");
  TORCH_CHECK(isa != 2 || avx2_usable(), "fastcgan: the AVX2 CPU kernels are not built or this CPU lacks AVX2/FMA/F16C");
  g_isa_request.store(isa);
}

const char* cpu_isa_active() { return (cpu_isa_request() != 1 && avx2_usable()) ? "avx2" : "default"; }

namespace {

bool use_avx2() { return cpu_isa_request() != 1 && avx2_usable(); }

using CpuFwdFn = void (*)(const FwdParams&, const CpuPlan&, double*, int, int64_t, int64_t);
using CpuBwdFn = void (*)(const BwdParams&, const CpuPlan&, double*, int, int64_t, int64_t);

template <typename Params, typename Fn>
void run_cpu_plan(const Params& p, const CpuPlan& plan, Fn kernel) {
  std::vector<double> scratch(size_t(plan.scratch_bytes) / sizeof(double));
  for (int phase = 0; phase < plan.phases; ++phase)
    at::parallel_for(0, plan.tasks[phase], plan.grain[phase],
                     [&](int64_t b, int64_t e) { kernel(p, plan, scratch.data(), phase, b, e); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& x, const OptTensor& weight,
                                                       const OptTensor& bias, const OptTensor& residual,
                                                       c10::string_view activation, double negative_slope,
                                                       int64_t pad, double eps) {
  FwdCall call = prepare_fwd(x, weight, bias, residual, activation, negative_slope, pad, eps, c10::DeviceType::CPU);
  const FwdParams& p = call.params;
  CpuFwdFn kernel = cpu_default::fwd;
#if defined(FASTCGAN_HAVE_CPU_AVX2)
  if (use_avx2()) kernel = cpu_avx2::fwd;
#endif
  run_cpu_plan(p, cpu_plan(p.channels_last, false, p.N, p.C, p.H, p.W, p.pad), kernel);
  return {call.y, call.mean, call.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const at::Tensor& mean,
    const at::Tensor& rstd, c10::string_view activation, double negative_slope, int64_t pad, bool has_residual) {
  BwdCall call = prepare_bwd(dy, x, weight, bias, mean, rstd, activation, negative_slope, pad, has_residual,
                             c10::DeviceType::CPU);
  const BwdParams& p = call.params;
  CpuBwdFn kernel = cpu_default::bwd;
#if defined(FASTCGAN_HAVE_CPU_AVX2)
  if (use_avx2()) kernel = cpu_avx2::bwd;
#endif
  run_cpu_plan(p, cpu_plan(p.channels_last, true, p.N, p.C, p.H, p.W, p.pad), kernel);
  return finish_bwd(call);
}

}  // namespace
}  // namespace fastcgan

// FRAGMENT: the Python custom ops (fastcgan::instance_norm_act_fwd/_bwd, torch.library.custom_op)
// live in the same namespace, and a second TORCH_LIBRARY(fastcgan) anywhere would be an error.
TORCH_LIBRARY_FRAGMENT(fastcgan, m) {
  m.def(
      "instance_norm_act_native_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, str activation, "
      "float negative_slope, int pad, float eps) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def(
      "instance_norm_act_native_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
      "str activation, float negative_slope, int pad, bool has_residual) "
      "-> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dresidual)");
}

TORCH_LIBRARY_IMPL(fastcgan, CPU, m) {
  m.impl("instance_norm_act_native_fwd", &fastcgan::fwd_cpu);
  m.impl("instance_norm_act_native_bwd", &fastcgan::bwd_cpu);
}
