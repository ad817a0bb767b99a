// Torch-side helpers shared by the CPU and CUDA registrations of instance_norm_act: argument
// checks at the op boundary, layout/dtype normalisation, output allocation. The kernels
// themselves see only instance_norm_act_kernels.h.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include "instance_norm_act_kernels.h"

namespace fastcgan {

using OptTensor = std::optional<at::Tensor>;

// Tensors the kernels read/write, kept alive for the call, and the params pointing into them.
struct FwdCall {
  at::Tensor x, residual, weight, bias;  // layout-normalised inputs (weight/bias in acc dtype)
  at::Tensor y, mean, rstd;              // outputs
  FwdParams params;
};

struct BwdCall {
  at::Tensor dy, x, weight, bias, mean, rstd;
  at::Tensor dx, dres, sum_gz, sum_gzx;
  OptTensor weight_in, bias_in;  // the caller's, for output dtypes
  BwdParams params;
};

FwdCall prepare_fwd(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
                    c10::string_view activation, double negative_slope, int64_t pad, double eps,
                    c10::DeviceType device_type);

BwdCall prepare_bwd(const at::Tensor& dy, const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                    const at::Tensor& mean, const at::Tensor& rstd, c10::string_view activation,
                    double negative_slope, int64_t pad, bool has_residual, c10::DeviceType device_type);

// (dx, dweight, dbias, dresidual) from a finished backward call: sums the per-plane partials
// over N and applies the op's output contract (empty tensors for gradients not needed).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_bwd(BwdCall& call);

}  // namespace fastcgan
