// Input checks shared by the CPU and CUDA implementations of e2evlp::linear_sum_assignment.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace e2evlp {

inline void check_lsap_cost(const at::Tensor& cost) {
  TORCH_CHECK(cost.dim() == 3, "linear_sum_assignment: cost must be [B, N, M], got ", cost.dim(), " dims");
  const auto dtype = cost.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
              "linear_sum_assignment: cost must be float16, bfloat16, float32 or float64, got ", dtype);
}

// Returns the per-item counts as a contiguous int64 tensor on cost's device (undefined when absent).
inline at::Tensor checked_lsap_counts(const std::optional<at::Tensor>& counts, const char* name,
                                      const at::Tensor& cost) {
  if (!counts.has_value()) return {};
  const at::Tensor& t = counts.value();
  TORCH_CHECK(t.dim() == 1 && t.size(0) == cost.size(0), "linear_sum_assignment: ", name, " must have shape [",
              cost.size(0), "], got ", t.sizes());
  TORCH_CHECK(t.device() == cost.device(), "linear_sum_assignment: ", name, " is on ", t.device(),
              " but cost is on ", cost.device());
  TORCH_CHECK(!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type()),
              "linear_sum_assignment: ", name, " must be an integer tensor, got ", t.scalar_type());
  return t.to(at::kLong).contiguous();
}

}  // namespace e2evlp
