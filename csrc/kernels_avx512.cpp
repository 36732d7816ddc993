// AVX-512 (F/BW/VL/DQ) inner loops (declared in kernels.h, namespace avx512): 16 float lanes, the
// same formulas as kernels_avx2.cpp. Every function carries the target attribute, so the binary
// loads on any x86-64 CPU; the dispatchers call these only when isa.cpp found AVX-512 enabled.
//
// Reciprocals: vrcp14ps has a relative error below 2^-14, so one Newton step in the residual form
// x + x (1 - d x) reaches float32 accuracy (the error before rounding is ~2^-28). The score loop
// splits its reciprocals between the divider and vrcp14ps + Newton (bench/limits.py, variants
// avx512_split22 and avx512_ws_split22) and, where the tile's factors allow, pairs two dims per
// reciprocal (add_scores_block FORM 2; variant avx512_ws_pair31);
// the backward loop gives a quarter of its rows to vrcp14ps (its other FMAs keep those pipes busy).
#include <immintrin.h>

#include <cmath>

#include "kernels.h"

namespace fusedattn_cpu {
namespace avx512 {
namespace {

#define AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))

AVX512_FN inline __m512 recip_nr(__m512 d) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 x = _mm512_rcp14_ps(d);
  return _mm512_fmadd_ps(x, _mm512_fnmadd_ps(d, x, one), x);
}

// x = fx ln2 + r with fx = round(x log2(e)) and |r| <= ln2 / 2 (Cody-Waite: ln2 in two parts)
AVX512_FN inline __m512 ln2_reduce(__m512 x, __m512* fx) {
  *fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(*fx, _mm512_set1_ps(0.693359375f), x);
  return _mm512_fnmadd_ps(*fx, _mm512_set1_ps(-2.12194440e-4f), r);
}

// c[0] r^(n-1) + ... + c[n-1] in Horner form (one FMA per step)
AVX512_FN inline __m512 horner(__m512 r, const float* c, int n) {
  __m512 y = _mm512_set1_ps(c[0]);
  for (int i = 1; i < n; ++i) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c[i]));
  return y;
}

// exp(x) as exp8 in kernels_avx2.cpp (same constants and steps), 16 lanes.
AVX512_FN inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);  // x >= -87 or NaN
  x = _mm512_max_ps(lo, x);
  x = _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), x);
  __m512 fx;
  const __m512 r = ln2_reduce(x, &fx);
  static constexpr float kP[] = {1.9875691500E-4f, 1.3981999507E-3f, 8.3334519073E-3f, 4.1665795894E-2f,
                                 1.6666665459E-1f, 5.0000001201E-1f};
  __m512 y = horner(r, kP, 6);
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  // y * 2^fx in one instruction (fx is integral and within [-126, 128]: the same value as building
  // 2^fx from its exponent bits and multiplying, as exp8 does)
  y = _mm512_scalef_ps(y, fx);
  return _mm512_maskz_mov_ps(keep, y);
}

