// Helper threads for run_items: chunks claimed dynamically, helpers' chunks taken back instead of awaited.
#include "parallel_cpu.h"

#include <ATen/Parallel.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>

namespace e2evlp {
namespace {

// A chunk moves kFree -> kCaller (the caller computes it in place), or kFree -> kHelper -> kCommitting ->
// kCommitted (a helper computed it into scratch and copies it out), or kHelper -> kCaller (taken back: the
// helper's result is dropped).
enum ChunkState : int { kFree = 0, kHelper = 1, kCommitting = 2, kCaller = 3, kCommitted = 4 };

struct Job {
  ItemBody body;
  std::vector<ItemOutput> outputs;
  int64_t n_items = 0, chunk_items = 1, n_chunks = 0;
  int max_helpers = 0;
  std::atomic<int64_t> next{0};
  std::unique_ptr<std::atomic<int>[]> state;

  int64_t begin_of(int64_t c) const { return c * chunk_items; }
  int64_t end_of(int64_t c) const { return std::min(n_items, (c + 1) * chunk_items); }
};

thread_local bool t_is_helper = false;

void run_chunk_as_helper(Job& job, int64_t c, std::vector<std::vector<char>>& scratch) {
  int expected = kFree;
  if (!job.state[c].compare_exchange_strong(expected, kHelper, std::memory_order_acq_rel)) return;
  const int64_t begin = job.begin_of(c), len = job.end_of(c) - begin;
  const size_t n_out = job.outputs.size();
  scratch.resize(n_out);
  std::vector<char*> dst(n_out);
  for (size_t k = 0; k < n_out; ++k) {
    scratch[k].resize(static_cast<size_t>(len * job.outputs[k].item_bytes));
    dst[k] = scratch[k].data();
  }
  try {
    job.body(begin, begin + len, dst.data());
  } catch (...) {
    return;  // left in kHelper: the caller takes the chunk back and meets the error itself
  }
  expected = kHelper;
  if (!job.state[c].compare_exchange_strong(expected, kCommitting, std::memory_order_acq_rel)) return;
  for (size_t k = 0; k < n_out; ++k) {
    const ItemOutput& o = job.outputs[k];
    std::memcpy(o.base + begin * o.item_bytes, dst[k], static_cast<size_t>(len * o.item_bytes));
  }
  job.state[c].store(kCommitted, std::memory_order_release);
}

class HelperPool {
 public:
  // Offers the job to the first `helpers` helper threads, starting those that do not exist yet.
  void post(const std::shared_ptr<Job>& job, int helpers) {
    std::lock_guard<std::mutex> lock(mutex_);
    const uint64_t generation = generation_.load(std::memory_order_relaxed);
    for (; started_ < helpers; ++started_) {
      try {
        std::thread([this, index = started_, generation] { serve(index, generation); }).detach();
      } catch (const std::system_error&) {
        break;  // no more threads to be had: the helpers that exist (maybe none) share the job
      }
    }
    current_ = job;
    generation_.store(generation + 1, std::memory_order_release);
    generation_.notify_all();
  }

  // Drops the pool's reference, so that the job's inputs are not kept alive until the next post.
  void retire(const std::shared_ptr<Job>& job) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (current_ == job) current_.reset();
  }

 private:
  void serve(int index, uint64_t seen) {
    t_is_helper = true;
    std::vector<std::vector<char>> scratch;
    for (;;) {
      await_post(seen);
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        seen = generation_.load(std::memory_order_relaxed);
        job = current_;
      }
      if (!job || index >= job->max_helpers) continue;
      for (int64_t c = job->next.fetch_add(1, std::memory_order_relaxed); c < job->n_chunks;
           c = job->next.fetch_add(1, std::memory_order_relaxed)) {
        run_chunk_as_helper(*job, c, scratch);
      }
    }
  }

  // Polls (yielding the core to any other runnable thread) for a while before sleeping: waking a sleeping
  // thread takes ~0.2 ms on a virtualized 2-core machine, longer than many whole calls, and ops come in
  // runs (the matcher solves every decoder layer, the criterion's forward is followed by its backward).
  void await_post(uint64_t seen) const {
    const auto deadline = std::chrono::steady_clock::now() + kPollBeforeSleep;
    while (generation_.load(std::memory_order_acquire) == seen) {
      if (std::chrono::steady_clock::now() > deadline) {
        generation_.wait(seen, std::memory_order_acquire);
        return;
      }
      std::this_thread::yield();
    }
  }

  static constexpr std::chrono::microseconds kPollBeforeSleep{200};
  std::mutex mutex_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Job> current_;
  int started_ = 0;
};

