// AVX2 + FMA inner loops (declared in kernels.h, namespace avx2). Every function carries the target
// attribute and nothing inline is shared with code compiled for the baseline, so the binary still
// loads and runs on a CPU without AVX2 (the dispatchers then never call these).
//
// Reciprocals: the score loop splits its reciprocals between the divider (vdivps) and the reciprocal
// unit plus FMAs (vrcpps, then a Newton step): the two run on different execution resources, so the
// split beats either alone (bench/limits.py, variants avx2_split22 and avx2_ws_split22). vrcpps is
// only ~12 bits (relative error < 1.5 * 2^-12); one Newton step brings it to ~2.3 * 2^-24, about one
// float32 ulp, in the forward; the backward's products of r take two.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "kernels.h"

namespace fusedattn_cpu {
namespace avx2 {
namespace {

#define AVX2_FN __attribute__((target("avx2,fma")))

AVX2_FN inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 1/d without the divider: x0 = rcp(d) (rel. error < 1.5 * 2^-12), then STEPS times
// x <- x + x (1 - d x) (the residual 1 - d x is one FMA, so each step squares the error).
template <int STEPS>
AVX2_FN inline __m256 recip_nr(__m256 d) {
  const __m256 one = _mm256_set1_ps(1.f);
  __m256 x = _mm256_rcp_ps(d);
  for (int s = 0; s < STEPS; ++s) x = _mm256_fmadd_ps(x, _mm256_fnmadd_ps(d, x, one), x);
  return x;
}

// exp(x) for x <= 88 (Cephes-style: x = n ln2 + r, degree-6 polynomial in r, scale by 2^n);
// x < -87 gives 0 (the true value is below the smallest normal float and negligible here);
// NaN gives NaN.
AVX2_FN inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);  // also false for NaN
  // operand order: max/min return their second operand when one is NaN, so NaN propagates
  x = _mm256_max_ps(lo, x);
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  __m256i n = _mm256_cvtps_epi32(fx);
  n = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(n));
  return _mm256_andnot_ps(under, y);
}

