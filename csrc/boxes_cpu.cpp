// CPU kernels of the box ops: fused per-image DETR matching cost, and per-pair L1 + GIoU losses.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "box_math.h"
#include "boxes_common.h"
#include "parallel_cpu.h"

namespace e2evlp {
namespace {

// Targets in structure-of-arrays form, so that the per-row loop over targets vectorizes.
template <typename T>
struct TargetColumns {
  std::vector<T> cx, cy, w, h, x1, y1, x2, y2, area;

  TargetColumns(const T* boxes, int64_t n)
      : cx(n), cy(n), w(n), h(n), x1(n), y1(n), x2(n), y2(n), area(n) {
    for (int64_t k = 0; k < n; ++k) {
      const T* b = boxes + 4 * k;
      cx[k] = b[0];
      cy[k] = b[1];
      w[k] = b[2];
      h[k] = b[3];
      const BoxXYXY<T> xyxy = cxcywh_to_xyxy(b[0], b[1], b[2], b[3]);
      x1[k] = xyxy.x1;
      y1[k] = xyxy.y1;
      x2[k] = xyxy.x2;
      y2[k] = xyxy.y2;
      area[k] = box_area(xyxy);
    }
  }
};

template <typename T>
void matching_cost_rows(const T* logits, const T* probs, const T* boxes, const int64_t* labels, const TargetColumns<T>& tgt,
                        const int64_t* num_targets, int64_t Q, int64_t C1, int64_t Tn, T w_class, T w_bbox,
                        T w_giou, int class_cost, T alpha, T gamma, int64_t begin, int64_t end, T* out) {
  // out holds rows [begin, end)
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int64_t bq = begin; bq < end; ++bq) {
    const int64_t b = bq / Q;
    T* o = out + (bq - begin) * Tn;
    const int64_t nt = num_targets[b];
    if (nt < 0 || nt > Tn) {  // poisoned, so that a solver downstream refuses it
      std::fill_n(o, Tn, nan);
      continue;
    }
    const T* lg = logits + bq * C1;
    const int64_t* lb = labels + b * Tn;
    if (class_cost == kSoftmaxCost) {
      const T* prob = probs + bq * C1;  // softmax(pred_logits), as DETR takes it
      for (int64_t t = 0; t < nt; ++t) o[t] = lb[t] >= 0 && lb[t] < C1 ? w_class * -prob[lb[t]] : nan;
    } else {
      for (int64_t t = 0; t < nt; ++t) {
        o[t] = lb[t] >= 0 && lb[t] < C1
                   ? w_class * focal_class_cost(T(1) / (T(1) + std::exp(-lg[lb[t]])), alpha, gamma)
                   : nan;
      }
    }
    const T* pb = boxes + bq * 4;
    const BoxXYXY<T> p = cxcywh_to_xyxy(pb[0], pb[1], pb[2], pb[3]);
    const T p_area = box_area(p);
    const int64_t k0 = b * Tn;
    const T *cx = tgt.cx.data() + k0, *cy = tgt.cy.data() + k0, *w = tgt.w.data() + k0, *h = tgt.h.data() + k0;
    const T *x1 = tgt.x1.data() + k0, *y1 = tgt.y1.data() + k0, *x2 = tgt.x2.data() + k0, *y2 = tgt.y2.data() + k0;
    const T* area = tgt.area.data() + k0;
    const T pcx = pb[0], pcy = pb[1], pw = pb[2], ph = pb[3];
    for (int64_t t = 0; t < nt; ++t) {
      const T l1 = std::abs(pcx - cx[t]) + std::abs(pcy - cy[t]) + std::abs(pw - w[t]) + std::abs(ph - h[t]);
      const T giou = giou_value(p.x1, p.y1, p.x2, p.y2, p_area, x1[t], y1[t], x2[t], y2[t], area[t]);
      o[t] = w_bbox * l1 + o[t] + w_giou * -giou;
    }
    std::fill(o + nt, o + Tn, T(0));
  }
}

at::Tensor matching_cost_cpu(const at::Tensor& pred_logits, const at::Tensor& pred_boxes, const at::Tensor& tgt_labels,
                             const at::Tensor& tgt_boxes, const at::Tensor& num_targets, double w_class,
                             double w_bbox, double w_giou, c10::string_view class_cost, double focal_alpha,
                             double focal_gamma) {
  check_matching_cost_inputs(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets);
  const int cls = parse_class_cost(std::string(class_cost));
  const auto dtype = box_compute_dtype(pred_logits, pred_boxes);
  const at::Tensor logits = pred_logits.to(dtype).contiguous(), boxes = pred_boxes.to(dtype).contiguous();
  const at::Tensor tboxes = tgt_boxes.to(dtype).contiguous();
  const at::Tensor labels = tgt_labels.to(at::kLong).contiguous(), counts = num_targets.to(at::kLong).contiguous();
  const int64_t B = logits.size(0), Q = logits.size(1), C1 = logits.size(2), Tn = labels.size(1);
  at::Tensor out = at::empty({B, Q, Tn}, logits.options());
  if (out.numel() == 0) return out;
  // ATen's softmax is vectorized for the host CPU; the fused loop below only gathers from it.
  const at::Tensor probs = cls == kSoftmaxCost ? at::softmax(logits, -1) : logits;
  const ItemPlan plan = plan_items(B * Q, 20.0 + 8.0 * static_cast<double>(Tn));
  AT_DISPATCH_FLOATING_TYPES(dtype, "matching_cost_cpu", [&] {
    auto targets = std::make_shared<const TargetColumns<scalar_t>>(tboxes.const_data_ptr<scalar_t>(), B * Tn);
    run_items(B * Q, plan.chunk_items, plan.worth_threads,
              {{reinterpret_cast<char*>(out.mutable_data_ptr<scalar_t>()), Tn * int64_t(sizeof(scalar_t))}},
              [=](int64_t begin, int64_t end, char* const* dst) {
                matching_cost_rows<scalar_t>(logits.const_data_ptr<scalar_t>(), probs.const_data_ptr<scalar_t>(),
                                             boxes.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(),
                                             *targets, counts.const_data_ptr<int64_t>(), Q, C1, Tn,
                                             scalar_t(w_class), scalar_t(w_bbox), scalar_t(w_giou), cls,
                                             scalar_t(focal_alpha), scalar_t(focal_gamma), begin, end,
                                             reinterpret_cast<scalar_t*>(dst[0]));
              });
  });
  return out;
}

template <typename T>
void box_losses_pairs(const T* pred, const T* target, int64_t begin, int64_t end, T* l1, T* giou) {
  for (int64_t p = begin; p < end; ++p) {  // l1 and giou hold pairs [begin, end)
    const T* a = pred + 4 * p;
    const T* b = target + 4 * p;
    l1[p - begin] = std::abs(a[0] - b[0]) + std::abs(a[1] - b[1]) + std::abs(a[2] - b[2]) + std::abs(a[3] - b[3]);
    giou[p - begin] = T(1) - giou_terms(cxcywh_to_xyxy(a[0], a[1], a[2], a[3]), cxcywh_to_xyxy(b[0], b[1], b[2], b[3])).giou;
  }
}

template <typename T>
void box_losses_backward_pairs(const T* grad_l1, const T* grad_giou, const T* pred, const T* target, int64_t begin,
                               int64_t end, T* grad_pred, T* grad_target) {
  for (int64_t p = begin; p < end; ++p) {  // grad_pred and grad_target hold pairs [begin, end)
    const T* a = pred + 4 * p;
    const T* b = target + 4 * p;
    T* ga = grad_pred + 4 * (p - begin);
    T* gb = grad_target + 4 * (p - begin);
    for (int k = 0; k < 4; ++k) {
      const T g = grad_l1[p] * sign_of(a[k] - b[k]);
      ga[k] = g;
      gb[k] = -g;
    }
    const BoxXYXY<T> ba = cxcywh_to_xyxy(a[0], a[1], a[2], a[3]), bb = cxcywh_to_xyxy(b[0], b[1], b[2], b[3]);
    BoxXYXY<T> gxa{0, 0, 0, 0}, gxb{0, 0, 0, 0};
    giou_backward(ba, bb, giou_terms(ba, bb), -grad_giou[p], gxa, gxb);  // loss = 1 - giou
    xyxy_grad_to_cxcywh(gxa, ga);
    xyxy_grad_to_cxcywh(gxb, gb);
  }
}

std::tuple<at::Tensor, at::Tensor> box_losses_cpu(const at::Tensor& pred, const at::Tensor& target) {
  check_box_pairs(pred, target, "box_losses");
  const auto dtype = box_compute_dtype(pred, target);
  const at::Tensor a = pred.to(dtype).contiguous(), b = target.to(dtype).contiguous();
  const int64_t P = a.size(0);
  at::Tensor l1 = at::empty({P}, a.options()), giou = at::empty({P}, a.options());
  const ItemPlan plan = plan_items(P, 15.0);
  AT_DISPATCH_FLOATING_TYPES(dtype, "box_losses_cpu", [&] {
    constexpr int64_t bytes = sizeof(scalar_t);
    run_items(P, plan.chunk_items, plan.worth_threads,
              {{reinterpret_cast<char*>(l1.mutable_data_ptr<scalar_t>()), bytes},
               {reinterpret_cast<char*>(giou.mutable_data_ptr<scalar_t>()), bytes}},
              [a, b](int64_t begin, int64_t end, char* const* dst) {
                box_losses_pairs<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), begin, end,
                                           reinterpret_cast<scalar_t*>(dst[0]), reinterpret_cast<scalar_t*>(dst[1]));
              });
  });
  const auto out_dtype = at::promote_types(pred.scalar_type(), target.scalar_type());
  return {l1.to(out_dtype), giou.to(out_dtype)};
}