// NI query rows x NJ vectors of 16 keys; centred terms summed in blocks of 16 dims. FORM 0: w / fma(e, k, 1)
// or w * recip(d); FORM 1, the weight-scaled form of kernels_avx2.cpp (d' = fma(Eq/w, k, 1/w); the
// divider's lanes take 1/d' - w/2, vrcp14ps + Newton ends the term as fmadd(x, 1 - d'x, x - w/2)), for
// heads whose weights all pass weight_scaled_dim; accumulators with (i + j) even divide, the others use
// vrcp14ps. FORM 2, paired: two dims a, a + 1 of the weight-scaled form share one reciprocal,
// 1/d1 + 1/d2 = (d1 + d2) / (d1 d2), so a term costs half a reciprocal and 1.5 FMA-pipe ops instead of
// one reciprocal and 1 (divider) or 3 (vrcp14ps + Newton) -- the loop is bound by the FMA pipes and
// the divider together. Two of every three accumulators divide, the third takes vrcp14ps + Newton on
// d1 d2 (the numerator folded into the step: y = (d1 + d2) x, y + y (1 - p x)). The caller guarantees
// |d| < 2^62 for every (row, key, dim) of the tile (AddScores::tile), so d1 d2 is finite and normal;
// d1 + d2 may cancel (weights of opposite sign), with the absolute error of the two separate terms.
// The pairs are centred by hw2[a / 2] = (w_a + w_{a+1}) / 2; an odd last dim divides alone.
template <int NI, int NJ, int FORM>
AVX512_FN inline void add_scores_block(int A, const float* Eq, const float* Eqw, const float* EkT, int64_t ldk,
                                       const float* w, const float* iw, const float* hw2, float* S, int ldS) {
  constexpr bool SCALED = FORM >= 1;
  const __m512 one = _mm512_set1_ps(1.f), m2 = _mm512_set1_ps(-2.f);
  __m512 tot[NI][NJ], acc[NI][NJ];
  for (int i = 0; i < NI; ++i)
    for (int j = 0; j < NJ; ++j) tot[i][j] = _mm512_setzero_ps();
  for (int a0 = 0; a0 < A; a0 += 16) {
    const int a1 = a0 + 16 < A ? a0 + 16 : A;
    for (int i = 0; i < NI; ++i)
      for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_setzero_ps();
    const float* kp = EkT + a0 * ldk;
    int a = a0;
    if (FORM == 2) {
      for (; a + 1 < a1; a += 2, kp += 2 * ldk) {
        const __m512 hw = _mm512_set1_ps(hw2[a >> 1]);
        __m512 k1[NJ], k2[NJ];
        for (int j = 0; j < NJ; ++j) {
          k1[j] = _mm512_loadu_ps(kp + 16 * j);
          k2[j] = _mm512_loadu_ps(kp + ldk + 16 * j);
        }
        const __m512 ia1 = _mm512_set1_ps(iw[a]), ia2 = _mm512_set1_ps(iw[a + 1]);
        for (int i = 0; i < NI; ++i) {
          const __m512 e1 = _mm512_set1_ps(Eqw[(int64_t)i * A + a]), e2 = _mm512_set1_ps(Eqw[(int64_t)i * A + a + 1]);
          for (int j = 0; j < NJ; ++j) {
            const __m512 d1 = _mm512_fmadd_ps(e1, k1[j], ia1), d2 = _mm512_fmadd_ps(e2, k2[j], ia2);
            const __m512 s = _mm512_add_ps(d1, d2), p = _mm512_mul_ps(d1, d2);
            __m512 t;
            if ((i * NJ + j) % 3 == 2) {
              const __m512 x = _mm512_rcp14_ps(p), res = _mm512_fnmadd_ps(p, x, one), y = _mm512_mul_ps(s, x);
              t = _mm512_fmadd_ps(y, res, _mm512_sub_ps(y, hw));
            } else {
              t = _mm512_sub_ps(_mm512_div_ps(s, p), hw);
            }
            acc[i][j] = _mm512_add_ps(acc[i][j], t);
          }
        }
      }
    }
    for (; a < a1; ++a, kp += ldk) {
      const __m512 hw = _mm512_set1_ps(0.5f * w[a]);
      __m512 kv[NJ];
      for (int j = 0; j < NJ; ++j) kv[j] = _mm512_loadu_ps(kp + 16 * j);
      const __m512 ia = SCALED ? _mm512_set1_ps(iw[a]) : one;
      const float* ea = (SCALED ? Eqw : Eq) + a;
      for (int i = 0; i < NI; ++i) {
        const __m512 e = _mm512_set1_ps(ea[(int64_t)i * A]);
        for (int j = 0; j < NJ; ++j) {
          const __m512 d = _mm512_fmadd_ps(e, kv[j], ia);
          __m512 t;
          if (((i + j) & 1) && FORM != 2) {
            const __m512 x = _mm512_rcp14_ps(d), res = _mm512_fnmadd_ps(d, x, one);
            t = SCALED ? _mm512_fmadd_ps(x, res, _mm512_sub_ps(x, hw))
                       : _mm512_fmsub_ps(_mm512_set1_ps(w[a]), _mm512_fmadd_ps(x, res, x), hw);
          } else {
            t = _mm512_sub_ps(_mm512_div_ps(SCALED ? one : _mm512_set1_ps(w[a]), d), hw);
          }
          acc[i][j] = _mm512_add_ps(acc[i][j], t);
        }
      }
    }
    for (int i = 0; i < NI; ++i)
      for (int j = 0; j < NJ; ++j) tot[i][j] = _mm512_add_ps(tot[i][j], acc[i][j]);
  }
  for (int i = 0; i < NI; ++i)
    for (int j = 0; j < NJ; ++j) _mm512_storeu_ps(S + (int64_t)i * ldS + 16 * j, _mm512_mul_ps(m2, tot[i][j]));
}