// NI query rows x NJ vectors of 8 keys. Terms are centred (w/d - w/2 = -w t / 2) and summed in
// blocks of 16 dims, which keeps the rounding error of the sum near that of a direct tanh sum.
//
// Weight-scaled form: w / (1 + e k) = 1 / (e/w k + 1/w), with Eqw = e/w and iw = 1/w precomputed,
// so d' = fma(Eqw, k, iw) is the reciprocal of the term itself. The divider's lanes take 1/d' - w/2;
// the reciprocal unit's lanes end the term with its Newton step, fmadd(x, 1 - d'x, x - w/2): no
// product by w, one FMA-pipe op fewer per term than w * recip(d) (the subtraction goes to the adders).
// Accumulators with (i + j) even divide, the others use the reciprocal unit. A head whose weights
// all pass weight_scaled_dim (2^-12 <= |w| <= 2^12) takes the form (SCALED): there d' is finite
// and has no cancellation (e k > 0, so e/w k and 1/w share a sign; |d'| >= 2^-12; e, k <= e^40 on
// unflagged rows keep |d'| <= 2^115.4 * 2^12 < 2^128). Other heads (a zero, subnormal, tiny, huge
// or NaN weight) take d = fma(e, k, 1) and w / d, or w * recip(d), in the same split. One choice
// per head, not per dimension: a per-dimension test costs ~10 % of the AVX2 loop (measured, Zen 3).
// FORM 2 (paired): as kernels_avx512.cpp, two dims of the weight-scaled form share one reciprocal,
// 1/d1 + 1/d2 = (d1 + d2) / (d1 d2); the caller guarantees |d| < 2^62 on the tile.
template <int NI, int NJ, int FORM>
AVX2_FN inline void add_scores_block(int A, const float* Eq, const float* Eqw, const float* EkT, int64_t ldk,
                                     const float* w, const float* iw, const float* hw2, float* S, int ldS) {
  constexpr bool SCALED = FORM >= 1;
  const __m256 one = _mm256_set1_ps(1.f), m2 = _mm256_set1_ps(-2.f);
  __m256 tot[NI][NJ], acc[NI][NJ];
  for (int i = 0; i < NI; ++i)
    for (int j = 0; j < NJ; ++j) tot[i][j] = _mm256_setzero_ps();
  for (int a0 = 0; a0 < A; a0 += 16) {
    const int a1 = a0 + 16 < A ? a0 + 16 : A;
    for (int i = 0; i < NI; ++i)
      for (int j = 0; j < NJ; ++j) acc[i][j] = _mm256_setzero_ps();
    const float* kp = EkT + a0 * ldk;
    int a = a0;
    if (FORM == 2) {
      for (; a + 1 < a1; a += 2, kp += 2 * ldk) {
        const __m256 hw = _mm256_broadcast_ss(hw2 + (a >> 1));
        __m256 k1[NJ], k2[NJ];
        for (int j = 0; j < NJ; ++j) {
          k1[j] = _mm256_loadu_ps(kp + 8 * j);
          k2[j] = _mm256_loadu_ps(kp + ldk + 8 * j);
        }
        const __m256 ia1 = _mm256_broadcast_ss(iw + a), ia2 = _mm256_broadcast_ss(iw + a + 1);
        for (int i = 0; i < NI; ++i) {
          const __m256 e1 = _mm256_broadcast_ss(Eqw + (int64_t)i * A + a);
          const __m256 e2 = _mm256_broadcast_ss(Eqw + (int64_t)i * A + a + 1);
          for (int j = 0; j < NJ; ++j) {
            const __m256 d1 = _mm256_fmadd_ps(e1, k1[j], ia1), d2 = _mm256_fmadd_ps(e2, k2[j], ia2);
            const __m256 s = _mm256_add_ps(d1, d2), p = _mm256_mul_ps(d1, d2);
            __m256 t;
            if ((i * NJ + j) % 3 == 2) {  // vrcpps + Newton on p, the numerator folded into the step
              const __m256 x = _mm256_rcp_ps(p), res = _mm256_fnmadd_ps(p, x, one), y = _mm256_mul_ps(s, x);
              t = _mm256_fmadd_ps(y, res, _mm256_sub_ps(y, hw));
            } else {
              t = _mm256_sub_ps(_mm256_div_ps(s, p), hw);
            }
            acc[i][j] = _mm256_add_ps(acc[i][j], t);
          }
        }
      }
    }
    for (; a < a1; ++a, kp += ldk) {
      const __m256 hw = _mm256_set1_ps(0.5f * w[a]);
      __m256 kv[NJ];
      for (int j = 0; j < NJ; ++j) kv[j] = _mm256_loadu_ps(kp + 8 * j);
      const __m256 ia = SCALED ? _mm256_broadcast_ss(iw + a) : one;
      const float* ea = (SCALED ? Eqw : Eq) + a;
      for (int i = 0; i < NI; ++i) {
        const __m256 e = _mm256_broadcast_ss(ea + (int64_t)i * A);
        for (int j = 0; j < NJ; ++j) {
          const __m256 d = _mm256_fmadd_ps(e, kv[j], ia);
          __m256 t;
          if (((i + j) & 1) && FORM != 2) {
            const __m256 x = _mm256_rcp_ps(d), res = _mm256_fnmadd_ps(d, x, one);
            t = SCALED ? _mm256_fmadd_ps(x, res, _mm256_sub_ps(x, hw))
                       : _mm256_fmsub_ps(_mm256_broadcast_ss(w + a), _mm256_fmadd_ps(x, res, x), hw);
          } else {
            t = _mm256_sub_ps(_mm256_div_ps(SCALED ? one : _mm256_broadcast_ss(w + a), d), hw);
          }
          acc[i][j] = _mm256_add_ps(acc[i][j], t);
        }
      }
    }
    for (int i = 0; i < NI; ++i)
      for (int j = 0; j < NJ; ++j) tot[i][j] = _mm256_add_ps(tot[i][j], acc[i][j]);
  }
  for (int i = 0; i < NI; ++i)
    for (int j = 0; j < NJ; ++j) _mm256_storeu_ps(S + (int64_t)i * ldS + 8 * j, _mm256_mul_ps(m2, tot[i][j]));
}

