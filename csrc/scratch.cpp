#include "scratch.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

namespace fusedattn_cpu {
namespace {

std::mutex mu;
std::multimap<size_t, void*> free_blocks;  // size -> block
size_t cached = 0;

size_t cap_bytes() {
  static const size_t cap = [] {
    const char* s = std::getenv("FUSEDATTN_CPU_SCRATCH_MIB");
    if (s == nullptr || *s == '\0') return size_t(256) << 20;
    char* end = nullptr;
    const long long v = std::strtoll(s, &end, 10);
    TORCH_CHECK_VALUE(end != s && *end == '\0' && v >= 0 && v <= (1LL << 30),
                      "FUSEDATTN_CPU_SCRATCH_MIB must be a non-negative whole number of MiB, got '", s, "'");
    return size_t(v) << 20;
  }();
  return cap;
}

void release(void* p, size_t size) {
  {
    std::lock_guard<std::mutex> g(mu);
    if (cached + size <= cap_bytes()) {
      free_blocks.emplace(size, p);
      cached += size;
      return;
    }
  }
  std::free(p);
}

}  // namespace

at::Tensor scratch_empty(at::IntArrayRef sizes, at::ScalarType t) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  const size_t want = (size_t(std::max<int64_t>(n, 1)) * at::elementSize(t) + 4095) / 4096 * 4096;
  void* p = nullptr;
  size_t size = want;
  {
    std::lock_guard<std::mutex> g(mu);
    auto it = free_blocks.lower_bound(want);
    if (it != free_blocks.end() && it->first <= 2 * want) {
      p = it->second;
      size = it->first;
      cached -= size;
      free_blocks.erase(it);
    }
  }
  if (p == nullptr) {
    p = std::aligned_alloc(64, size);
    TORCH_CHECK(p != nullptr, "fusedattn_cpu: out of memory for ", size, " bytes of scratch");
  }
  return at::from_blob(p, sizes, [size](void* q) { release(q, size); }, at::TensorOptions().dtype(t));
}

int64_t scratch_budget_bytes() { return (int64_t)cap_bytes(); }

int64_t scratch_cached_bytes() {
  std::lock_guard<std::mutex> g(mu);
  return (int64_t)cached;
}

}  // namespace fusedattn_cpu