template <int NI, int FORM>
AVX512_FN inline void add_scores_rows(int nc16, int A, const float* Eq, const float* Eqw, const float* EkT,
                                      int64_t ldk, const float* w, const float* iw, const float* hw2, float* S,
                                      int ldS) {
  int j = 0;
  // a last single vector would run 2 accumulator chains alone: end on 3 + 2 vectors instead of 4 + 1
  const int full = nc16 % 64 == 16 && nc16 > 64 ? nc16 - 80 : nc16;
  for (; j + 64 <= full; j += 64) add_scores_block<NI, 4, FORM>(A, Eq, Eqw, EkT + j, ldk, w, iw, hw2, S + j, ldS);
  if (full != nc16) {
    add_scores_block<NI, 3, FORM>(A, Eq, Eqw, EkT + j, ldk, w, iw, hw2, S + j, ldS);
    j += 48;
  }
  switch ((nc16 - j) / 16) {
    case 3: add_scores_block<NI, 3, FORM>(A, Eq, Eqw, EkT + j, ldk, w, iw, hw2, S + j, ldS); break;
    case 2: add_scores_block<NI, 2, FORM>(A, Eq, Eqw, EkT + j, ldk, w, iw, hw2, S + j, ldS); break;
    case 1: add_scores_block<NI, 1, FORM>(A, Eq, Eqw, EkT + j, ldk, w, iw, hw2, S + j, ldS); break;
    default: break;
  }
}

template <int FORM>
AVX512_FN inline void add_scores_all(int nr, int nc16, int A, const float* Eq, const float* Eqw, const float* EkT,
                                     int64_t ldk, const float* w, const float* iw, const float* hw2, float* S,
                                     int ldS) {
  int i = 0;
  for (; i + 2 <= nr; i += 2)
    add_scores_rows<2, FORM>(nc16, A, Eq + (int64_t)i * A, FORM ? Eqw + (int64_t)i * A : nullptr, EkT, ldk,
                             w, iw, hw2, S + (int64_t)i * ldS, ldS);
  for (; i < nr; ++i)
    add_scores_rows<1, FORM>(nc16, A, Eq + (int64_t)i * A, FORM ? Eqw + (int64_t)i * A : nullptr, EkT, ldk,
                             w, iw, hw2, S + (int64_t)i * ldS, ldS);
}

template <bool NR>
AVX512_FN inline __m512 add_bwd_u(__m512 e, __m512 k, __m512* r) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 d = _mm512_fmadd_ps(e, k, one);
  *r = NR ? recip_nr(d) : _mm512_div_ps(one, d);
  return _mm512_fnmadd_ps(*r, *r, *r);
}

