// Exact batched linear sum assignment on the CPU: shortest augmenting paths (Jonker-Volgenant family).
//
// Each problem is solved in float64 with row potentials u and column potentials v (reduced cost
// c[i][j] - u[i] - v[j] >= 0 on the tree). For every row a Dijkstra search over columns finds the
// cheapest augmenting path; ties pick the free column, then the lowest column index, a rule the CUDA
// kernel shares so that both devices return the same assignment. Problems run in parallel (run_items).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "lsap.h"
#include "lsap_common.h"
#include "parallel_cpu.h"

namespace e2evlp {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Scratch space for one problem of at most `nr` rows and `nc` columns, reused across a chunk.
struct LsapWorkspace {
  std::vector<double> cost, u, v, dist;
  std::vector<int64_t> path, row4col, col4row, open, scanned_cols, visited_rows;

  void resize(int64_t nr, int64_t nc) {
    cost.resize(nr * nc);
    u.resize(nr);
    col4row.resize(nr);
    visited_rows.reserve(nr);
    v.resize(nc);
    dist.resize(nc);
    open.resize(nc);
    path.resize(nc);
    row4col.resize(nc);
    scanned_cols.reserve(nc);
  }
};

// Among cols[0..count), the position of the column with key == lowest that is free, else the one
// with the lowest index (-1 when lowest is +inf). The key order (distance, taken, index) does not
// depend on the order of `cols`, and is the one the CUDA kernel uses.
int64_t pick_column(const double* key, const int64_t* cols, int64_t count, const int64_t* row4col,
                    double lowest) {
  if (lowest == kInf) return -1;
  int64_t best = -1, best_col = 0;
  bool best_free = false;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t j = cols[k];
    if (key[j] != lowest) continue;
    const bool is_free = row4col[j] < 0;
    if (best < 0 || (is_free && !best_free) || (is_free == best_free && j < best_col)) {
      best = k;
      best_col = j;
      best_free = is_free;
    }
  }
  return best;
}

// Solves the dense problem ws.cost [nr, nc] with nr <= nc; fills ws.col4row.
int32_t solve_dense(int64_t nr, int64_t nc, LsapWorkspace& ws) {
  const double* c = ws.cost.data();
  double* dist = ws.dist.data();
  double* v = ws.v.data();
  int64_t* path = ws.path.data();
  int64_t* row4col = ws.row4col.data();
  int64_t* open = ws.open.data();  // the columns not yet settled by the current search
  std::fill_n(v, nc, 0.0);
  std::fill_n(row4col, nc, -1);
  std::fill_n(ws.col4row.begin(), nr, -1);
  std::iota(open, open + nc, int64_t{0});

  // Row reduction: u[i] = min_j c[i][j] keeps every reduced cost >= 0 and every free column at v = 0
  // (which rectangular problems need). A row whose cheapest column is still free takes it: a tight
  // edge, so that row needs no search.
  for (int64_t i = 0; i < nr; ++i) {
    const double* ci = c + i * nc;
    double lowest = kInf;
    for (int64_t j = 0; j < nc; ++j) lowest = std::min(lowest, ci[j]);
    const int64_t j = pick_column(ci, open, nc, row4col, lowest);
    ws.u[i] = j < 0 ? 0.0 : lowest;
    if (j >= 0 && row4col[j] < 0) {
      ws.col4row[i] = j;
      row4col[j] = i;
    }
  }

  for (int64_t cur = 0; cur < nr; ++cur) {
    if (ws.col4row[cur] >= 0) continue;
    std::fill_n(dist, nc, kInf);
    std::iota(open, open + nc, int64_t{0});
    int64_t num_open = nc;
    ws.scanned_cols.clear();
    ws.visited_rows.clear();

    // Dijkstra over columns from row `cur`, on reduced costs c[i][j] - u[i] - v[j].
    double min_val = 0.0;
    int64_t i = cur;
    int64_t sink = -1;
    while (sink < 0) {
      ws.visited_rows.push_back(i);
      const double* ci = c + i * nc;
      const double base = min_val - ws.u[i];
      double lowest = kInf;
      for (int64_t k = 0; k < num_open; ++k) {
        const int64_t j = open[k];
        const double r = base + ci[j] - v[j];
        if (r < dist[j]) {
          dist[j] = r;
          path[j] = i;
        }
        lowest = std::min(lowest, dist[j]);
      }
      const int64_t k = pick_column(dist, open, num_open, row4col, lowest);
      if (k < 0) return kLsapInfeasible;
      min_val = lowest;
      const int64_t j = open[k];
      open[k] = open[--num_open];
      ws.scanned_cols.push_back(j);
      if (row4col[j] < 0) {
        sink = j;
      } else {
        i = row4col[j];
      }
    }

    ws.u[cur] += min_val;
    for (int64_t r : ws.visited_rows) {
      if (r != cur) ws.u[r] += min_val - dist[ws.col4row[r]];
    }
    for (int64_t j : ws.scanned_cols) v[j] -= min_val - dist[j];

    for (int64_t j = sink;;) {
      const int64_t r = path[j];
      row4col[j] = r;
      std::swap(ws.col4row[r], j);
      if (r == cur) break;
    }
  }
  return kLsapOk;
}

