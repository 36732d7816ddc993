// Window and score modifiers of the CPU kernels (see checks.h): softcap, relative-position bias and
// ALiBi, applied per score tile, and their backward.
#include <cmath>

#include "checks.h"

namespace fusedattn_cpu {

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
  const float c = m.softcap, inv_c = c > 0.f ? 1.f / c : 0.f;
  const float* rel = m.rel != nullptr ? m.rel + h * (2 * m.M - 1) + (m.M - 1) : nullptr;
  const float slope = m.alibi != nullptr ? m.alibi[b * m.alibi_bstride + h] : 0.f;
  const int64_t shift = p.Lk - p.Lq;
  for (int i = 0; i < nr; ++i) {
    float* s = S + (int64_t)i * ldS;
    float* t = T != nullptr ? T + (int64_t)i * ldS : nullptr;
    const int64_t d0 = j0 - (i0 + i) - shift;  // distance of key j0
    if (c > 0.f) {
      for (int j = 0; j < nc; ++j) {
        const float th = std::tanh(s[j] * inv_c);
        if (t != nullptr) t[j] = th;
        s[j] = c * th;
      }
    }
    if (rel != nullptr) {
      const int64_t M1 = m.M - 1;
      for (int j = 0; j < nc; ++j) s[j] += rel[std::clamp<int64_t>(d0 + j, -M1, M1)];
    }
    if (m.alibi != nullptr)
      for (int j = 0; j < nc; ++j) s[j] -= slope * (float)std::llabs(d0 + j);
  }
}

void mods_backward(const Problem& p, int64_t i0, int nr, int64_t j0, int nc, float* dS, int ldS,
                   const float* T, float* drel) {
  const Mods& m = p.mods;
  const int64_t shift = p.Lk - p.Lq;
  for (int i = 0; i < nr; ++i) {
    float* ds = dS + (int64_t)i * ldS;
    if (m.rel != nullptr) {
      const int64_t M1 = m.M - 1, d0 = j0 - (i0 + i) - shift;
      for (int j = 0; j < nc; ++j) drel[std::clamp<int64_t>(d0 + j, -M1, M1) + M1] += ds[j];
    }
    if (m.softcap > 0.f) {
      const float* t = T + (int64_t)i * ldS;
      for (int j = 0; j < nc; ++j) ds[j] *= 1.f - t[j] * t[j];
    }
  }
}

}  // namespace fusedattn_cpu
