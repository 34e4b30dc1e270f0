// Schemas of the e2evlp:: torch ops, their Meta (fake) kernels, and the Python module e2evlp._C.
#include <torch/extension.h>
#include <torch/library.h>

#include "boxes_common.h"
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

at::Tensor matching_cost_meta(const at::Tensor& pred_logits, const at::Tensor& pred_boxes, const at::Tensor& tgt_labels,
                              const at::Tensor& tgt_boxes, const at::Tensor& num_targets, double, double, double,
                              c10::string_view class_cost, double, double) {
  check_matching_cost_inputs(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets);
  parse_class_cost(std::string(class_cost));
  return at::empty({pred_logits.size(0), pred_logits.size(1), tgt_labels.size(1)},
                   pred_logits.options().dtype(box_compute_dtype(pred_logits, pred_boxes)));
}

std::tuple<at::Tensor, at::Tensor> box_losses_meta(const at::Tensor& pred, const at::Tensor& target) {
  check_box_pairs(pred, target, "box_losses");
  const auto options = pred.options().dtype(at::promote_types(pred.scalar_type(), target.scalar_type()));
  return {at::empty({pred.size(0)}, options), at::empty({pred.size(0)}, options)};
}

std::tuple<at::Tensor, at::Tensor> box_losses_backward_meta(const at::Tensor& grad_l1, const at::Tensor& grad_giou,
                                                            const at::Tensor& pred, const at::Tensor& target) {
  check_box_pairs(pred, target, "box_losses_backward");
  check_box_loss_grads(grad_l1, grad_giou, pred);
  return {at::empty(pred.sizes(), pred.options()), at::empty(target.sizes(), target.options())};
}

TORCH_LIBRARY(e2evlp, m) {
  m.def(
      "linear_sum_assignment(Tensor cost, Tensor? num_rows, Tensor? num_cols, bool maximize) "
      "-> (Tensor assignment, Tensor status)");
  m.def(
      "matching_cost(Tensor pred_logits, Tensor pred_boxes, Tensor tgt_labels, Tensor tgt_boxes, "
      "Tensor num_targets, float w_class, float w_bbox, float w_giou, str class_cost, float focal_alpha, "
      "float focal_gamma) -> Tensor");
  m.def("box_losses(Tensor pred, Tensor target) -> (Tensor l1, Tensor giou)");
  m.def(
      "box_losses_backward(Tensor grad_l1, Tensor grad_giou, Tensor pred, Tensor target) "
      "-> (Tensor grad_pred, Tensor grad_target)");
}

TORCH_LIBRARY_IMPL(e2evlp, Meta, m) {
  m.impl("linear_sum_assignment", &linear_sum_assignment_meta);
  m.impl("matching_cost", &matching_cost_meta);
  m.impl("box_losses", &box_losses_meta);
  m.impl("box_losses_backward", &box_losses_backward_meta);
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
