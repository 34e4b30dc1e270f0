// Box arithmetic shared by the CPU and CUDA kernels: GIoU with its hand-written gradient, and class costs.
//
// Everything here is plain inline arithmetic on scalars, callable from host and device code, so the
// CPU tests exercise exactly the math the CUDA kernels run. Divisions are guarded: a zero union or
// enclosing area contributes 0 instead of NaN (degenerate boxes stay finite); on non-degenerate
// boxes the values are those of DETR's / torchvision's plain formula, and the gradients are the
// ones autograd gives that formula (ties of min/max split the gradient in halves, clamp(min=0)
// passes it at 0).
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define E2EVLP_HD __host__ __device__ __forceinline__
#else
#define E2EVLP_HD inline
#endif

namespace e2evlp {

template <typename T>
struct BoxXYXY {
  T x1, y1, x2, y2;
};

template <typename T>
E2EVLP_HD BoxXYXY<T> cxcywh_to_xyxy(T cx, T cy, T w, T h) {
  return {cx - T(0.5) * w, cy - T(0.5) * h, cx + T(0.5) * w, cy + T(0.5) * h};
}

template <typename T>
E2EVLP_HD T box_area(const BoxXYXY<T>& b) {
  return (b.x2 - b.x1) * (b.y2 - b.y1);
}

template <typename T>
E2EVLP_HD T min_of(T a, T b) {
  return a < b ? a : b;
}

template <typename T>
E2EVLP_HD T max_of(T a, T b) {
  return a > b ? a : b;
}

// inter / uni - (enclose - uni) / enclose, each division taken as 0 when its denominator is not > 0.
// Written with 0/1 masks instead of branches so that loops over it vectorize; the masks make each
// denominator exactly its value when positive and exactly 1 otherwise.
template <typename T>
E2EVLP_HD T giou_from_areas(T inter, T uni, T enclose) {
  const T has_union = T(uni > T(0)), has_enclose = T(enclose > T(0));
  const T iou = has_union * (inter / (has_union * uni + (T(1) - has_union)));
  return iou - has_enclose * ((enclose - uni) / (has_enclose * enclose + (T(1) - has_enclose)));
}

// The intermediate quantities of GIoU(a, b) that its gradient needs.
template <typename T>
struct GiouTerms {
  T iw_raw, ih_raw;  // overlap extents before clamping at 0
  T iw, ih;          // clamped overlap extents
  T cw_raw, ch_raw;  // enclosing-box extents before clamping at 0
  T cw, ch;
  T inter, uni, enclose;
  T giou;
};

template <typename T>
E2EVLP_HD GiouTerms<T> giou_terms(const BoxXYXY<T>& a, const BoxXYXY<T>& b) {
  GiouTerms<T> t;
  const T area_a = box_area(a), area_b = box_area(b);
  t.iw_raw = min_of(a.x2, b.x2) - max_of(a.x1, b.x1);
  t.ih_raw = min_of(a.y2, b.y2) - max_of(a.y1, b.y1);
  t.iw = max_of(t.iw_raw, T(0));
  t.ih = max_of(t.ih_raw, T(0));
  t.inter = t.iw * t.ih;
  t.uni = area_a + area_b - t.inter;
  t.cw_raw = max_of(a.x2, b.x2) - min_of(a.x1, b.x1);
  t.ch_raw = max_of(a.y2, b.y2) - min_of(a.y1, b.y1);
  t.cw = max_of(t.cw_raw, T(0));
  t.ch = max_of(t.ch_raw, T(0));
  t.enclose = t.cw * t.ch;
  t.giou = giou_from_areas(t.inter, t.uni, t.enclose);
  return t;
}

// GIoU of a and b given both areas: the branch-free form the CPU cost loop vectorizes. Same
// arithmetic, in the same order, as giou_terms.
template <typename T>
E2EVLP_HD T giou_value(T ax1, T ay1, T ax2, T ay2, T area_a, T bx1, T by1, T bx2, T by2, T area_b) {
  const T iw = max_of(min_of(ax2, bx2) - max_of(ax1, bx1), T(0));
  const T ih = max_of(min_of(ay2, by2) - max_of(ay1, by1), T(0));
  const T inter = iw * ih;
  const T uni = area_a + area_b - inter;
  const T cw = max_of(max_of(ax2, bx2) - min_of(ax1, bx1), T(0));
  const T ch = max_of(max_of(ay2, by2) - min_of(ay1, by1), T(0));
  return giou_from_areas(inter, uni, cw * ch);
}

// d min(a, b): to the smaller argument, halves on a tie (as autograd's minimum).
template <typename T>
E2EVLP_HD void min_backward(T a, T b, T g, T& ga, T& gb) {
  if (a < b) {
    ga += g;
  } else if (b < a) {
    gb += g;
  } else {
    ga += T(0.5) * g;
    gb += T(0.5) * g;
  }
}

// d max(a, b): to the larger argument, halves on a tie (as autograd's maximum).
template <typename T>
E2EVLP_HD void max_backward(T a, T b, T g, T& ga, T& gb) {
  if (a > b) {
    ga += g;
  } else if (b > a) {
    gb += g;
  } else {
    ga += T(0.5) * g;
    gb += T(0.5) * g;
  }
}

// Adds d(g * GIoU(a, b)) / d(xyxy of a) to ga and / d(xyxy of b) to gb.
template <typename T>
E2EVLP_HD void giou_backward(const BoxXYXY<T>& a, const BoxXYXY<T>& b, const GiouTerms<T>& t, T g,
                             BoxXYXY<T>& ga, BoxXYXY<T>& gb) {
  // giou = inter / uni - (enclose - uni) / enclose
  T g_inter = T(0), g_uni = T(0), g_enclose = T(0);
  if (t.uni > T(0)) {
    g_inter = g / t.uni;
    g_uni = -g * t.inter / (t.uni * t.uni);
  }
  if (t.enclose > T(0)) {
    g_uni += g / t.enclose;
    g_enclose = -g * t.uni / (t.enclose * t.enclose);
  }
  // uni = area_a + area_b - inter
  g_inter -= g_uni;
  const T aw = a.x2 - a.x1, ah = a.y2 - a.y1, bw = b.x2 - b.x1, bh = b.y2 - b.y1;
  ga.x2 += g_uni * ah;
  ga.x1 -= g_uni * ah;
  ga.y2 += g_uni * aw;
  ga.y1 -= g_uni * aw;
  gb.x2 += g_uni * bh;
  gb.x1 -= g_uni * bh;
  gb.y2 += g_uni * bw;
  gb.y1 -= g_uni * bw;
  // inter = clamp(iw_raw, 0) * clamp(ih_raw, 0); clamp(min=0) passes the gradient where raw >= 0.
  const T g_iw = t.iw_raw >= T(0) ? g_inter * t.ih : T(0);
  const T g_ih = t.ih_raw >= T(0) ? g_inter * t.iw : T(0);
  min_backward(a.x2, b.x2, g_iw, ga.x2, gb.x2);
  max_backward(a.x1, b.x1, -g_iw, ga.x1, gb.x1);
  min_backward(a.y2, b.y2, g_ih, ga.y2, gb.y2);
  max_backward(a.y1, b.y1, -g_ih, ga.y1, gb.y1);
  // enclose = clamp(cw_raw, 0) * clamp(ch_raw, 0)
  const T g_cw = t.cw_raw >= T(0) ? g_enclose * t.ch : T(0);
  const T g_ch = t.ch_raw >= T(0) ? g_enclose * t.cw : T(0);
  max_backward(a.x2, b.x2, g_cw, ga.x2, gb.x2);
  min_backward(a.x1, b.x1, -g_cw, ga.x1, gb.x1);
  max_backward(a.y2, b.y2, g_ch, ga.y2, gb.y2);
  min_backward(a.y1, b.y1, -g_ch, ga.y1, gb.y1);
}

// Chain rule through cxcywh -> xyxy: d/dcx = d/dx1 + d/dx2, d/dw = (d/dx2 - d/dx1) / 2.
template <typename T>
E2EVLP_HD void xyxy_grad_to_cxcywh(const BoxXYXY<T>& g, T* out) {
  out[0] += g.x1 + g.x2;
  out[1] += g.y1 + g.y2;
  out[2] += T(0.5) * (g.x2 - g.x1);
  out[3] += T(0.5) * (g.y2 - g.y1);
}

template <typename T>
E2EVLP_HD T sign_of(T x) {
  return T((x > T(0)) - (x < T(0)));
}

// Deformable-DETR's focal matching cost of predicting a class with sigmoid probability p.
template <typename T>
E2EVLP_HD T focal_class_cost(T p, T alpha, T gamma) {
  const T eps = T(1e-8);
  const T pos = alpha * std::pow(T(1) - p, gamma) * -std::log(p + eps);
  const T neg = (T(1) - alpha) * std::pow(p, gamma) * -std::log(T(1) - p + eps);
  return pos - neg;
}

enum ClassCost : int { kSoftmaxCost = 0, kFocalCost = 1 };

}  // namespace e2evlp
