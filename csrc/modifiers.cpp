// Window and score modifiers of the CPU kernels (see checks.h): softcap, relative-position bias and
// ALiBi, applied per score tile, and their backward.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "checks.h"
#include "kernels.h"

namespace fusedattn_cpu {
namespace {

// s[j] = c * tanh(s[j] / c) (and t[j] = tanh(s[j] / c) when t != nullptr). For |x| >= 0.6 through
// tanh(x) = 1 - 2 / (1 + e^{2x}) with e^{2x} from a degree-6 polynomial after range reduction
// (relative error of e^{2x} about 1.2e-7, so the absolute error of tanh stays below 3e-7, a few ulps
// of |tanh| >= 0.53); below 0.6, where 1 - 2 / (1 + e^{2x}) cancels (the same absolute error would be
// a large relative error of a small score: 1e-4 at x = 1e-3), tanh(x) = x + x^3 P(x^2) with a degree-4
// least-squares P (1.3 ulp on [0, 0.6] in float32 Horner form; the Triton kernels use the same one).
// On AVX-512 the division is a 14-bit reciprocal and one Newton step (about 1 ulp).
// AVX-512 and AVX2 forms (intrinsics: GCC does not vectorize this loop in target functions)
// and a scalar fallback, at the ISA level the kernels use (current_isa()).
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860682030941723e-6f;
constexpr float kP[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
// tanh(x) = x + x^3 (T0 + T1 x^2 + ... + T4 x^8) on |x| < 0.6
constexpr float kT[] = {-0.005995491519570351f, 0.020877007395029068f, -0.0538061261177063f, 0.133321613073349f,
                        -0.3333330452442169f};
constexpr float kSmall = 0.6f;

void softcap_scalar(float* s, float* t, int n, float c) {
  for (int j = 0; j < n; ++j) {
    const float th = std::tanh(s[j] / c);
    if (t != nullptr) t[j] = th;
    s[j] = c * th;
  }
}

__attribute__((target("avx512f")))
void softcap_avx512(float* s, float* t, int n, float c, float pre) {
  const __m512 rc = _mm512_set1_ps(pre / c), cv = _mm512_set1_ps(c), one = _mm512_set1_ps(1.f),
               two = _mm512_set1_ps(2.f), lo = _mm512_set1_ps(-87.f), hi = _mm512_set1_ps(87.f);
  for (int j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
    const __m512 u = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + j), rc);  // x = pre * s / c
    const __m512 u2 = _mm512_mul_ps(u, u);
    __m512 q = _mm512_set1_ps(kT[0]);
    for (int i = 1; i < 5; ++i) q = _mm512_fmadd_ps(q, u2, _mm512_set1_ps(kT[i]));
    __m512 th = _mm512_fmadd_ps(_mm512_mul_ps(u, u2), q, u);  // |x| < 0.6
    const __mmask16 ms = _mm512_cmp_ps_mask(_mm512_abs_ps(u), _mm512_set1_ps(kSmall), _CMP_LT_OQ);
    if (ms != (__mmask16)0xFFFF) {  // some |x| >= 0.6 (or NaN): 1 - 2 / (1 + e^{2x})
      __m512 x = _mm512_add_ps(u, u);
      x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
      const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Hi), x);
      r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Lo), r);
      __m512 p = _mm512_set1_ps(kP[0]);
      for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP[i]));
      const __m512 z = _mm512_add_ps(one, _mm512_scalef_ps(p, k));
      __m512 r0 = _mm512_rcp14_ps(z);
      r0 = _mm512_mul_ps(r0, _mm512_fnmadd_ps(z, r0, two));  // 1 / z, one Newton step
      th = _mm512_mask_blend_ps(ms, _mm512_fnmadd_ps(two, r0, one), th);
      // a NaN score stays NaN (the clamp above would make it -87: a finite -softcap)
      th = _mm512_mask_mov_ps(th, _mm512_cmp_ps_mask(u, u, _CMP_UNORD_Q), u);
    }
    if (t != nullptr) _mm512_mask_storeu_ps(t + j, m, th);
    _mm512_mask_storeu_ps(s + j, m, _mm512_mul_ps(cv, th));
  }
}

