// Schemas of the e2evlp:: torch ops, their Meta (fake) kernels, and the Python module e2evlp._C.
#include <torch/extension.h>
#include <torch/library.h>

#include "lsap_common.h"

#ifndef E2EVLP_WITH_CUDA
#define E2EVLP_WITH_CUDA 0
#endif
#ifndef E2EVLP_TORCH_VERSION
#define E2EVLP_TORCH_VERSION "unknown"
#endif
#ifndef E2EVLP_CUDA_ARCHS
#define E2EVLP_CUDA_ARCHS ""
#endif

namespace e2evlp {

std::tuple<at::Tensor, at::Tensor> linear_sum_assignment_meta(const at::Tensor& cost,
                                                              const std::optional<at::Tensor>& num_rows,
                                                              const std::optional<at::Tensor>& num_cols,
                                                              bool maximize) {
  check_lsap_cost(cost);
  checked_lsap_counts(num_rows, "num_rows", cost);
  checked_lsap_counts(num_cols, "num_cols", cost);
  auto assignment = at::empty({cost.size(0), cost.size(1)}, cost.options().dtype(at::kLong));
  auto status = at::empty({cost.size(0)}, cost.options().dtype(at::kInt));
  return {assignment, status};
}

TORCH_LIBRARY(e2evlp, m) {
  m.def(
      "linear_sum_assignment(Tensor cost, Tensor? num_rows, Tensor? num_cols, bool maximize) "
      "-> (Tensor assignment, Tensor status)");
}

TORCH_LIBRARY_IMPL(e2evlp, Meta, m) {
  m.impl("linear_sum_assignment", &linear_sum_assignment_meta);
}

}  // namespace e2evlp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "e2evlp compiled kernels; the ops are registered under torch.ops.e2evlp";
  m.def("build_info", []() {
    pybind11::dict info;
    info["with_cuda"] = static_cast<bool>(E2EVLP_WITH_CUDA);
    info["torch"] = std::string(E2EVLP_TORCH_VERSION);
    info["cuda_archs"] = std::string(E2EVLP_CUDA_ARCHS);
    return info;
  });
}
