// Scalar inner loops (portable C++) and the dispatchers that pick the implementation of the
// level an op call runs at (kernels.h; the vector levels live in kernels_avx2.cpp and
// kernels_avx512.cpp).
#include "kernels.h"

#include <cmath>

namespace fusedattn_cpu {
namespace {

// ----------------------------------------------------------------------------- scalar

void add_scores_scalar(int nr, int nc16, int A, const float* Eq, const float* EkT, int64_t ldk,
                       const float* w, float* S, int ldS) {
  for (int i = 0; i < nr; ++i) {
    float* s = S + (int64_t)i * ldS;
    for (int j = 0; j < nc16; ++j) s[j] = 0.f;
    for (int a = 0; a < A; ++a) {
      const float e = Eq[(int64_t)i * A + a], wa = w[a], hw = 0.5f * w[a];
      const float* k = EkT + a * ldk;
      for (int j = 0; j < nc16; ++j) s[j] += wa / (1.f + e * k[j]) - hw;
    }
    for (int j = 0; j < nc16; ++j) s[j] = -2.f * s[j];
  }
}

void add_bwd_scalar(int nr, int nc16, int A, const float* Eq, const float* EkT, int64_t ldk,
                    const float* w, const float* dS, int ldS, float* dq, float* dkT, int ldd,
                    float* dwr) {
  for (int a = 0; a < A; ++a) {
    const float w4 = 4.f * w[a];
    const float* k = EkT + a * ldk;
    float* dk = dkT + (int64_t)a * ldd;
    float dw = 0.f;
    for (int i = 0; i < nr; ++i) {
      const float e = Eq[(int64_t)i * A + a];
      const float* ds = dS + (int64_t)i * ldS;
      float acc = 0.f;
      for (int j = 0; j < nc16; ++j) {
        const float r = 1.f / (1.f + e * k[j]);
        const float m = ds[j] * (r - r * r);
        acc += m;
        dk[j] += w4 * m;
        dw += ds[j] * (r - 0.5f);
      }
      dq[(int64_t)i * A + a] += w4 * acc;
    }
    dwr[a] += dw;
  }
}

float row_max_scalar(const float* x, int n) {  // NaN if any x is NaN
  float m = -INFINITY;
  for (int j = 0; j < n; ++j) m = (x[j] > m || x[j] != x[j]) ? x[j] : m;
  for (int j = 0; j < n; ++j)
    if (x[j] != x[j]) return x[j];
  return m;
}

float exp_sub_sum_scalar(float* x, int n, float m) {
  float s = 0.f;
  for (int j = 0; j < n; ++j) {
    const float d = x[j] - m;
    const float e = d < -87.f ? 0.f : std::exp(d);
    x[j] = e;
    s += e;
  }
  return s;
}

bool exp2x_row_scalar(const float* x, float* y, int n, float lim, const float* w, float* yw, float* mx) {
  bool bad = false;
  for (int j = 0; j < n; ++j) bad |= !(std::fabs(x[j]) <= lim);
  float m = *mx;
  for (int j = 0; j < n; ++j) {
    const float e = bad ? 1.f : std::exp(2.f * x[j]);
    if (y != nullptr) y[j] = e;
    if (yw != nullptr) yw[j] = e / w[j];
    m = e > m ? e : m;
  }
  *mx = m;
  return bad;
}

}  // namespace

#define DISPATCH(call_scalar, fn, ...)                              \
  switch (isa.level) {                                              \
    case Level::avx512: return avx512::fn(__VA_ARGS__);             \
    case Level::avx2: return avx2::fn(__VA_ARGS__);                 \
    default: return call_scalar;                                    \
  }

bool exp2x_row(Isa isa, const float* x, float* y, int n, float lim, const float* w, float* yw, float* mx) {
  DISPATCH(exp2x_row_scalar(x, y, n, lim, w, yw, mx), exp2x_row, x, y, n, lim, w, yw, mx)
}

void add_scores(Isa isa, int nr, int nc16, int A, const float* Eq, const float* Eqw, const float* EkT,
                int64_t ldk, const float* w, const float* iw, const float* hw2, float* S, int ldS) {
  DISPATCH(add_scores_scalar(nr, nc16, A, Eq, EkT, ldk, w, S, ldS), add_scores, nr, nc16, A, Eq, Eqw, EkT,
           ldk, w, iw, hw2, S, ldS)
}

void add_bwd(Isa isa, int nr, int nc16, int A, const float* Eq, const float* EkT, int64_t ldk,
             const float* w, const float* dS, int ldS, float* dq, float* dkT, int ldd, float* dwr) {
  DISPATCH(add_bwd_scalar(nr, nc16, A, Eq, EkT, ldk, w, dS, ldS, dq, dkT, ldd, dwr), add_bwd, nr, nc16, A,
           Eq, EkT, ldk, w, dS, ldS, dq, dkT, ldd, dwr)
}

float row_max(Isa isa, const float* x, int n) { DISPATCH(row_max_scalar(x, n), row_max, x, n) }

float exp_sub_sum(Isa isa, float* x, int n, float m) {
  DISPATCH(exp_sub_sum_scalar(x, n, m), exp_sub_sum, x, n, m)
}

}  // namespace fusedattn_cpu