// r = 1/(1+p), p = e*k; returns u = r(1 - r) = r - r*r (one fused op; its absolute error, about
// one float32 ulp of 1, matches that of 1 - t^2 computed from a rounded t).
template <bool NR>
AVX2_FN inline __m256 add_bwd_u(__m256 e, __m256 k, __m256* r) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 d = _mm256_fmadd_ps(e, k, one);
  *r = NR ? recip_nr<2>(d) : _mm256_div_ps(one, d);
  return _mm256_fnmadd_ps(*r, *r, *r);
}

// NI query rows against nc keys for one dim a; dk is loaded and stored once per NI rows. With 4
// rows the last one takes its reciprocal from recip_nr (a quarter: the loop has 4 FMAs per vector
// besides the reciprocal, so the divider stays the bottleneck of the rest).
template <int NI>
AVX2_FN inline __m256 add_bwd_rows(int nc, int A, int a, const float* Eq, const float* kp,
                                   const float* dS, int ldS, float wa, float* dq, float* dk) {
  const __m256 half = _mm256_set1_ps(0.5f), w4 = _mm256_set1_ps(4.f * wa);
  __m256 e[NI], qa[NI], dw = _mm256_setzero_ps();
  for (int i = 0; i < NI; ++i) {
    e[i] = _mm256_set1_ps(Eq[(int64_t)i * A + a]);
    qa[i] = _mm256_setzero_ps();
  }
  for (int j = 0; j < nc; j += 8) {
    const __m256 k = _mm256_loadu_ps(kp + j);
    __m256 msum = _mm256_setzero_ps();
    for (int i = 0; i < NI; ++i) {
      const __m256 d = _mm256_loadu_ps(dS + (int64_t)i * ldS + j);
      __m256 r;
      const __m256 u = (NI == 4 && i == 3) ? add_bwd_u<true>(e[i], k, &r) : add_bwd_u<false>(e[i], k, &r);
      const __m256 m = _mm256_mul_ps(d, u);
      qa[i] = _mm256_add_ps(qa[i], m);
      msum = _mm256_add_ps(msum, m);
      dw = _mm256_fmadd_ps(d, _mm256_sub_ps(r, half), dw);
    }
    _mm256_storeu_ps(dk + j, _mm256_fmadd_ps(w4, msum, _mm256_loadu_ps(dk + j)));
  }
  for (int i = 0; i < NI; ++i) dq[(int64_t)i * A + a] += 4.f * wa * hsum8(qa[i]);
  return dw;
}

template <int FORM>
AVX2_FN inline void add_scores_rows(int nr, int nc16, int A, const float* Eq, const float* Eqw, const float* EkT,
                                    int64_t ldk, const float* w, const float* iw, const float* hw2, float* S,
                                    int ldS) {
  int i = 0;
  for (; i + 2 <= nr; i += 2) {
    const int64_t o = (int64_t)i * A;
    const float* eqw = FORM ? Eqw + o : nullptr;
    for (int j = 0; j < nc16; j += 16)
      add_scores_block<2, 2, FORM>(A, Eq + o, eqw, EkT + j, ldk, w, iw, hw2, S + (int64_t)i * ldS + j, ldS);
  }
  for (; i < nr; ++i) {
    const int64_t o = (int64_t)i * A;
    const float* eqw = FORM ? Eqw + o : nullptr;
    for (int j = 0; j < nc16; j += 16)
      add_scores_block<1, 2, FORM>(A, Eq + o, eqw, EkT + j, ldk, w, iw, hw2, S + (int64_t)i * ldS + j, ldS);
  }
}

}  // namespace

