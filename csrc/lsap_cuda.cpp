// CUDA entry point of e2evlp::linear_sum_assignment: checks, workspace, and the launch on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "lsap.h"
#include "lsap_common.h"

namespace e2evlp {
namespace {

std::tuple<at::Tensor, at::Tensor> linear_sum_assignment_cuda(const at::Tensor& cost,
                                                              const std::optional<at::Tensor>& num_rows,
                                                              const std::optional<at::Tensor>& num_cols,
                                                              bool maximize) {
  check_lsap_cost(cost);
  const at::Tensor rows_t = checked_lsap_counts(num_rows, "num_rows", cost);
  const at::Tensor cols_t = checked_lsap_counts(num_cols, "num_cols", cost);
  const c10::cuda::CUDAGuard guard(cost.device());
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  TORCH_CHECK(N < (int64_t{1} << 30) && M < (int64_t{1} << 30), "linear_sum_assignment: cost is too large, got ",
              cost.sizes());

  // fp16/bf16 are widened once to float32 (exact); the solver itself accumulates in float64.
  const at::Tensor work = cost.scalar_type() == at::kDouble || cost.scalar_type() == at::kFloat
                              ? cost
                              : cost.to(at::kFloat);
  at::Tensor assignment = at::empty({B, N}, cost.options().dtype(at::kLong));
  at::Tensor status = at::empty({B}, cost.options().dtype(at::kInt));
  const int64_t workspace_bytes = lsap_cuda_workspace_bytes(B, N, M);
  at::Tensor workspace;
  if (workspace_bytes > 0) workspace = at::empty({workspace_bytes}, cost.options().dtype(at::kByte));

  LsapCudaProblem problem{};
  problem.cost = work.const_data_ptr();
  problem.cost_is_double = work.scalar_type() == at::kDouble;
  problem.batch = B;
  problem.rows = N;
  problem.cols = M;
  problem.stride_b = work.stride(0);
  problem.stride_r = work.stride(1);
  problem.stride_c = work.stride(2);
  problem.num_rows = rows_t.defined() ? rows_t.const_data_ptr<int64_t>() : nullptr;
  problem.num_cols = cols_t.defined() ? cols_t.const_data_ptr<int64_t>() : nullptr;
  problem.maximize = maximize;
  problem.assignment = assignment.data_ptr<int64_t>();
  problem.status = status.data_ptr<int32_t>();
  problem.workspace = workspace.defined() ? workspace.data_ptr() : nullptr;

  const int err = lsap_cuda_launch(problem, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "linear_sum_assignment: CUDA kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {assignment, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(e2evlp, CUDA, m) {
  m.impl("linear_sum_assignment", &linear_sum_assignment_cuda);
}

}  // namespace e2evlp