// As add_bwd_rows in kernels_avx2.cpp: with 4 rows the last one uses recip_nr. With qs non-null, row i's
// dq sum vector goes to qs[16 i] unreduced (add_bwd reduces 16 dims at once) instead of into dq.
template <int NI>
AVX512_FN inline __m512 add_bwd_rows(int nc, int A, int a, const float* Eq, const float* kp,
                                     const float* dS, int ldS, float wa, float* dq, float* dk, __m512* qs) {
  const __m512 half = _mm512_set1_ps(0.5f), w4 = _mm512_set1_ps(4.f * wa);
  __m512 e[NI], qa[NI], dw = _mm512_setzero_ps();
  for (int i = 0; i < NI; ++i) {
    e[i] = _mm512_set1_ps(Eq[(int64_t)i * A + a]);
    qa[i] = _mm512_setzero_ps();
  }
  for (int j = 0; j < nc; j += 16) {
    const __m512 k = _mm512_loadu_ps(kp + j);
    __m512 msum = _mm512_setzero_ps();
    for (int i = 0; i < NI; ++i) {
      const __m512 d = _mm512_loadu_ps(dS + (int64_t)i * ldS + j);
      __m512 r;
      const __m512 u = (NI == 4 && i == 3) ? add_bwd_u<true>(e[i], k, &r) : add_bwd_u<false>(e[i], k, &r);
      const __m512 m = _mm512_mul_ps(d, u);
      qa[i] = _mm512_add_ps(qa[i], m);
      msum = _mm512_add_ps(msum, m);
      dw = _mm512_fmadd_ps(d, _mm512_sub_ps(r, half), dw);
    }
    _mm512_storeu_ps(dk + j, _mm512_fmadd_ps(w4, msum, _mm512_loadu_ps(dk + j)));
  }
  if (qs != nullptr) {
    for (int i = 0; i < NI; ++i) qs[16 * i] = qa[i];
    return dw;
  }
  for (int i = 0; i < NI; ++i) dq[(int64_t)i * A + a] += 4.f * wa * _mm512_reduce_add_ps(qa[i]);
  return dw;
}

// r[u] = the sum of the lanes of v[u], u < 16: a transposing add tree, 45 shuffles and adds for the 16
// sums (_mm512_reduce_add_ps takes about 8 per sum).
AVX512_FN inline __m512 sum16(const __m512* v) {
  __m512 t[8], x[4];
  for (int u = 0; u < 8; ++u)  // per 128-bit lane L: [a0 + a2, b0 + b2, a1 + a3, b1 + b3] of v[2u], v[2u + 1]
    t[u] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * u], v[2 * u + 1]), _mm512_unpackhi_ps(v[2 * u], v[2 * u + 1]));
  for (int u = 0; u < 4; ++u) {  // per lane L: the lane sums of v[4u .. 4u + 3]
    const __m512d a = _mm512_castps_pd(t[2 * u]), b = _mm512_castps_pd(t[2 * u + 1]);
    x[u] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // across the four 128-bit lanes: lane m of the result gathers x[m]'s four lanes
  const __m512 y0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 y1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y0, y1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(y0, y1, _MM_SHUFFLE(3, 1, 3, 1)));
}

}  // namespace

AVX512_FN void add_scores(int nr, int nc16, int A, const float* Eq, const float* Eqw, const float* EkT,
                          int64_t ldk, const float* w, const float* iw, const float* hw2, float* S, int ldS) {
  if (Eqw && iw && hw2) return add_scores_all<2>(nr, nc16, A, Eq, Eqw, EkT, ldk, w, iw, hw2, S, ldS);
  if (Eqw && iw) return add_scores_all<1>(nr, nc16, A, Eq, Eqw, EkT, ldk, w, iw, nullptr, S, ldS);
  add_scores_all<0>(nr, nc16, A, Eq, nullptr, EkT, ldk, w, nullptr, nullptr, S, ldS);
}