AVX2_FN void add_scores(int nr, int nc16, int A, const float* Eq, const float* Eqw, const float* EkT,
                        int64_t ldk, const float* w, const float* iw, const float* hw2, float* S, int ldS) {
  if (Eqw && iw && hw2) return add_scores_rows<2>(nr, nc16, A, Eq, Eqw, EkT, ldk, w, iw, hw2, S, ldS);
  if (Eqw && iw) return add_scores_rows<1>(nr, nc16, A, Eq, Eqw, EkT, ldk, w, iw, nullptr, S, ldS);
  add_scores_rows<0>(nr, nc16, A, Eq, nullptr, EkT, ldk, w, nullptr, nullptr, S, ldS);
}

AVX2_FN void add_bwd(int nr, int nc16, int A, const float* Eq, const float* EkT, int64_t ldk,
                     const float* w, const float* dS, int ldS, float* dq, float* dkT, int ldd,
                     float* dwr) {
  for (int a = 0; a < A; ++a) {
    const float* kp = EkT + a * ldk;
    float* dk = dkT + (int64_t)a * ldd;
    __m256 dwt = _mm256_setzero_ps();
    int i = 0;
    for (; i + 4 <= nr; i += 4)
      dwt = _mm256_add_ps(dwt, add_bwd_rows<4>(nc16, A, a, Eq + (int64_t)i * A, kp, dS + (int64_t)i * ldS,
                                               ldS, w[a], dq + (int64_t)i * A, dk));
    for (; i < nr; ++i)
      dwt = _mm256_add_ps(dwt, add_bwd_rows<1>(nc16, A, a, Eq + (int64_t)i * A, kp, dS + (int64_t)i * ldS,
                                               ldS, w[a], dq + (int64_t)i * A, dk));
    dwr[a] += hsum8(dwt);
  }
}

AVX2_FN float row_max(const float* x, int n) {  // NaN if any x is NaN
  __m256 m = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    m = _mm256_max_ps(m, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  float r = _mm_cvtss_f32(h);
  bool any_nan = _mm256_movemask_ps(nan) != 0;
  for (; j < n; ++j) {
    any_nan = any_nan || x[j] != x[j];
    r = x[j] > r ? x[j] : r;
  }
  return any_nan ? NAN : r;
}

AVX2_FN float exp_sub_sum(float* x, int n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), mv));
    _mm256_storeu_ps(x + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  if (j < n) {  // tail through a padded vector, so every element uses the same formula
    alignas(32) float t[8];
    for (int u = 0; u < 8; ++u) t[u] = j + u < n ? x[j + u] : -INFINITY;
    const __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(t), mv));
    _mm256_store_ps(t, e);
    acc = _mm256_add_ps(acc, e);
    for (int u = 0; j + u < n; ++u) x[j + u] = t[u];
  }
  return hsum8(acc);
}

AVX2_FN bool exp2x_row(const float* x, float* y, int n, float lim, const float* w, float* yw, float* mx) {
  const __m256 two = _mm256_set1_ps(2.f), lv = _mm256_set1_ps(lim);
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 m = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(v, absm), lv, _CMP_NLE_UQ));  // NaN: true
    const __m256 e = exp8(_mm256_mul_ps(two, v));
    if (y != nullptr) _mm256_storeu_ps(y + j, e);
    if (yw != nullptr) _mm256_storeu_ps(yw + j, _mm256_div_ps(e, _mm256_loadu_ps(w + j)));
    m = _mm256_max_ps(m, e);
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  float r = std::max(*mx, _mm_cvtss_f32(h));
  bool flag = _mm256_movemask_ps(bad) != 0;
  for (; j < n; ++j) {  // the tail as the scalar level does it
    flag |= !(std::fabs(x[j]) <= lim);
    const float e = std::exp(2.f * x[j]);
    if (y != nullptr) y[j] = e;
    if (yw != nullptr) yw[j] = e / w[j];
    r = e > r ? e : r;
  }
  if (flag) {  // rare: the row takes e^0 (the score loops then use a direct tanh for it)
    r = std::max(*mx, 1.f);
    for (int u = 0; u < n; ++u) {
      if (y != nullptr) y[u] = 1.f;
      if (yw != nullptr) yw[u] = 1.f / w[u];
    }
  }
  *mx = r;
  return flag;
}

}  // namespace avx2
}  // namespace fusedattn_cpu
