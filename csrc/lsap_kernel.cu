// Exact batched linear sum assignment on CUDA: one warp per problem, every problem in one launch.
//
// The algorithm is the CPU kernel's (shortest augmenting paths with row/column potentials, in
// float64, ties to the free column then the lowest index), with each Dijkstra step spread over the
// warp: every lane relaxes its own columns (j = lane, lane + 32, ...), a butterfly reduction picks
// the next column, and the potentials are updated lane-parallel. A problem's state lives in shared
// memory when it fits, else in a global workspace. Input errors become a status, never an assert.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "lsap.h"

namespace e2evlp {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpsPerBlock = 4;
constexpr int64_t kSharedBytesPerBlock = 48 * 1024;
constexpr int kTakenBit = 1 << 30;  // set in a candidate's key when its column is already assigned

__host__ __device__ inline int64_t align16(int64_t bytes) { return (bytes + 15) & ~int64_t{15}; }

// Bytes of state for a problem of at most `nr` rows and `nc` columns (nr <= nc).
__host__ __device__ inline int64_t state_bytes(int64_t nr, int64_t nc) {
  return align16(sizeof(double) * (2 * nc + nr)) + align16(sizeof(int32_t) * (2 * nc + nr)) + align16(nc + nr);
}

struct SolverState {
  double* v;         // [nc] column potentials
  double* dist;      // [nc] shortest path length to each column in the current search
  double* u;         // [nr] row potentials
  int32_t* path;     // [nc] row preceding each column on its shortest path
  int32_t* row4col;  // [nc]
  int32_t* col4row;  // [nr]
  uint8_t* scanned;  // [nc] column settled in the current search
  uint8_t* visited;  // [nr] row reached in the current search
};

__device__ inline SolverState carve_state(char* base, int64_t nr, int64_t nc) {
  SolverState s;
  s.v = reinterpret_cast<double*>(base);
  s.dist = s.v + nc;
  s.u = s.dist + nc;
  base += align16(sizeof(double) * (2 * nc + nr));
  s.path = reinterpret_cast<int32_t*>(base);
  s.row4col = s.path + nc;
  s.col4row = s.row4col + nc;
  base += align16(sizeof(int32_t) * (2 * nc + nr));
  s.scanned = reinterpret_cast<uint8_t*>(base);
  s.visited = s.scanned + nc;
  return s;
}

// Candidate order: shorter distance, then a free column (no kTakenBit), then the lower index.
__device__ inline bool better(double d, int key, double best_d, int best_key) {
  return d < best_d || (d == best_d && key < best_key);
}

__device__ inline void warp_argmin(double& d, int& key) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const double other_d = __shfl_xor_sync(kFullMask, d, offset);
    const int other_key = __shfl_xor_sync(kFullMask, key, offset);
    if (better(other_d, other_key, d, key)) {
      d = other_d;
      key = other_key;
    }
  }
}

