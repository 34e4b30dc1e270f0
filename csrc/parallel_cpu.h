// Batched CPU work that uses idle cores but never waits for a helper thread the OS has descheduled.
//
// at::parallel_for splits a range statically and joins at a barrier, so on a machine where another process
// keeps a core busy the call lasts until the slowest thread is scheduled again: 2-10x its single-threaded
// time on two cores. run_items splits the range into chunks that the calling thread and helper threads
// claim one at a time. A helper computes into its own scratch and commits only if the chunk is still its
// own; once no chunk is left to claim, the caller takes back (recomputes) every chunk a helper still holds.
// The call therefore never lasts longer than the caller doing all the work alone, plus one chunk per helper.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace e2evlp {

// One output of a batched op: item i owns the `item_bytes` contiguous bytes at base + i * item_bytes.
struct ItemOutput {
  char* base;
  int64_t item_bytes;
};

// body(begin, end, dst) computes items [begin, end) and writes item i of output k at
// dst[k] + (i - begin) * outputs[k].item_bytes, every byte of it. It may run on a helper thread after
// run_items has returned (its result then discarded), so it must own what it reads: capture tensors and
// tables by value, never references to the caller's stack. It must not call back into ATen's thread pool.
using ItemBody = std::function<void(int64_t begin, int64_t end, char* const* dst)>;

// Runs body over [0, n_items) in chunks of `chunk_items`. Runs on the calling thread alone when
// `worth_threads` is false, when at::get_num_threads() is 1, or when called inside a parallel region.
void run_items(int64_t n_items, int64_t chunk_items, bool worth_threads, const std::vector<ItemOutput>& outputs,
               ItemBody body);

// Chunk size and threading decision from an estimate of the work per item, in nanoseconds of one core.
struct ItemPlan {
  int64_t chunk_items;
  bool worth_threads;
};
ItemPlan plan_items(int64_t n_items, double ns_per_item);

}  // namespace e2evlp
