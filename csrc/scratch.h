// Scratch tensors of the cpu ops (operand layouts, the additive factor tables), kept for the next call.
//
// A call's scratch is O(L * D) against its O(Lq * Lk * D) work, but fresh memory costs a page fault
// per 4 KiB; in a banded call (a sliding window) that is a visible share of the time, and more so when
// calls of other sizes run in between (glibc then returns the memory to the system). Freed scratch
// blocks are kept, up to FUSEDATTN_CPU_SCRATCH_MIB MiB in all (default 256; 0 keeps none), and reused
// for a request of at most their size and at least half of it.
#pragma once

#include <ATen/ATen.h>

namespace fusedattn_cpu {

// An uninitialized contiguous CPU tensor whose memory comes from the cache when a block fits.
at::Tensor scratch_empty(at::IntArrayRef sizes, at::ScalarType t);

// Bytes held by the cache now (freed blocks awaiting reuse).
int64_t scratch_cached_bytes();

// The cache's budget in bytes, FUSEDATTN_CPU_SCRATCH_MIB read once; a malformed value raises ValueError.
// Every op calls it (make_problem), so a bad value is refused at every ISA level, used scratch or not.
int64_t scratch_budget_bytes();

}  // namespace fusedattn_cpu