__attribute__((target("avx2,fma")))
void softcap_avx2(float* s, float* t, int n, float c) {
  const __m256 rc = _mm256_set1_ps(1.f / c), cv = _mm256_set1_ps(c), one = _mm256_set1_ps(1.f),
               two = _mm256_set1_ps(2.f), lo = _mm256_set1_ps(-87.f), hi = _mm256_set1_ps(87.f);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int j = 0; j < n; j += 8) {
    const int nv = std::min(8, n - j);
    alignas(32) float buf[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < nv; ++i) buf[i] = s[j + i];
    const __m256 u = _mm256_mul_ps(_mm256_load_ps(buf), rc);  // x = s / c
    const __m256 u2 = _mm256_mul_ps(u, u);
    __m256 q = _mm256_set1_ps(kT[0]);
    for (int i = 1; i < 5; ++i) q = _mm256_fmadd_ps(q, u2, _mm256_set1_ps(kT[i]));
    __m256 th = _mm256_fmadd_ps(_mm256_mul_ps(u, u2), q, u);  // |x| < 0.6
    const __m256 small = _mm256_cmp_ps(_mm256_and_ps(u, absmask), _mm256_set1_ps(kSmall), _CMP_LT_OQ);
    if (_mm256_movemask_ps(small) != 0xFF) {  // some |x| >= 0.6 (or NaN): 1 - 2 / (1 + e^{2x})
      __m256 x = _mm256_add_ps(u, u);
      x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
      const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Hi), x);
      r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Lo), r);
      __m256 p = _mm256_set1_ps(kP[0]);
      for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP[i]));
      const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
      const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
      th = _mm256_blendv_ps(_mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(one, e))), th, small);
      th = _mm256_blendv_ps(th, u, _mm256_cmp_ps(u, u, _CMP_UNORD_Q));  // a NaN score stays NaN
    }
    alignas(32) float tb[8], sb[8];
    _mm256_store_ps(tb, th);
    _mm256_store_ps(sb, _mm256_mul_ps(cv, th));
    for (int i = 0; i < nv; ++i) {
      if (t != nullptr) t[j + i] = tb[i];
      s[j + i] = sb[i];
    }
  }
}

// s[j] = pre * s[j] + rel[clamp(d0 + j, -M1, M1)] (rel != nullptr; one FMA), then s[j] -= slope |d0 + j|
// (alibi; one FMA): apply_mods' loops in one pass of 16-lane vectors
__attribute__((target("avx512f")))
void biases_avx512(float* s, int nc, const float* rel, int64_t d0, int64_t M1, bool alibi, float slope,
                   float pre) {
  const __m512 pv = _mm512_set1_ps(pre), sl = _mm512_set1_ps(slope), fd0 = _mm512_set1_ps((float)d0),
               iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int lo = rel != nullptr ? (int)std::clamp<int64_t>(-M1 - d0, 0, nc) : 0;
  const int hi = rel != nullptr ? (int)std::clamp<int64_t>(M1 - d0 + 1, lo, nc) : 0;
  const float* r = rel != nullptr ? rel + d0 : nullptr;
  for (int j = 0; j < nc; j += 16) {
    const __mmask16 live = nc - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nc - j)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(live, s + j);
    if (rel != nullptr) {
      __m512 b;
      if (j + 16 <= lo) {
        b = _mm512_set1_ps(rel[-M1]);
      } else if (j >= hi) {
        b = _mm512_set1_ps(rel[M1]);
      } else if (j >= lo && j + 16 <= hi) {
        b = _mm512_loadu_ps(r + j);
      } else {  // a segment edge in this vector: lane by lane
        alignas(64) float t[16];
        for (int l = 0; l < 16; ++l) {
          const int jj = j + l;
          t[l] = jj < lo ? rel[-M1] : jj < hi ? r[jj] : rel[M1];
        }
        b = _mm512_load_ps(t);
      }
      v = _mm512_fmadd_ps(v, pv, b);
    } else if (pre != 1.f) {
      v = _mm512_mul_ps(v, pv);
    }
    if (alibi) {
      const __m512 d = _mm512_abs_ps(_mm512_add_ps(fd0, _mm512_add_ps(_mm512_set1_ps((float)j), iota)));
      v = _mm512_fnmadd_ps(sl, d, v);
    }
    _mm512_mask_storeu_ps(s + j, live, v);
  }
}

