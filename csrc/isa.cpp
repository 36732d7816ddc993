// Run-time choice of the instruction-set level (declared in kernels.h).
//
// best_level() asks CPUID for the instruction sets and XGETBV for the register state the OS saves
// on a context switch (AVX needs the YMM state, AVX-512 also the opmask and ZMM states): a CPU that
// has AVX-512 under an OS or hypervisor that does not enable it runs the AVX2 level.
// The level in use is fixed on first use from FUSEDATTN_CPU_ISA (unset or empty: the best level);
// the variable is read once per process. set_level() changes it afterwards (tests use it to run
// every level in one process).
#include <ATen/ATen.h>
#include <cpuid.h>

#include <atomic>
#include <cstdlib>
#include <mutex>

#include "kernels.h"

namespace fusedattn_cpu {
namespace {

uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((uint64_t)hi << 32) | lo;
}

Level detect() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Level::scalar;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12);
  if (!osxsave || !avx || !fma) return Level::scalar;
  const uint64_t xcr0 = xgetbv0();
  if ((xcr0 & 0x6) != 0x6) return Level::scalar;  // SSE and YMM state
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return Level::scalar;
  if (!(b & (1u << 5))) return Level::scalar;  // AVX2
  const bool f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
  const bool zmm_state = (xcr0 & 0xe6) == 0xe6;  // + opmask, ZMM_Hi256, Hi16_ZMM
  return f && dq && bw && vl && zmm_state ? Level::avx512 : Level::avx2;
}

constexpr const char* kNames[] = {"scalar", "avx2", "avx512"};
constexpr int kUnset = -1, kBad = -2;

std::atomic<int> g_level{kUnset};
std::mutex g_mu;
std::string g_error;  // why FUSEDATTN_CPU_ISA was rejected (set once, under g_mu)

std::string allowed_text() {
  std::string s;
  for (const auto& n : supported_levels()) s += (s.empty() ? "" : ", ") + n;
  return s;
}

// level for `name`, or an error message in *err
int parse(const std::string& name, const char* what, std::string* err) {
  for (int l = 0; l < 3; ++l) {
    if (name != kNames[l]) continue;
    if (l > (int)best_level()) {
      *err = std::string(what) + ": level '" + name + "' is not supported by this CPU (best: " +
             kNames[(int)best_level()] + "); allowed values here: " + allowed_text();
      return kBad;
    }
    return l;
  }
  *err = std::string(what) + ": unknown level '" + name + "'; allowed values: scalar, avx2, avx512 " +
         "(this CPU: " + allowed_text() + ")";
  return kBad;
}

}  // namespace

Level best_level() {
  static const Level l = detect();
  return l;
}

const char* level_name(Level l) { return kNames[(int)l]; }

std::vector<std::string> supported_levels() {
  std::vector<std::string> out;
  for (int l = 0; l <= (int)best_level(); ++l) out.emplace_back(kNames[l]);
  return out;
}

Isa current_isa() {
  int l = g_level.load(std::memory_order_acquire);
  if (l == kUnset) {
    std::lock_guard<std::mutex> lock(g_mu);
    l = g_level.load();
    if (l == kUnset) {
      const char* env = std::getenv("FUSEDATTN_CPU_ISA");
      l = (env == nullptr || env[0] == '\0') ? (int)best_level() : parse(env, "FUSEDATTN_CPU_ISA", &g_error);
      g_level.store(l, std::memory_order_release);
    }
  }
  if (l == kBad) {
    std::lock_guard<std::mutex> lock(g_mu);
    TORCH_CHECK_VALUE(false, g_error);
  }
  return Isa{(Level)l};
}

void set_level(const std::string& name) {
  std::string err;
  const int l = parse(name, "fusedattn_cpu::set_isa", &err);
  TORCH_CHECK_VALUE(l != kBad, err);
  std::lock_guard<std::mutex> lock(g_mu);
  g_level.store(l, std::memory_order_release);
}

}  // namespace fusedattn_cpu