AVX512_FN void add_bwd(int nr, int nc16, int A, const float* Eq, const float* EkT, int64_t ldk,
                       const float* w, const float* dS, int ldS, float* dq, float* dkT, int ldd,
                       float* dwr) {
  int a0 = 0;
  // blocks of 16 dims: each row's 16 dq sums (and the 16 dw sums) reduced together by sum16; dk is
  // updated in the same order as per dim (row blocks in order for each dim)
  for (; a0 + 16 <= A; a0 += 16) {
    __m512 dwt[16], qs[4 * 16];
    for (int u = 0; u < 16; ++u) dwt[u] = _mm512_setzero_ps();
    const __m512 w4 = _mm512_mul_ps(_mm512_set1_ps(4.f), _mm512_loadu_ps(w + a0));
    int i = 0;
    for (; i + 4 <= nr; i += 4) {
      for (int u = 0; u < 16; ++u) {
        const int a = a0 + u;
        dwt[u] = _mm512_add_ps(dwt[u], add_bwd_rows<4>(nc16, A, a, Eq + (int64_t)i * A, EkT + a * ldk,
                                                       dS + (int64_t)i * ldS, ldS, w[a], nullptr,
                                                       dkT + (int64_t)a * ldd, qs + u));
      }
      for (int r = 0; r < 4; ++r) {
        float* d = dq + (int64_t)(i + r) * A + a0;
        _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), _mm512_mul_ps(w4, sum16(qs + 16 * r))));
      }
    }
    for (; i < nr; ++i)
      for (int u = 0; u < 16; ++u) {
        const int a = a0 + u;
        dwt[u] = _mm512_add_ps(dwt[u], add_bwd_rows<1>(nc16, A, a, Eq + (int64_t)i * A, EkT + a * ldk,
                                                       dS + (int64_t)i * ldS, ldS, w[a], dq + (int64_t)i * A,
                                                       dkT + (int64_t)a * ldd, nullptr));
      }
    _mm512_storeu_ps(dwr + a0, _mm512_add_ps(_mm512_loadu_ps(dwr + a0), sum16(dwt)));
  }
  for (int a = a0; a < A; ++a) {  // the last A % 16 dims one at a time
    const float* kp = EkT + a * ldk;
    float* dk = dkT + (int64_t)a * ldd;
    __m512 dwt = _mm512_setzero_ps();
    int i = 0;
    for (; i + 4 <= nr; i += 4)
      dwt = _mm512_add_ps(dwt, add_bwd_rows<4>(nc16, A, a, Eq + (int64_t)i * A, kp, dS + (int64_t)i * ldS,
                                               ldS, w[a], dq + (int64_t)i * A, dk, nullptr));
    for (; i < nr; ++i)
      dwt = _mm512_add_ps(dwt, add_bwd_rows<1>(nc16, A, a, Eq + (int64_t)i * A, kp, dS + (int64_t)i * ldS,
                                               ldS, w[a], dq + (int64_t)i * A, dk, nullptr));
    dwr[a] += _mm512_reduce_add_ps(dwt);
  }
}

AVX512_FN float row_max(const float* x, int n) {  // NaN if any x is NaN
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  __m512 m = ninf;
  __mmask16 nan = 0;
  for (int j = 0; j < n; j += 16) {
    const __mmask16 live = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
    const __m512 v = _mm512_mask_loadu_ps(ninf, live, x + j);
    m = _mm512_max_ps(m, v);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  return nan ? NAN : _mm512_reduce_max_ps(m);
}

// exp(x) for a softmax's x = s - m <= 0 (or NaN): no upper clamp, no mask for the -inf of masked
// scores (max(x, -110) sends them to scalef's exact 0), and a degree-6 polynomial for e^r on
// [-ln2/2, ln2/2] (relative error 2e-9, fitted for this range) in Horner form: 5 instructions fewer
// than exp16, whose cost is its FMAs (Zen 4: ~1 per cycle). x in (-104, -87.3) gives the subnormal
// result exp16 flushes to 0. Every 7th float32 in [-87.3, 0] against double exp: at most 1.01 ulp
// (exp16: 1.26); a row of 257 scaled scores: 3.9 ns per 16 against 4.8 (Zen 4, one thread).
AVX512_FN inline __m512 exp16_softmax(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-110.f), x);  // NaN stays NaN (max returns its second operand)
  __m512 fx;
  const __m512 r = ln2_reduce(x, &fx);
  static constexpr float kE[] = {1.3843623456e-03f, 8.3741797134e-03f, 4.1668005288e-02f, 1.6666431725e-01f,
                                 4.9999994040e-01f, 1.f, 1.f};
  return _mm512_scalef_ps(horner(r, kE, 7), fx);
}

