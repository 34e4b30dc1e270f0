// Box ops: the plain-pointer interface of the CUDA launchers (kept free of ATen so .cu files compile fast).
#pragma once

#include <cstdint>

namespace e2evlp {

// Weighted DETR matching cost [B, Q, T] per image. Scalars are float or double (is_double).
struct MatchingCostArgs {
  bool is_double;
  const void* logits;       // [B, Q, C1]
  const void* boxes;        // [B, Q, 4] cxcywh
  const int64_t* labels;    // [B, T]
  const void* tgt_boxes;    // [B, T, 4] cxcywh
  const int64_t* num_targets;  // [B]
  int64_t batch, queries, classes, targets;
  double w_class, w_bbox, w_giou;
  int class_cost;           // ClassCost in box_math.h
  double focal_alpha, focal_gamma;
  void* out;                // [B, Q, T]
};

// Per-pair L1 and GIoU loss of `count` cxcywh box pairs, and their backward.
struct BoxLossArgs {
  bool is_double;
  int64_t count;
  const void* pred;         // [P, 4]
  const void* target;       // [P, 4]
  void* l1;                 // [P] forward output
  void* giou;               // [P] forward output
  const void* grad_l1;      // [P] backward input
  const void* grad_giou;    // [P] backward input
  void* grad_pred;          // [P, 4] backward output
  void* grad_target;        // [P, 4] backward output
};

// Each returns a cudaError_t value (0 on success); `stream` is a cudaStream_t.
int matching_cost_cuda_launch(const MatchingCostArgs& args, void* stream);
int box_losses_cuda_launch(const BoxLossArgs& args, void* stream);
int box_losses_backward_cuda_launch(const BoxLossArgs& args, void* stream);

}  // namespace e2evlp
