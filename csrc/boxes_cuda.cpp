// CUDA entry points of the box ops: checks, dtype handling, and launches on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "boxes.h"
#include "boxes_common.h"

namespace e2evlp {
namespace {

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

at::Tensor matching_cost_cuda(const at::Tensor& pred_logits, const at::Tensor& pred_boxes, const at::Tensor& tgt_labels,
                              const at::Tensor& tgt_boxes, const at::Tensor& num_targets, double w_class,
                              double w_bbox, double w_giou, c10::string_view class_cost, double focal_alpha,
                              double focal_gamma) {
  check_matching_cost_inputs(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets);
  const c10::cuda::CUDAGuard guard(pred_logits.device());
  const auto dtype = box_compute_dtype(pred_logits, pred_boxes);
  const at::Tensor logits = pred_logits.to(dtype).contiguous(), boxes = pred_boxes.to(dtype).contiguous();
  const at::Tensor tboxes = tgt_boxes.to(dtype).contiguous();
  const at::Tensor labels = tgt_labels.to(at::kLong).contiguous(), counts = num_targets.to(at::kLong).contiguous();
  at::Tensor out = at::empty({logits.size(0), logits.size(1), labels.size(1)}, logits.options());
  MatchingCostArgs args{};
  args.is_double = dtype == at::kDouble;
  args.logits = logits.const_data_ptr();
  args.boxes = boxes.const_data_ptr();
  args.labels = labels.const_data_ptr<int64_t>();
  args.tgt_boxes = tboxes.const_data_ptr();
  args.num_targets = counts.const_data_ptr<int64_t>();
  args.batch = logits.size(0);
  args.queries = logits.size(1);
  args.classes = logits.size(2);
  args.targets = labels.size(1);
  args.w_class = w_class;
  args.w_bbox = w_bbox;
  args.w_giou = w_giou;
  args.class_cost = parse_class_cost(std::string(class_cost));
  args.focal_alpha = focal_alpha;
  args.focal_gamma = focal_gamma;
  args.out = out.mutable_data_ptr();
  check_launch(matching_cost_cuda_launch(args, current_stream()), "matching_cost");
  return out;
}

std::tuple<at::Tensor, at::Tensor> box_losses_cuda(const at::Tensor& pred, const at::Tensor& target) {
  check_box_pairs(pred, target, "box_losses");
  const c10::cuda::CUDAGuard guard(pred.device());
  const auto dtype = box_compute_dtype(pred, target);
  const at::Tensor a = pred.to(dtype).contiguous(), b = target.to(dtype).contiguous();
  at::Tensor l1 = at::empty({a.size(0)}, a.options()), giou = at::empty({a.size(0)}, a.options());
  BoxLossArgs args{};
  args.is_double = dtype == at::kDouble;
  args.count = a.size(0);
  args.pred = a.const_data_ptr();
  args.target = b.const_data_ptr();
  args.l1 = l1.mutable_data_ptr();
  args.giou = giou.mutable_data_ptr();
  check_launch(box_losses_cuda_launch(args, current_stream()), "box_losses");
  const auto out_dtype = at::promote_types(pred.scalar_type(), target.scalar_type());
  return {l1.to(out_dtype), giou.to(out_dtype)};
}

std::tuple<at::Tensor, at::Tensor> box_losses_backward_cuda(const at::Tensor& grad_l1, const at::Tensor& grad_giou,
                                                            const at::Tensor& pred, const at::Tensor& target) {
  check_box_pairs(pred, target, "box_losses_backward");
  check_box_loss_grads(grad_l1, grad_giou, pred);
  const c10::cuda::CUDAGuard guard(pred.device());
  const auto dtype = box_compute_dtype(pred, target);
  const at::Tensor a = pred.to(dtype).contiguous(), b = target.to(dtype).contiguous();
  const at::Tensor g1 = grad_l1.to(dtype).contiguous(), gg = grad_giou.to(dtype).contiguous();
  at::Tensor grad_pred = at::empty({a.size(0), 4}, a.options()), grad_target = at::empty({a.size(0), 4}, a.options());
  BoxLossArgs args{};
  args.is_double = dtype == at::kDouble;
  args.count = a.size(0);
  args.pred = a.const_data_ptr();
  args.target = b.const_data_ptr();
  args.grad_l1 = g1.const_data_ptr();
  args.grad_giou = gg.const_data_ptr();
  args.grad_pred = grad_pred.mutable_data_ptr();
  args.grad_target = grad_target.mutable_data_ptr();
  check_launch(box_losses_backward_cuda_launch(args, current_stream()), "box_losses_backward");
  return {grad_pred.to(pred.scalar_type()), grad_target.to(target.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(e2evlp, CUDA, m) {
  m.impl("matching_cost", &matching_cost_cuda);
  m.impl("box_losses", &box_losses_cuda);
  m.impl("box_losses_backward", &box_losses_backward_cuda);
}

}  // namespace e2evlp
