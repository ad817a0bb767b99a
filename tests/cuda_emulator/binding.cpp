// Python entry points of the emulated CUDA kernels (tests/cuda_emu.py): the same boundary code as
// csrc/instance_norm_act_cuda.cpp (prepare_fwd / prepare_bwd / finish_bwd, a workspace of the
// launcher's size) on CPU tensors, with the launchers of csrc/instance_norm_act_cuda.cu run by
// the fiber emulator of cuda_emu.h.
#include <torch/extension.h>

#include "instance_norm_act.h"

namespace fastcgan {
namespace {

at::Tensor workspace(const at::Tensor& x, int64_t elems) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // NaN-filled: a kernel that reads a partial it never wrote shows up in the results.
  return at::full({std::max<int64_t>(elems, 1)}, std::numeric_limits<double>::quiet_NaN(),
                  x.options().dtype(acc));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emu_fwd(const at::Tensor& x, const OptTensor& weight,
                                                       const OptTensor& bias, const OptTensor& residual,
                                                       const std::string& activation, double negative_slope,
                                                       int64_t pad, double eps) {
  FwdCall call = prepare_fwd(x, weight, bias, residual, activation, negative_slope, pad, eps, c10::DeviceType::CPU);
  call.y.fill_(std::numeric_limits<double>::quiet_NaN());  // every output element must be written
  at::Tensor work = workspace(x, cuda_fwd_workspace_elems(call.params, 0));
  const int err = cuda_fwd(call.params, work.data_ptr(), 0, nullptr);
  TORCH_CHECK(err == 0, "emulated CUDA forward failed: ", cuda_error_string(err));
  return {call.y, call.mean, call.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emu_bwd(
    const at::Tensor& dy, const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const at::Tensor& mean,
    const at::Tensor& rstd, const std::string& activation, double negative_slope, int64_t pad, bool has_residual) {
  BwdCall call = prepare_bwd(dy, x, weight, bias, mean, rstd, activation, negative_slope, pad, has_residual,
                             c10::DeviceType::CPU);
  call.dx.fill_(std::numeric_limits<double>::quiet_NaN());
  if (call.dres.defined()) call.dres.fill_(std::numeric_limits<double>::quiet_NaN());
  at::Tensor work = workspace(x, cuda_bwd_workspace_elems(call.params, 0));
  const int err = cuda_bwd(call.params, work.data_ptr(), 0, nullptr);
  TORCH_CHECK(err == 0, "emulated CUDA backward failed: ", cuda_error_string(err));
  return finish_bwd(call);
}

// Workspace elements the forward plan of x (relu, no affine) asks for: 0 exactly when it takes
// the one-pass kernels (tests of FASTCGAN_ONE_PASS).
int64_t emu_fwd_workspace_elems(const at::Tensor& x, int64_t pad) {
  FwdCall call = prepare_fwd(x, std::nullopt, std::nullopt, std::nullopt, "relu", 0.0, pad, 1e-5, c10::DeviceType::CPU);
  return cuda_fwd_workspace_elems(call.params, 0);
}

}  // namespace
}  // namespace fastcgan

#include "cuda_emu.h"  // after the torch headers: its macros (__shared__, threadIdx, ...) stay out of them

namespace emu {
void reset() { last_error().clear(); }
}  // namespace emu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("reset", &emu::reset, "clear the sticky launch error");
  m.def("fwd", &fastcgan::emu_fwd);
  m.def("bwd", &fastcgan::emu_bwd);
  m.def("fwd_workspace_elems", &fastcgan::emu_fwd_workspace_elems);
}
