// Batched linear sum assignment: status codes and the plain-pointer interface of the CUDA launcher.
#pragma once

#include <cstdint>

namespace e2evlp {

// One status per problem of a batch; the Python wrapper turns a non-zero one into a ValueError.
enum LsapStatus : int32_t {
  kLsapOk = 0,
  kLsapInvalidEntries = 1,  // NaN, or -inf (+inf when maximizing), inside the valid block
  kLsapInfeasible = 2,      // +inf entries leave no finite complete assignment
  kLsapBadNumRows = 3,      // num_rows[b] outside [0, N]
  kLsapBadNumCols = 4,      // num_cols[b] outside [0, M]
};

// A batch of cost matrices [B, N, M] with arbitrary element strides; float or double storage.
struct LsapCudaProblem {
  const void* cost;
  bool cost_is_double;
  int64_t batch, rows, cols;
  int64_t stride_b, stride_r, stride_c;
  const int64_t* num_rows;  // [B] or nullptr (all rows valid)
  const int64_t* num_cols;  // [B] or nullptr (all columns valid)
  bool maximize;
  int64_t* assignment;      // [B, N] contiguous: column per row, -1 when unassigned
  int32_t* status;          // [B]
  void* workspace;          // lsap_cuda_workspace_bytes(...) bytes, or nullptr when state fits in shared memory
};

// Bytes of global workspace the launch needs (0 when every problem's state fits in shared memory).
int64_t lsap_cuda_workspace_bytes(int64_t batch, int64_t rows, int64_t cols);

// Launches the solver on `stream` (a cudaStream_t); returns a cudaError_t value (0 on success).
int lsap_cuda_launch(const LsapCudaProblem& problem, void* stream);

}  // namespace e2evlp