void softcap_row(Level level, float* s, float* t, int n, float c) {
  if (level == Level::avx512) return softcap_avx512(s, t, n, c, 1.f);
  if (level == Level::avx2) return softcap_avx2(s, t, n, c);
  softcap_scalar(s, t, n, c);
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
    const int64_t nb = p.varlen() ? (int64_t)p.cq.size() - 1 : p.B;  // packed: a row per sequence
    TORCH_CHECK((a.dim() == 1 && a.size(0) == p.H) || (per_b && a.size(0) == nb && a.size(1) == p.H), op,
                ": alibi_slopes must have shape (H,) or (B, H) = (", nb, ", ", p.H, "), got ", a.sizes());
    keep.push_back(a.to(at::kFloat).contiguous());
    p.mods.alibi = keep.back().data_ptr<float>();
    p.mods.alibi_bstride = per_b ? p.H : 0;
  }
}

void apply_mods(const Problem& p, int64_t b, int64_t h, int64_t i0, int nr, int64_t j0, int nc, float* S,
                int ldS, float* T, float pre) {
  const Mods& m = p.mods;
  const Level level = current_isa().level;  // FUSEDATTN_CPU_ISA / set_level apply here too
  const float* rel = m.rel != nullptr ? m.rel + h * (2 * m.M - 1) + (m.M - 1) : nullptr;  // rel[d]
  const int64_t M1 = m.M - 1;
  for (int i = 0; i < nr; ++i) {
    float* s = S + (int64_t)i * ldS;
    const int64_t d0 = j0 - (i0 + i) - p.shift(i0 + i);  // distance of key j0; key j0 + j has d0 + j
    // per batch row, or per sequence of a packed batch
    const float slope =
        m.alibi != nullptr ? m.alibi[(p.varlen() ? p.seq[i0 + i] : b) * m.alibi_bstride + h] : 0.f;
    float* t = T != nullptr ? T + (int64_t)i * ldS : nullptr;
    if (level == Level::avx512) {  // the scale folded into the first modifier
      if (m.softcap > 0.f) softcap_avx512(s, t, nc, m.softcap, pre);
      if (rel != nullptr || m.alibi != nullptr)
        biases_avx512(s, nc, rel, d0, M1, m.alibi != nullptr, slope, m.softcap > 0.f ? 1.f : pre);
      continue;
    }
    if (pre != 1.f)  // (only the avx512 level's brgemm path leaves unscaled products)
      for (int j = 0; j < nc; ++j) s[j] *= pre;
    if (m.softcap > 0.f) softcap_row(level, s, t, nc, m.softcap);
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

void mods_backward(const Problem& p, int64_t i0, int nr, int64_t j0, int nc, float* dS, const float* P, int ldS,
                   const float* T, double* drel) {
  const Mods& m = p.mods;
  for (int i = 0; i < nr; ++i) {
    float* ds = dS + (int64_t)i * ldS;
    if (m.rel != nullptr) {  // drel[d + M - 1] += dS, as apply_mods reads rel: three segments
      const int64_t M1 = m.M - 1, d0 = j0 - (i0 + i) - p.shift(i0 + i), n = 2 * M1 + 1;
      const float* pr = P + (int64_t)i * ldS;
      const int lo = (int)std::clamp<int64_t>(-M1 - d0, 0, nc), hi = (int)std::clamp<int64_t>(M1 - d0 + 1, lo, nc);
      double below = 0.0, above = 0.0, pbelow = 0.0, pabove = 0.0;
      for (int j = 0; j < lo; ++j) {
        below += ds[j];
        pbelow += pr[j];
      }
      double* r = drel + M1 + d0;
      double* pm = drel + n + M1 + d0;  // the softmax mass per distance (reduce_rel)
      for (int j = lo; j < hi; ++j) {
        r[j] += ds[j];
        pm[j] += pr[j];
      }
      for (int j = hi; j < nc; ++j) {
        above += ds[j];
        pabove += pr[j];
      }
      drel[0] += below;
      drel[2 * M1] += above;
      drel[n] += pbelow;
      drel[n + 2 * M1] += pabove;
    }
    if (m.softcap > 0.f) {
      const float* t = T + (int64_t)i * ldS;
      for (int j = 0; j < nc; ++j) ds[j] *= 1.f - t[j] * t[j];
    }
  }
}

}  // namespace fusedattn_cpu