// Copies one problem into `dst` [nr, nc] (sign applied, in float64); false if it holds NaN or -inf.
// The loops follow the source's memory order, so a transposed read streams through memory.
template <typename scalar_t>
bool load_problem(const scalar_t* src, int64_t s_row, int64_t s_col, int64_t nr, int64_t nc, double sign,
                  double* dst) {
  const bool rows_inner = std::abs(s_row) < std::abs(s_col);
  const int64_t outer = rows_inner ? nc : nr, inner = rows_inner ? nr : nc;
  const int64_t s_outer = rows_inner ? s_col : s_row, s_inner = rows_inner ? s_row : s_col;
  const int64_t d_outer = rows_inner ? 1 : nc, d_inner = rows_inner ? nc : 1;
  bool invalid = false;
  for (int64_t a = 0; a < outer; ++a) {
    const scalar_t* s = src + a * s_outer;
    double* d = dst + a * d_outer;
    for (int64_t k = 0; k < inner; ++k) {
      const double x = sign * static_cast<double>(s[k * s_inner]);
      invalid |= (x != x) | (x == -kInf);
      d[k * d_inner] = x;
    }
  }
  return !invalid;
}

int64_t count_at(const int64_t* counts, int64_t b, int64_t fallback) {
  return counts == nullptr ? fallback : counts[b];
}

// Solves problems [begin, end), writing each one's assignment row (-1 where unassigned) and status.
template <typename scalar_t>
void solve_items(const at::Tensor& cost, const at::Tensor& rows_t, const at::Tensor& cols_t, double sign,
                 int64_t begin, int64_t end, int64_t* assignment, int32_t* status) {
  thread_local LsapWorkspace ws;
  const int64_t N = cost.size(1), M = cost.size(2);
  const int64_t sb = cost.stride(0), sn = cost.stride(1), sm = cost.stride(2);
  const scalar_t* base = cost.const_data_ptr<scalar_t>();
  const int64_t* nrows = rows_t.defined() ? rows_t.const_data_ptr<int64_t>() : nullptr;
  const int64_t* ncols = cols_t.defined() ? cols_t.const_data_ptr<int64_t>() : nullptr;
  for (int64_t b = begin; b < end; ++b) {
    int64_t* ob = assignment + (b - begin) * N;
    int32_t& st = status[b - begin];
    std::fill_n(ob, N, int64_t(-1));
    st = kLsapOk;
    const int64_t n = count_at(nrows, b, N), m = count_at(ncols, b, M);
    if (n < 0 || n > N) {
      st = kLsapBadNumRows;
      continue;
    }
    if (m < 0 || m > M) {
      st = kLsapBadNumCols;
      continue;
    }
    if (n == 0 || m == 0) continue;
    // Solve with rows <= columns: transpose tall problems.
    const bool transposed = n > m;
    const int64_t nr = transposed ? m : n, nc = transposed ? n : m;
    ws.resize(nr, nc);
    if (!load_problem(base + b * sb, transposed ? sm : sn, transposed ? sn : sm, nr, nc, sign, ws.cost.data())) {
      st = kLsapInvalidEntries;
      continue;
    }
    st = solve_dense(nr, nc, ws);
    if (st != kLsapOk) continue;
    for (int64_t i = 0; i < nr; ++i) {
      if (transposed) {
        ob[ws.col4row[i]] = i;
      } else {
        ob[i] = ws.col4row[i];
      }
    }
  }
}

// Mean solve time of one problem, from its size: the augmenting-path search is O(rows^2 * cols) in the worst
// case and ~0.2 ns per unit of that on DETR-sized problems.
double lsap_ns_per_item(const at::Tensor& rows_t, const at::Tensor& cols_t, int64_t B, int64_t N, int64_t M) {
  if (B == 0) return 0.0;
  const int64_t* nrows = rows_t.defined() ? rows_t.const_data_ptr<int64_t>() : nullptr;
  const int64_t* ncols = cols_t.defined() ? cols_t.const_data_ptr<int64_t>() : nullptr;
  double units = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    const double n = static_cast<double>(std::clamp<int64_t>(count_at(nrows, b, N), 0, N));
    const double m = static_cast<double>(std::clamp<int64_t>(count_at(ncols, b, M), 0, M));
    units += std::min(n, m) * std::min(n, m) * std::max(n, m);
  }
  return 0.2 * units / static_cast<double>(B) + 100.0;
}

std::tuple<at::Tensor, at::Tensor> linear_sum_assignment_cpu(const at::Tensor& cost,
                                                             const std::optional<at::Tensor>& num_rows,
                                                             const std::optional<at::Tensor>& num_cols,
                                                             bool maximize) {
  check_lsap_cost(cost);
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  const at::Tensor rows_t = checked_lsap_counts(num_rows, "num_rows", cost);
  const at::Tensor cols_t = checked_lsap_counts(num_cols, "num_cols", cost);
  const double sign = maximize ? -1.0 : 1.0;

  at::Tensor assignment = at::empty({B, N}, cost.options().dtype(at::kLong));
  at::Tensor status = at::empty({B}, cost.options().dtype(at::kInt));
  const std::vector<ItemOutput> outputs = {
      {reinterpret_cast<char*>(assignment.data_ptr<int64_t>()), N * static_cast<int64_t>(sizeof(int64_t))},
      {reinterpret_cast<char*>(status.data_ptr<int32_t>()), static_cast<int64_t>(sizeof(int32_t))}};
  const ItemPlan plan = plan_items(B, lsap_ns_per_item(rows_t, cols_t, B, N, M));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cost.scalar_type(), "linear_sum_assignment_cpu", [&] {
    run_items(B, plan.chunk_items, plan.worth_threads, outputs,
              [cost, rows_t, cols_t, sign](int64_t begin, int64_t end, char* const* dst) {
                solve_items<scalar_t>(cost, rows_t, cols_t, sign, begin, end, reinterpret_cast<int64_t*>(dst[0]),
                                      reinterpret_cast<int32_t*>(dst[1]));
              });
  });
  return {assignment, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(e2evlp, CPU, m) {
  m.impl("linear_sum_assignment", &linear_sum_assignment_cpu);
}

}  // namespace e2evlp
