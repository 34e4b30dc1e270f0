// Input checks and dtype rules shared by the CPU, CUDA and Meta kernels of the box ops.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "box_math.h"

namespace e2evlp {

inline void check_float_tensor(const at::Tensor& t, const char* op, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble, op,
              ": ", name, " must be float16, bfloat16, float32 or float64, got ", dtype);
}

inline void check_int_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type()) &&
                  t.scalar_type() != at::kBool,
              op, ": ", name, " must be an integer tensor, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name, " is on ", b.device(), " but the predictions are on ",
              a.device());
}

// float64 when any input is float64, else float32 (fp16/bf16 are computed in float32).
inline at::ScalarType box_compute_dtype(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline int parse_class_cost(const std::string& class_cost) {
  TORCH_CHECK(class_cost == "softmax" || class_cost == "focal",
              "matching_cost: class_cost must be 'softmax' or 'focal', got '", class_cost, "'");
  return class_cost == "softmax" ? kSoftmaxCost : kFocalCost;
}

inline void check_matching_cost_inputs(const at::Tensor& logits, const at::Tensor& boxes, const at::Tensor& labels,
                                       const at::Tensor& tgt_boxes, const at::Tensor& num_targets) {
  constexpr const char* op = "matching_cost";
  check_float_tensor(logits, op, "pred_logits");
  check_float_tensor(boxes, op, "pred_boxes");
  check_float_tensor(tgt_boxes, op, "tgt_boxes");
  check_int_tensor(labels, op, "tgt_labels");
  check_int_tensor(num_targets, op, "num_targets");
  TORCH_CHECK(logits.dim() == 3, op, ": pred_logits must be [B, Q, C], got ", logits.sizes());
  const int64_t B = logits.size(0), Q = logits.size(1);
  TORCH_CHECK(boxes.dim() == 3 && boxes.size(0) == B && boxes.size(1) == Q && boxes.size(2) == 4, op,
              ": pred_boxes must be [", B, ", ", Q, ", 4], got ", boxes.sizes());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == B, op, ": tgt_labels must be [", B, ", T], got ",
              labels.sizes());
  const int64_t T = labels.size(1);
  TORCH_CHECK(tgt_boxes.dim() == 3 && tgt_boxes.size(0) == B && tgt_boxes.size(1) == T && tgt_boxes.size(2) == 4,
              op, ": tgt_boxes must be [", B, ", ", T, ", 4], got ", tgt_boxes.sizes());
  TORCH_CHECK(num_targets.dim() == 1 && num_targets.size(0) == B, op, ": num_targets must be [", B, "], got ",
              num_targets.sizes());
  TORCH_CHECK(logits.size(2) > 0 || T == 0, op, ": pred_logits has no classes");
  check_same_device(logits, boxes, op, "pred_boxes");
  check_same_device(logits, labels, op, "tgt_labels");
  check_same_device(logits, tgt_boxes, op, "tgt_boxes");
  check_same_device(logits, num_targets, op, "num_targets");
}

inline void check_box_pairs(const at::Tensor& pred, const at::Tensor& target, const char* op) {
  check_float_tensor(pred, op, "pred");
  check_float_tensor(target, op, "target");
  TORCH_CHECK(pred.dim() == 2 && pred.size(1) == 4, op, ": pred must be [P, 4] cxcywh boxes, got ", pred.sizes());
  TORCH_CHECK(target.sizes() == pred.sizes(), op, ": target must match pred's shape ", pred.sizes(), ", got ",
              target.sizes());
  check_same_device(pred, target, op, "target");
}

inline void check_box_loss_grads(const at::Tensor& grad_l1, const at::Tensor& grad_giou, const at::Tensor& pred) {
  constexpr const char* op = "box_losses_backward";
  TORCH_CHECK(grad_l1.dim() == 1 && grad_l1.size(0) == pred.size(0), op, ": grad_l1 must be [", pred.size(0),
              "], got ", grad_l1.sizes());
  TORCH_CHECK(grad_giou.dim() == 1 && grad_giou.size(0) == pred.size(0), op, ": grad_giou must be [", pred.size(0),
              "], got ", grad_giou.sizes());
  check_float_tensor(grad_l1, op, "grad_l1");
  check_float_tensor(grad_giou, op, "grad_giou");
  // A gradient left on another device would hand the CUDA kernel a host pointer: an illegal address that
  // kills the CUDA context.
  check_same_device(pred, grad_l1, op, "grad_l1");
  check_same_device(pred, grad_giou, op, "grad_giou");
}

}  // namespace e2evlp