template <typename T>
__global__ void lsap_warp_kernel(LsapCudaProblem p, int64_t cap_rows, int64_t cap_cols, int64_t state_stride,
                                 bool state_in_shared) {
  extern __shared__ __align__(16) char shared[];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + warp;
  if (b >= p.batch) return;  // uniform across the warp

  int64_t* out = p.assignment + b * p.rows;
  for (int64_t r = lane; r < p.rows; r += kWarpSize) out[r] = -1;
  const int64_t n = p.num_rows ? p.num_rows[b] : p.rows;
  const int64_t m = p.num_cols ? p.num_cols[b] : p.cols;
  int32_t status = kLsapOk;
  if (n < 0 || n > p.rows) {
    status = kLsapBadNumRows;
  } else if (m < 0 || m > p.cols) {
    status = kLsapBadNumCols;
  }
  if (status != kLsapOk || n == 0 || m == 0) {
    if (lane == 0) p.status[b] = status;
    return;
  }

  // Solve with rows <= columns: a tall problem is read transposed.
  const bool transposed = n > m;
  const int nr = static_cast<int>(transposed ? m : n);
  const int nc = static_cast<int>(transposed ? n : m);
  const int64_t s_row = transposed ? p.stride_c : p.stride_r;
  const int64_t s_col = transposed ? p.stride_r : p.stride_c;
  const T* cost = static_cast<const T*>(p.cost) + b * p.stride_b;
  const double sign = p.maximize ? -1.0 : 1.0;
  auto cost_at = [&](int i, int j) { return sign * static_cast<double>(cost[i * s_row + j * s_col]); };

  bool invalid = false;
  for (int64_t e = lane; e < static_cast<int64_t>(nr) * nc; e += kWarpSize) {
    const double x = cost_at(static_cast<int>(e / nc), static_cast<int>(e % nc));
    invalid |= isnan(x) || x == -INFINITY;
  }
  if (__any_sync(kFullMask, invalid)) {
    if (lane == 0) p.status[b] = kLsapInvalidEntries;
    return;
  }

  char* base = state_in_shared ? shared + warp * state_stride : static_cast<char*>(p.workspace) + b * state_stride;
  const SolverState s = carve_state(base, cap_rows, cap_cols);
  for (int j = lane; j < nc; j += kWarpSize) {
    s.v[j] = 0.0;
    s.row4col[j] = -1;
  }
  for (int r = lane; r < nr; r += kWarpSize) s.col4row[r] = -1;
  __syncwarp();

  // Row reduction, as on the CPU: u[i] = min_j c[i][j]; a row whose cheapest column (free first,
  // then lowest index) is still free takes it and needs no search.
  for (int i = 0; i < nr; ++i) {
    double lowest = INFINITY;
    int best_key = INT_MAX;
    for (int j = lane; j < nc; j += kWarpSize) {
      const double x = cost_at(i, j);
      const int key = (s.row4col[j] >= 0 ? kTakenBit : 0) | j;
      if (better(x, key, lowest, best_key)) {
        lowest = x;
        best_key = key;
      }
    }
    warp_argmin(lowest, best_key);
    if (lane == 0) {
      s.u[i] = lowest == INFINITY ? 0.0 : lowest;
      if (lowest != INFINITY && !(best_key & kTakenBit)) {
        s.col4row[i] = best_key;
        s.row4col[best_key] = i;
      }
    }
    __syncwarp();
  }

  for (int cur = 0; cur < nr; ++cur) {
    if (s.col4row[cur] >= 0) continue;  // uniform across the warp
    for (int j = lane; j < nc; j += kWarpSize) {
      s.dist[j] = INFINITY;
      s.scanned[j] = 0;
    }
    for (int r = lane; r < nr; r += kWarpSize) s.visited[r] = 0;
    __syncwarp();

    // Dijkstra over columns from row `cur`; lane l owns the columns j with j % 32 == l.
    double min_val = 0.0;
    int i = cur;
    int sink = -1;
    while (sink < 0) {
      if (lane == 0) s.visited[i] = 1;
      const double base_i = min_val - s.u[i];
      double best_d = INFINITY;
      int best_key = INT_MAX;
      for (int j = lane; j < nc; j += kWarpSize) {
        if (s.scanned[j]) continue;
        const double r = base_i + cost_at(i, j) - s.v[j];
        double d = s.dist[j];
        if (r < d) {
          d = r;
          s.dist[j] = r;
          s.path[j] = i;
        }
        if (d == INFINITY) continue;
        const int key = (s.row4col[j] >= 0 ? kTakenBit : 0) | j;
        if (better(d, key, best_d, best_key)) {
          best_d = d;
          best_key = key;
        }
      }
      warp_argmin(best_d, best_key);
      if (best_d == INFINITY) {
        if (lane == 0) p.status[b] = kLsapInfeasible;
        return;
      }
      min_val = best_d;
      const int j = best_key & (kTakenBit - 1);
      if (j % kWarpSize == lane) s.scanned[j] = 1;
      const int owner = s.row4col[j];
      if (owner < 0) {
        sink = j;
      } else {
        i = owner;
      }
    }
    __syncwarp();

    for (int r = lane; r < nr; r += kWarpSize) {
      if (!s.visited[r]) continue;
      s.u[r] += r == cur ? min_val : min_val - s.dist[s.col4row[r]];
    }
    for (int j = lane; j < nc; j += kWarpSize) {
      if (s.scanned[j]) s.v[j] -= min_val - s.dist[j];
    }
    __syncwarp();

    if (lane == 0) {
      for (int j = sink;;) {
        const int r = s.path[j];
        s.row4col[j] = r;
        const int previous = s.col4row[r];
        s.col4row[r] = j;
        j = previous;
        if (r == cur) break;
      }
    }
    __syncwarp();
  }

  for (int r = lane; r < nr; r += kWarpSize) {
    const int c = s.col4row[r];
    if (transposed) {
      out[c] = r;
    } else {
      out[r] = c;
    }
  }
  if (lane == 0) p.status[b] = kLsapOk;
}

struct LaunchPlan {
  int warps_per_block;
  int64_t state_stride;
  bool state_in_shared;
};

LaunchPlan plan_launch(int64_t rows, int64_t cols) {
  const int64_t per_problem = state_bytes(rows < cols ? rows : cols, rows < cols ? cols : rows);
  if (per_problem * kWarpsPerBlock <= kSharedBytesPerBlock) return {kWarpsPerBlock, per_problem, true};
  if (per_problem <= kSharedBytesPerBlock) return {1, per_problem, true};
  return {kWarpsPerBlock, per_problem, false};
}

}  // namespace

int64_t lsap_cuda_workspace_bytes(int64_t batch, int64_t rows, int64_t cols) {
  const LaunchPlan plan = plan_launch(rows, cols);
  return plan.state_in_shared ? 0 : batch * plan.state_stride;
}

int lsap_cuda_launch(const LsapCudaProblem& problem, void* stream) {
  if (problem.batch == 0) return cudaSuccess;
  const LaunchPlan plan = plan_launch(problem.rows, problem.cols);
  const int64_t cap_rows = problem.rows < problem.cols ? problem.rows : problem.cols;
  const int64_t cap_cols = problem.rows < problem.cols ? problem.cols : problem.rows;
  const int64_t blocks = (problem.batch + plan.warps_per_block - 1) / plan.warps_per_block;
  const size_t shared = plan.state_in_shared ? plan.state_stride * plan.warps_per_block : 0;
  const dim3 grid(static_cast<unsigned>(blocks)), block(plan.warps_per_block * kWarpSize);
  auto s = static_cast<cudaStream_t>(stream);
  if (problem.cost_is_double) {
    lsap_warp_kernel<double><<<grid, block, shared, s>>>(problem, cap_rows, cap_cols, plan.state_stride,
                                                          plan.state_in_shared);
  } else {
    lsap_warp_kernel<float><<<grid, block, shared, s>>>(problem, cap_rows, cap_cols, plan.state_stride,
                                                         plan.state_in_shared);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace e2evlp
