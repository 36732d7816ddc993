// Inner loops of the CPU kernels: an AVX2+FMA version (compiled with a target attribute, used only
// when the CPU reports avx2 and fma at run time) and a portable scalar version of each.
#pragma once

#include <cstdint>

namespace fusedattn_cpu {

// Which implementation the drivers call; chosen once per op call.
struct Isa {
  bool avx2;
};

// Additive score tile, vectorized over keys:
//   S[i*ldS + j] = -2 * sum_a (w[a] / (1 + Eq[i*A + a] * EkT[a*ldk + j]) - w[a] / 2)
//   (= sum_a w[a] tanh(x + y) when Eq = e^{2x}, EkT = e^{2y})
// for i < nr and j < nc8 (a multiple of 8; EkT must be readable there).
void add_scores(Isa isa, int nr, int nc8, int A, const float* Eq, const float* EkT, int64_t ldk,
                const float* w, float* S, int ldS);

// Additive backward tile (r = 1 / (1 + Eq*EkT), 1 - t^2 = 4 r (1 - r), t = 1 - 2r):
//   dq[i*A + a]   += 4 w[a] sum_j dS_ij r (1 - r)
//   dkT[a*ldd + j] += 4 w[a] sum_i dS_ij r (1 - r)
//   dwr[a]        += sum_ij dS_ij (r - 1/2)      (so dw = -2 dwr)
// for i < nr, j < nc8 (multiple of 8; dS must be 0 where a pair does not count).
void add_bwd(Isa isa, int nr, int nc8, int A, const float* Eq, const float* EkT, int64_t ldk,
             const float* w, const float* dS, int ldS, float* dq, float* dkT, int ldd, float* dwr);

// y[j] = exp(2 x[j]) for |x[j]| <= 40.
void exp2x(Isa isa, const float* x, float* y, int n);

// Row helpers of the online softmax.
float row_max(Isa isa, const float* x, int n);
// x[j] = exp(x[j] - m) (0 where x[j] - m < -87, so -inf gives 0); returns the sum.
float exp_sub_sum(Isa isa, float* x, int n, float m);

}  // namespace fusedattn_cpu