AVX512_FN float exp_sub_sum(float* x, int n, float m) {
  const __m512 mv = _mm512_set1_ps(m), ninf = _mm512_set1_ps(-INFINITY);
  __m512 acc = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {  // the tail through a masked vector: every element, one formula
    const __mmask16 live = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
    const __m512 e = exp16_softmax(_mm512_sub_ps(_mm512_mask_loadu_ps(ninf, live, x + j), mv));
    _mm512_mask_storeu_ps(x + j, live, e);
    acc = _mm512_add_ps(acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

AVX512_FN float exp_scale_sub_sum(float* x, int n, float s, float m) {
  const __m512 sv = _mm512_set1_ps(s), mv = _mm512_set1_ps(m), ninf = _mm512_set1_ps(-INFINITY);
  __m512 acc = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {
    const __mmask16 live = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
    // s * x rounded first (the explicit-rounding form keeps the compiler from fusing it into the
    // subtraction), as the backward's scaled scores are: bitwise the scale() + exp_sub_sum result
    // (a fused s * x - m would leave the product's rounding in, ~4 at |s x| ~ 1e8)
    const __m512 sx = _mm512_mul_round_ps(_mm512_mask_loadu_ps(ninf, live, x + j), sv,
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 e = exp16_softmax(_mm512_sub_ps(sx, mv));
    _mm512_mask_storeu_ps(x + j, live, e);
    acc = _mm512_add_ps(acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

namespace {
// lanes of the vector at x + j that lie in [lo, hi)
inline __mmask16 lanes_in(int j, int lo, int hi) {
  const unsigned a = lo <= j ? 0xFFFFu : lo >= j + 16 ? 0u : 0xFFFFu << (lo - j);
  const unsigned b = hi >= j + 16 ? 0xFFFFu : hi <= j ? 0u : 0xFFFFu >> (j + 16 - hi);
  return (__mmask16)(a & b);
}
}  // namespace

AVX512_FN float row_max_in(const float* x, int lo, int hi) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  __m512 m = ninf;
  __mmask16 nan = 0;
  for (int j = lo / 16 * 16; j < hi; j += 16) {
    const __m512 v = _mm512_mask_loadu_ps(ninf, lanes_in(j, lo, hi), x + j);
    m = _mm512_max_ps(m, v);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  return nan ? NAN : _mm512_reduce_max_ps(m);
}

AVX512_FN float exp_sub_sum_in(float* x, int n, int lo, int hi, float s, float m) {
  const __m512 sv = _mm512_set1_ps(s), mv = _mm512_set1_ps(m), ninf = _mm512_set1_ps(-INFINITY);
  __m512 acc = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {
    const __mmask16 live = lanes_in(j, 0, n), in = lanes_in(j, lo, hi) & live;
    if (in == 0) {
      _mm512_mask_storeu_ps(x + j, live, _mm512_setzero_ps());
      continue;
    }
    __m512 v = _mm512_mask_loadu_ps(ninf, in, x + j);
    if (s != 1.f)  // s * x rounded first, as in exp_scale_sub_sum
      v = _mm512_mul_round_ps(v, sv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 e = _mm512_maskz_mov_ps(in, exp16_softmax(_mm512_sub_ps(v, mv)));
    _mm512_mask_storeu_ps(x + j, live, e);
    acc = _mm512_add_ps(acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

AVX512_FN bool exp2x_row(const float* x, float* y, int n, float lim, const float* w, float* yw, float* mx) {
  const __m512 two = _mm512_set1_ps(2.f), lv = _mm512_set1_ps(lim);
  __m512 m = _mm512_set1_ps(*mx);
  __mmask16 bad = 0;
  for (int j = 0; j < n; j += 16) {
    const __mmask16 live = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(live, x + j);
    bad |= _mm512_mask_cmp_ps_mask(live, _mm512_abs_ps(v), lv, _CMP_NLE_UQ);  // NaN: true
    const __m512 e = exp16(_mm512_mul_ps(two, v));
    if (y != nullptr) _mm512_mask_storeu_ps(y + j, live, e);
    if (yw != nullptr)
      _mm512_mask_storeu_ps(yw + j, live, _mm512_maskz_div_ps(live, e, _mm512_maskz_loadu_ps(live, w + j)));
    m = _mm512_mask_max_ps(m, live, m, e);
  }
  if (bad != 0) {  // rare: the row takes e^0 (the score loops then use a direct tanh for it)
    m = _mm512_max_ps(_mm512_set1_ps(*mx), _mm512_set1_ps(1.f));
    for (int u = 0; u < n; ++u) {
      if (y != nullptr) y[u] = 1.f;
      if (yw != nullptr) yw[u] = 1.f / w[u];
    }
  }
  *mx = _mm512_reduce_max_ps(m);
  return bad != 0;
}

namespace {
inline __mmask16 first(int m) { return m >= 16 ? (__mmask16)0xFFFF : m <= 0 ? 0 : (__mmask16)((1u << m) - 1); }

// bfloat16 bits of each lane (round to nearest even; NaN -> quiet NaN) in the low half of its dword.
AVX512_FN inline __m512i bf16_bits(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                           _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1)))),
      16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}
}  // namespace

AVX512_FN void to_bf16(const float* x, uint16_t* y, int n, int n_pad) {
  for (int j = 0; j < n_pad; j += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(first(n - j), x + j);  // 0 past n
    _mm256_mask_storeu_epi16(y + j, first(n_pad - j), _mm512_cvtepi32_epi16(bf16_bits(v)));
  }
}

AVX512_FN void vnni_rows(const float* x, int ldx, int nr, int n, float s, uint16_t* y, int ldy) {
  const __m512 sv = _mm512_set1_ps(s);
  for (int i = 0; i < nr; i += 2) {
    const float* x0 = x + (int64_t)i * ldx;
    const float* x1 = i + 1 < nr ? x0 + ldx : nullptr;  // the pad row of an odd nr is zero
    uint16_t* yr = y + (int64_t)(i / 2) * 2 * ldy;
    for (int j = 0; j < n; j += 16) {
      const __mmask16 live = first(n - j);
      const __m512i a = bf16_bits(_mm512_mul_ps(sv, _mm512_maskz_loadu_ps(live, x0 + j)));
      const __m512i b = x1 != nullptr ? bf16_bits(_mm512_mul_ps(sv, _mm512_maskz_loadu_ps(live, x1 + j)))
                                      : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(yr + 2 * j, live, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
  }
}

AVX512_FN void transpose32(const void* src, int64_t lds, int rows, int cols, void* dst, int64_t ldd) {
  const float* x = static_cast<const float*>(src);  // 32-bit elements moved as float bits
  float* y = static_cast<float*>(dst);
  for (int r0 = 0; r0 < rows; r0 += 16) {
    for (int c0 = 0; c0 < cols; c0 += 16) {
      const __mmask16 cm = first(cols - c0);
      __m512 r[16], u[16];
      for (int i = 0; i < 16; ++i)
        r[i] = r0 + i < rows ? _mm512_maskz_loadu_ps(cm, x + (int64_t)(r0 + i) * lds + c0) : _mm512_setzero_ps();
      for (int g = 0; g < 4; ++g) {  // u[4g + m], lane L: column 4L + m of rows 4g..4g+3
        const __m512 lo01 = _mm512_unpacklo_ps(r[4 * g], r[4 * g + 1]), hi01 = _mm512_unpackhi_ps(r[4 * g], r[4 * g + 1]);
        const __m512 lo23 = _mm512_unpacklo_ps(r[4 * g + 2], r[4 * g + 3]),
                     hi23 = _mm512_unpackhi_ps(r[4 * g + 2], r[4 * g + 3]);
        u[4 * g] = _mm512_shuffle_ps(lo01, lo23, 0x44);
        u[4 * g + 1] = _mm512_shuffle_ps(lo01, lo23, 0xEE);
        u[4 * g + 2] = _mm512_shuffle_ps(hi01, hi23, 0x44);
        u[4 * g + 3] = _mm512_shuffle_ps(hi01, hi23, 0xEE);
      }
      for (int m = 0; m < 4; ++m) {  // output rows m, m + 4, m + 8, m + 12 (lanes 0..3)
        const __m512 x0 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x88), x1 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xDD);
        const __m512 y0 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x88),
                     y1 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xDD);
        const __m512 o[4] = {_mm512_shuffle_f32x4(x0, y0, 0x88), _mm512_shuffle_f32x4(x1, y1, 0x88),
                             _mm512_shuffle_f32x4(x0, y0, 0xDD), _mm512_shuffle_f32x4(x1, y1, 0xDD)};
        for (int L = 0; L < 4; ++L) {
          const int c = c0 + 4 * L + m;
          if (c < cols) _mm512_storeu_ps(y + (int64_t)c * ldd + r0, o[L]);
        }
      }
    }
  }
}

AVX512_FN int ds_row(const float* p, float* dp, int n, float delta, float s) {
  const __m512 dv = _mm512_set1_ps(delta), half = _mm512_set1_ps(0.5f), sv = _mm512_set1_ps(s);
  int dom = -1;
  for (int j = 0; j < n; j += 16) {
    const __mmask16 live = first(n - j);
    const __m512 pv = _mm512_maskz_loadu_ps(live, p + j);
    __m512 d = _mm512_mul_ps(pv, _mm512_sub_ps(_mm512_maskz_loadu_ps(live, dp + j), dv));
    if (s != 1.f) d = _mm512_mul_ps(d, sv);  // rounded after the product, as a separate scale() pass
    _mm512_mask_storeu_ps(dp + j, live, d);
    const unsigned big = _mm512_cmp_ps_mask(pv, half, _CMP_GT_OQ);
    if (big != 0 && dom < 0) dom = j + __builtin_ctz(big);
  }
  return dom;
}

AVX512_FN void scale_to(const float* x, float* y, int n, float s, bool nt) {
  const __m512 sv = _mm512_set1_ps(s);
  if (nt && n % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 64 == 0) {
    for (int j = 0; j < n; j += 16) _mm512_stream_ps(y + j, _mm512_mul_ps(sv, _mm512_loadu_ps(x + j)));
    return;
  }
  for (int j = 0; j < n; j += 16) {
    const __mmask16 live = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
    _mm512_mask_storeu_ps(y + j, live, _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(live, x + j)));
  }
}

AVX512_FN void scale(float* x, int n, float s) {
  const __m512 sv = _mm512_set1_ps(s);
  for (int j = 0; j < n; j += 16) {
    const __mmask16 live = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
    _mm512_mask_storeu_ps(x + j, live, _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(live, x + j)));
  }
}

}  // namespace avx512
}  // namespace fusedattn_cpu
