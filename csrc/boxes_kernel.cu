// CUDA kernels of the box ops: a warp per (image, query) for the matching cost, a thread per pair for the losses.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "box_math.h"
#include "boxes.h"

namespace e2evlp {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreadsPerBlock = 256;

template <typename T>
__device__ T warp_max(T x) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x = max_of(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

template <typename T>
__device__ T warp_sum(T x) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// One warp per (b, q): the lanes share the softmax over classes, then each lane takes targets t = lane + 32k.
template <typename T>
__global__ void matching_cost_kernel(MatchingCostArgs a) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t bq = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (bq >= a.batch * a.queries) return;  // uniform across the warp
  const int64_t b = bq / a.queries, Tn = a.targets, C1 = a.classes;
  T* out = static_cast<T*>(a.out) + bq * Tn;
  const int64_t nt = a.num_targets[b];
  if (nt < 0 || nt > Tn) {  // poisoned, so that a solver downstream refuses it
    for (int64_t t = lane; t < Tn; t += kWarpSize) out[t] = NAN;
    return;
  }
  const T* lg = static_cast<const T*>(a.logits) + bq * C1;
  T max_logit = -INFINITY, denom = T(0);
  if (a.class_cost == kSoftmaxCost && nt > 0) {
    for (int64_t c = lane; c < C1; c += kWarpSize) max_logit = max_of(max_logit, lg[c]);
    max_logit = warp_max(max_logit);
    for (int64_t c = lane; c < C1; c += kWarpSize) denom += exp(lg[c] - max_logit);
    denom = warp_sum(denom);
  }
  const T* pb = static_cast<const T*>(a.boxes) + bq * 4;
  const BoxXYXY<T> pred = cxcywh_to_xyxy(pb[0], pb[1], pb[2], pb[3]);
  const T* tgt = static_cast<const T*>(a.tgt_boxes) + b * Tn * 4;
  for (int64_t t = lane; t < Tn; t += kWarpSize) {
    if (t >= nt) {
      out[t] = T(0);
      continue;
    }
    const int64_t label = a.labels[b * Tn + t];
    if (label < 0 || label >= C1) {
      out[t] = NAN;
      continue;
    }
    const T class_term = a.class_cost == kSoftmaxCost
                             ? -(exp(lg[label] - max_logit) / denom)
                             : focal_class_cost(T(1) / (T(1) + exp(-lg[label])), T(a.focal_alpha), T(a.focal_gamma));
    const T* tb = tgt + t * 4;
    const T l1 = fabs(pb[0] - tb[0]) + fabs(pb[1] - tb[1]) + fabs(pb[2] - tb[2]) + fabs(pb[3] - tb[3]);
    const T giou = giou_terms(pred, cxcywh_to_xyxy(tb[0], tb[1], tb[2], tb[3])).giou;
    out[t] = T(a.w_bbox) * l1 + T(a.w_class) * class_term + T(a.w_giou) * -giou;
  }
}

template <typename T>
__global__ void box_losses_kernel(BoxLossArgs a) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= a.count) return;
  const T* x = static_cast<const T*>(a.pred) + 4 * p;
  const T* y = static_cast<const T*>(a.target) + 4 * p;
  static_cast<T*>(a.l1)[p] = fabs(x[0] - y[0]) + fabs(x[1] - y[1]) + fabs(x[2] - y[2]) + fabs(x[3] - y[3]);
  static_cast<T*>(a.giou)[p] =
      T(1) - giou_terms(cxcywh_to_xyxy(x[0], x[1], x[2], x[3]), cxcywh_to_xyxy(y[0], y[1], y[2], y[3])).giou;
}

template <typename T>
__global__ void box_losses_backward_kernel(BoxLossArgs a) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= a.count) return;
  const T* x = static_cast<const T*>(a.pred) + 4 * p;
  const T* y = static_cast<const T*>(a.target) + 4 * p;
  const T g1 = static_cast<const T*>(a.grad_l1)[p];
  const T gg = static_cast<const T*>(a.grad_giou)[p];
  T gx[4], gy[4];
  for (int k = 0; k < 4; ++k) {
    gx[k] = g1 * sign_of(x[k] - y[k]);
    gy[k] = -gx[k];
  }
  const BoxXYXY<T> bx = cxcywh_to_xyxy(x[0], x[1], x[2], x[3]), by = cxcywh_to_xyxy(y[0], y[1], y[2], y[3]);
  BoxXYXY<T> gbx{0, 0, 0, 0}, gby{0, 0, 0, 0};
  giou_backward(bx, by, giou_terms(bx, by), -gg, gbx, gby);  // loss = 1 - giou
  xyxy_grad_to_cxcywh(gbx, gx);
  xyxy_grad_to_cxcywh(gby, gy);
  T* out_x = static_cast<T*>(a.grad_pred) + 4 * p;
  T* out_y = static_cast<T*>(a.grad_target) + 4 * p;
  for (int k = 0; k < 4; ++k) {
    out_x[k] = gx[k];
    out_y[k] = gy[k];
  }
}

unsigned blocks_for(int64_t items, int64_t per_block) { return static_cast<unsigned>((items + per_block - 1) / per_block); }

}  // namespace

int matching_cost_cuda_launch(const MatchingCostArgs& args, void* stream) {
  const int64_t rows = args.batch * args.queries;
  if (rows == 0 || args.targets == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = blocks_for(rows, kWarpsPerBlock);
  if (args.is_double) {
    matching_cost_kernel<double><<<grid, kWarpsPerBlock * kWarpSize, 0, s>>>(args);
  } else {
    matching_cost_kernel<float><<<grid, kWarpsPerBlock * kWarpSize, 0, s>>>(args);
  }
  return static_cast<int>(cudaGetLastError());
}

int box_losses_cuda_launch(const BoxLossArgs& args, void* stream) {
  if (args.count == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = blocks_for(args.count, kThreadsPerBlock);
  if (args.is_double) {
    box_losses_kernel<double><<<grid, kThreadsPerBlock, 0, s>>>(args);
  } else {
    box_losses_kernel<float><<<grid, kThreadsPerBlock, 0, s>>>(args);
  }
  return static_cast<int>(cudaGetLastError());
}

int box_losses_backward_cuda_launch(const BoxLossArgs& args, void* stream) {
  if (args.count == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = blocks_for(args.count, kThreadsPerBlock);
  if (args.is_double) {
    box_losses_backward_kernel<double><<<grid, kThreadsPerBlock, 0, s>>>(args);
  } else {
    box_losses_backward_kernel<float><<<grid, kThreadsPerBlock, 0, s>>>(args);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace e2evlp