// Leaked on purpose: detached helpers may still wait on it while static destructors run at exit. A forked
// child has none of the parent's threads (and maybe a mutex locked by one of them), so it starts a new pool.
std::atomic<HelperPool*> g_pool{nullptr};

HelperPool& pool() {
  static const bool registered = [] {
    g_pool.store(new HelperPool);
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(new HelperPool); });
    return true;
  }();
  (void)registered;
  return *g_pool.load();
}

// Makes sure no helper writes into the outputs after the caller returns or throws: every chunk still free
// or held by a helper becomes the caller's, and a commit under way is waited for (a memcpy, not a compute).
// Returns the chunks the caller has to compute.
std::vector<int64_t> take_back(Job& job) {
  std::vector<int64_t> taken;
  for (int64_t c = 0; c < job.n_chunks; ++c) {
    int s = job.state[c].load(std::memory_order_acquire);
    for (;;) {
      if (s == kFree || s == kHelper) {
        if (job.state[c].compare_exchange_weak(s, kCaller, std::memory_order_acq_rel)) {
          taken.push_back(c);
          break;
        }
      } else if (s == kCommitting) {
        std::this_thread::yield();
        s = job.state[c].load(std::memory_order_acquire);
      } else {
        break;
      }
    }
  }
  return taken;
}

void run_chunk_in_place(const Job& job, int64_t c) {
  const int64_t begin = job.begin_of(c);
  std::vector<char*> dst(job.outputs.size());
  for (size_t k = 0; k < dst.size(); ++k) dst[k] = job.outputs[k].base + begin * job.outputs[k].item_bytes;
  job.body(begin, job.end_of(c), dst.data());
}

constexpr double kMinThreadedNs = 150e3;  // below this, waking a helper (~25 us on 2 cores) does not pay
constexpr double kMinChunkNs = 10e3;      // claiming a chunk costs ~0.1 us; keep that under 1%
constexpr double kMaxChunkNs = 150e3;     // bounds the work redone when a helper's chunk is taken back
constexpr int kChunksPerThread = 8;

}  // namespace

ItemPlan plan_items(int64_t n_items, double ns_per_item) {
  const int threads = at::get_num_threads();
  const double per_item = std::max(ns_per_item, 1e-3);
  const double total = per_item * static_cast<double>(n_items);
  const double target = std::clamp(total / (kChunksPerThread * threads), kMinChunkNs, kMaxChunkNs);
  const int64_t chunk = std::clamp<int64_t>(static_cast<int64_t>(std::ceil(target / per_item)), 1,
                                            std::max<int64_t>(1, n_items));
  return {chunk, threads > 1 && total >= kMinThreadedNs && n_items > chunk};
}

void run_items(int64_t n_items, int64_t chunk_items, bool worth_threads, const std::vector<ItemOutput>& outputs,
               ItemBody body) {
  if (n_items <= 0) return;
  const int threads = at::get_num_threads();
  chunk_items = std::max<int64_t>(1, chunk_items);
  const int64_t n_chunks = (n_items + chunk_items - 1) / chunk_items;
  if (!worth_threads || threads <= 1 || n_chunks < 2 || t_is_helper || at::in_parallel_region()) {
    std::vector<char*> dst(outputs.size());
    for (size_t k = 0; k < dst.size(); ++k) dst[k] = outputs[k].base;
    body(0, n_items, dst.data());
    return;
  }
  auto job = std::make_shared<Job>();
  job->body = std::move(body);
  job->outputs = outputs;
  job->n_items = n_items;
  job->chunk_items = chunk_items;
  job->n_chunks = n_chunks;
  job->max_helpers = static_cast<int>(std::min<int64_t>(threads - 1, n_chunks - 1));
  job->state = std::make_unique<std::atomic<int>[]>(static_cast<size_t>(n_chunks));
  for (int64_t c = 0; c < n_chunks; ++c) job->state[c].store(kFree, std::memory_order_relaxed);

  HelperPool& helpers = pool();
  helpers.post(job, job->max_helpers);
  try {
    for (int64_t c = job->next.fetch_add(1, std::memory_order_relaxed); c < n_chunks;
         c = job->next.fetch_add(1, std::memory_order_relaxed)) {
      int expected = kFree;
      if (job->state[c].compare_exchange_strong(expected, kCaller, std::memory_order_acq_rel)) {
        run_chunk_in_place(*job, c);
      }
    }
    for (const int64_t c : take_back(*job)) run_chunk_in_place(*job, c);
  } catch (...) {
    take_back(*job);
    helpers.retire(job);
    throw;
  }
  helpers.retire(job);
}

}  // namespace e2evlp