std::tuple<at::Tensor, at::Tensor> box_losses_backward_cpu(const at::Tensor& grad_l1, const at::Tensor& grad_giou,
                                                           const at::Tensor& pred, const at::Tensor& target) {
  check_box_pairs(pred, target, "box_losses_backward");
  check_box_loss_grads(grad_l1, grad_giou, pred);
  const auto dtype = box_compute_dtype(pred, target);
  const at::Tensor a = pred.to(dtype).contiguous(), b = target.to(dtype).contiguous();
  const at::Tensor g1 = grad_l1.to(dtype).contiguous(), gg = grad_giou.to(dtype).contiguous();
  const int64_t P = a.size(0);
  at::Tensor grad_pred = at::empty({P, 4}, a.options()), grad_target = at::empty({P, 4}, a.options());
  const ItemPlan plan = plan_items(P, 40.0);
  AT_DISPATCH_FLOATING_TYPES(dtype, "box_losses_backward_cpu", [&] {
    constexpr int64_t bytes = 4 * sizeof(scalar_t);
    run_items(P, plan.chunk_items, plan.worth_threads,
              {{reinterpret_cast<char*>(grad_pred.mutable_data_ptr<scalar_t>()), bytes},
               {reinterpret_cast<char*>(grad_target.mutable_data_ptr<scalar_t>()), bytes}},
              [g1, gg, a, b](int64_t begin, int64_t end, char* const* dst) {
                box_losses_backward_pairs<scalar_t>(g1.const_data_ptr<scalar_t>(), gg.const_data_ptr<scalar_t>(),
                                                    a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), begin,
                                                    end, reinterpret_cast<scalar_t*>(dst[0]),
                                                    reinterpret_cast<scalar_t*>(dst[1]));
              });
  });
  return {grad_pred.to(pred.scalar_type()), grad_target.to(target.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(e2evlp, CPU, m) {
  m.impl("matching_cost", &matching_cost_cpu);
  m.impl("box_losses", &box_losses_cpu);
  m.impl("box_losses_backward", &box_losses_backward_cpu);
}

}  // namespace e2evlp
