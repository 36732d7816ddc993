// Window and score modifiers of the CPU kernels (see checks.h): softcap, relative-position bias and
// ALiBi, applied per score tile, and their backward.
#include <bit>
#include <cmath>
#include <cstdint>

#include "checks.h"

namespace fusedattn_cpu {
namespace {

// s[j] = c * tanh(s[j] / c) (and t[j] = tanh(s[j] / c) when t != nullptr), through
// tanh(x) = 1 - 2 / (1 + e^{2x}) with e^{2x} from a degree-6 polynomial after range reduction
// (|relative error| of e^{2x} about 1.2e-7; absolute error of tanh below 2.4e-7). Written to
// auto-vectorize; one clone per ISA, chosen by the loader.
__attribute__((target_clones("avx512f", "avx2,fma", "default")))
void softcap_row(float* s, float* t, int n, float c) {
  const float inv_c = 2.f / c;
#pragma omp simd
  for (int j = 0; j < n; ++j) {
    const float x = std::fmin(std::fmax(s[j] * inv_c, -87.f), 87.f);   // 2 s / c
    const float k = std::floor(x * 1.44269504088896341f + 0.5f);
    const float r = x - k * 0.693145751953125f - k * 1.42860682030941723e-6f;
    float p = 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const float e = p * std::bit_cast<float>((int32_t)(k + 127.f) << 23);
    const float th = 1.f - 2.f / (1.f + e);
    if (t != nullptr) t[j] = th;
    s[j] = c * th;
  }
}

}  // namespace

void set_modifiers(const char* op, Problem& p, int64_t window_left, int64_t window_right, double softcap,
                   const c10::optional<at::Tensor>& rel_bias, const c10::optional<at::Tensor>& alibi_slopes,
                   std::vector<at::Tensor>& keep) {
  TORCH_CHECK(window_left >= -1 && window_right >= -1, op, ": window sides must be >= -1, got (",
              window_left, ", ", window_right, ")");
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be finite and >= 0, got ", softcap);
  p.wl = window_left;
  p.wr = p.causal ? 0 : window_right;
  p.mods.softcap = (float)softcap;
  if (rel_bias.has_value() && rel_bias->defined()) {
    const at::Tensor& r = *rel_bias;
    TORCH_CHECK(r.dim() == 2 && r.size(0) == p.H && r.size(1) % 2 == 1, op,
                ": rel_bias must have shape (H, 2M - 1) = (", p.H, ", odd), got ", r.sizes());
    keep.push_back(r.to(at::kFloat).contiguous());
    p.mods.rel = keep.back().data_ptr<float>();
    p.mods.M = (r.size(1) + 1) / 2;
  }
  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    const at::Tensor& a = *alibi_slopes;
    const bool per_b = a.dim() == 2;
    TORCH_CHECK((a.dim() == 1 && a.size(0) == p.H) || (per_b && a.size(0) == p.B && a.size(1) == p.H), op,
                ": alibi_slopes must have shape (H,) or (B, H) = (", p.B, ", ", p.H, "), got ", a.sizes());
    keep.push_back(a.to(at::kFloat).contiguous());
    p.mods.alibi = keep.back().data_ptr<float>();
    p.mods.alibi_bstride = per_b ? p.H : 0;
  }
}

void apply_mods(const Problem& p, int64_t b, int64_t h, int64_t i0, int nr, int64_t j0, int nc, float* S,
                int ldS, float* T) {
  const Mods& m = p.mods;
  const float* rel = m.rel != nullptr ? m.rel + h * (2 * m.M - 1) + (m.M - 1) : nullptr;  // rel[d]
  const float slope = m.alibi != nullptr ? m.alibi[b * m.alibi_bstride + h] : 0.f;
  const int64_t shift = p.Lk - p.Lq, M1 = m.M - 1;
  for (int i = 0; i < nr; ++i) {
    float* s = S + (int64_t)i * ldS;
    const int64_t d0 = j0 - (i0 + i) - shift;  // distance of key j0; key j0 + j has d0 + j
    if (m.softcap > 0.f) softcap_row(s, T != nullptr ? T + (int64_t)i * ldS : nullptr, nc, m.softcap);
    if (rel != nullptr) {  // clamped below -(M-1), a contiguous slice inside, clamped above M-1
      const int lo = (int)std::clamp<int64_t>(-M1 - d0, 0, nc), hi = (int)std::clamp<int64_t>(M1 - d0 + 1, lo, nc);
      for (int j = 0; j < lo; ++j) s[j] += rel[-M1];
      const float* r = rel + d0;
      for (int j = lo; j < hi; ++j) s[j] += r[j];
      for (int j = hi; j < nc; ++j) s[j] += rel[M1];
    }
    if (m.alibi != nullptr) {
      const float fd0 = (float)d0;
      for (int j = 0; j < nc; ++j) s[j] -= slope * std::fabs(fd0 + (float)j);
    }
  }
}

void mods_backward(const Problem& p, int64_t i0, int nr, int64_t j0, int nc, float* dS, int ldS,
                   const float* T, float* drel) {
  const Mods& m = p.mods;
  const int64_t shift = p.Lk - p.Lq;
  for (int i = 0; i < nr; ++i) {
    float* ds = dS + (int64_t)i * ldS;
    if (m.rel != nullptr) {  // drel[d + M - 1] += dS, as apply_mods reads rel: three segments
      const int64_t M1 = m.M - 1, d0 = j0 - (i0 + i) - shift;
      const int lo = (int)std::clamp<int64_t>(-M1 - d0, 0, nc), hi = (int)std::clamp<int64_t>(M1 - d0 + 1, lo, nc);
      float below = 0.f, above = 0.f;
      for (int j = 0; j < lo; ++j) below += ds[j];
      float* r = drel + M1 + d0;
      for (int j = lo; j < hi; ++j) r[j] += ds[j];
      for (int j = hi; j < nc; ++j) above += ds[j];
      drel[0] += below;
      drel[2 * M1] += above;
    }
    if (m.softcap > 0.f) {
      const float* t = T + (int64_t)i * ldS;
      for (int j = 0; j < nc; ++j) ds[j] *= 1.f - t[j] * t[j];
    }
  }
}

}  // namespace fusedattn_cpu
