// CUDA registration of instance_norm_act: boundary checks (shared with the CPU path), a device
// guard, the current stream, a small workspace for per-chunk partials; the kernels live in
// instance_norm_act_cuda.cu. Compiled by the host compiler: only c10/cuda headers, no nvcc.
#include "instance_norm_act.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace fastcgan {
namespace {

at::Tensor workspace(const at::Tensor& x, int64_t elems) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({std::max<int64_t>(elems, 1)}, x.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& x, const OptTensor& weight,
                                                        const OptTensor& bias, const OptTensor& residual,
                                                        c10::string_view activation, double negative_slope,
                                                        int64_t pad, double eps) {
  TORCH_CHECK(x.is_cuda(), "fastcgan::instance_norm_act_native_fwd: the CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  FwdCall call = prepare_fwd(x, weight, bias, residual, activation, negative_slope, pad, eps, c10::DeviceType::CUDA);
  const int dev = x.get_device();
  at::Tensor work = workspace(x, cuda_fwd_workspace_elems(call.params, dev));
  const int err = cuda_fwd(call.params, work.data_ptr(), dev, c10::cuda::getCurrentCUDAStream(dev).stream());
  TORCH_CHECK(err == 0, "fastcgan::instance_norm_act_native_fwd: CUDA kernel launch failed: ", cuda_error_string(err));
  return {call.y, call.mean, call.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const at::Tensor& mean,
    const at::Tensor& rstd, c10::string_view activation, double negative_slope, int64_t pad, bool has_residual) {
  TORCH_CHECK(x.is_cuda(), "fastcgan::instance_norm_act_native_bwd: the CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  BwdCall call = prepare_bwd(dy, x, weight, bias, mean, rstd, activation, negative_slope, pad, has_residual,
                             c10::DeviceType::CUDA);
  const int dev = x.get_device();
  at::Tensor work = workspace(x, cuda_bwd_workspace_elems(call.params, dev));
  const int err = cuda_bwd(call.params, work.data_ptr(), dev, c10::cuda::getCurrentCUDAStream(dev).stream());
  TORCH_CHECK(err == 0, "fastcgan::instance_norm_act_native_bwd: CUDA kernel launch failed: ", cuda_error_string(err));
  return finish_bwd(call);  // sums the per-plane partials over N on the same stream
}

}  // namespace
}  // namespace fastcgan

TORCH_LIBRARY_IMPL(fastcgan, CUDA, m) {
  m.impl("instance_norm_act_native_fwd", &fastcgan::fwd_cuda);
  m.impl("instance_norm_act_native_bwd", &fastcgan::bwd_cuda);
}
