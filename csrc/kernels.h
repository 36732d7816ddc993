// Inner loops of the CPU kernels, one implementation per instruction-set level:
//   scalar  portable C++ (kernels.cpp)
//   avx2    AVX2 + FMA, 8 float lanes (kernels_avx2.cpp)
//   avx512  AVX-512 F/BW/VL/DQ, 16 float lanes (kernels_avx512.cpp)
// The vector versions carry per-function target attributes, so one binary holds every level and
// runs on any x86-64 CPU; isa.cpp picks the level once per process (CPUID + the OS's XSAVE state,
// FUSEDATTN_CPU_ISA may force a lower one). The dispatchers below take the level as an argument;
// an op reads it once per call, so one call never mixes levels.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace fusedattn_cpu {

enum class Level : int { scalar = 0, avx2 = 1, avx512 = 2 };

struct Isa {
  Level level;
};

// ------------------------------------------------------------------ isa.cpp
// The highest level this CPU and OS support.
Level best_level();
// The level in use: FUSEDATTN_CPU_ISA (read once) or best_level(); raises ValueError (c10::ValueError)
// when the variable holds an unknown value or a level the CPU lacks.
Isa current_isa();
// Sets the level for the rest of the process (tests); ValueError as above.
void set_level(const std::string& name);
const char* level_name(Level l);
// Names of the levels this machine can run, lowest first.
std::vector<std::string> supported_levels();

// ------------------------------------------------------------------ inner loops
// Additive score tile, vectorized over keys:
//   S[i*ldS + j] = -2 * sum_a (w[a] / (1 + Eq[i*A + a] * EkT[a*ldk + j]) - w[a] / 2)
//   (= sum_a w[a] tanh(x + y) when Eq = e^{2x}, EkT = e^{2y})
// for i < nr and j < nc16 (a multiple of 16; EkT must be readable and S writable there).
// Eqw = Eq / w (row by row, correctly rounded) and iw = 1 / w: the weight-scaled factors the avx2
// and avx512 loops read instead of Eq (kernels_avx2.cpp says why), given (both non-null) only when
// every weight of the head passes weight_scaled_dim; with null ones those loops read Eq and w. The
// scalar level always reads Eq and w. hw2 (A / 2 entries, (w[2m] + w[2m+1]) / 2), given only with Eqw
// and iw, selects the paired form (kernels_avx512.cpp): the caller then guarantees
// |Eqw[i*A + a] * EkT[a*ldk + j] + iw[a]| < 2^62 over the tile (AddScores::pair_safe), so that the
// products of two such values are finite and normal.
void add_scores(Isa isa, int nr, int nc16, int A, const float* Eq, const float* Eqw, const float* EkT,
                int64_t ldk, const float* w, const float* iw, const float* hw2, float* S, int ldS);
// Whether a dimension with reciprocal weight iw = 1 / w takes the weight-scaled form:
// 2^-12 <= |w| <= 2^12 (false for w = 0 and NaN). Plain scalar code, safe to share across levels.
inline bool weight_scaled_dim(float iw) {
  const float m = std::fabs(iw);
  return m >= 0x1p-12f && m <= 0x1p12f;
}

// Whether a dimension with weight w admits the paired form (kernels_avx512.cpp): w finite with
// 2^-126 <= |w| <= 2^12 (a wider range than weight_scaled_dim: the paired form's caller bounds |d| on
// each tile, which weight_scaled_dim's range does for the unpaired loop; above 2^12, Eq / w could lose
// its normal range). False for w = 0, subnormal w and NaN.
inline bool pairable_dim(float w) {
  const float m = std::fabs(w);
  return m >= 0x1p-126f && m <= 0x1p12f;
}

// Additive backward tile (r = 1 / (1 + Eq*EkT), 1 - t^2 = 4 r (1 - r), t = 1 - 2r):
//   dq[i*A + a]   += 4 w[a] sum_j dS_ij r (1 - r)
//   dkT[a*ldd + j] += 4 w[a] sum_i dS_ij r (1 - r)
//   dwr[a]        += sum_ij dS_ij (r - 1/2)      (so dw = -2 dwr)
// for i < nr, j < nc16 (multiple of 16; dS must be 0 where a pair does not count).
void add_bwd(Isa isa, int nr, int nc16, int A, const float* Eq, const float* EkT, int64_t ldk,
             const float* w, const float* dS, int ldS, float* dq, float* dkT, int ldd, float* dwr);

// One row of the additive factor tables, in one pass over x (n values): e[j] = exp(2 x[j]), stored in y
// and, when yw is non-null, yw[j] = e[j] / w[j] (correctly rounded); y may be null (yw only). A row with
// some |x[j]| > lim (lim <= 40) or a NaN is flagged: then e[j] = 1 (yw[j] = 1 / w[j]). Returns whether
// the row is flagged; *mx becomes max(*mx, max_j e[j]).
bool exp2x_row(Isa isa, const float* x, float* y, int n, float lim, const float* w, float* yw, float* mx);

// Row helpers of the online softmax.
float row_max(Isa isa, const float* x, int n);
// x[j] = exp(x[j] - m) (0 where x[j] - m < -87, so -inf gives 0); returns the sum.
float exp_sub_sum(Isa isa, float* x, int n, float m);

// Per-level implementations (same contracts as above).
namespace avx2 {
void add_scores(int nr, int nc16, int A, const float* Eq, const float* Eqw, const float* EkT, int64_t ldk,
                const float* w, const float* iw, const float* hw2, float* S, int ldS);
void add_bwd(int nr, int nc16, int A, const float* Eq, const float* EkT, int64_t ldk, const float* w,
             const float* dS, int ldS, float* dq, float* dkT, int ldd, float* dwr);
bool exp2x_row(const float* x, float* y, int n, float lim, const float* w, float* yw, float* mx);
float row_max(const float* x, int n);
float exp_sub_sum(float* x, int n, float m);
}  // namespace avx2
namespace avx512 {
void add_scores(int nr, int nc16, int A, const float* Eq, const float* Eqw, const float* EkT, int64_t ldk,
                const float* w, const float* iw, const float* hw2, float* S, int ldS);
void add_bwd(int nr, int nc16, int A, const float* Eq, const float* EkT, int64_t ldk, const float* w,
             const float* dS, int ldS, float* dq, float* dkT, int ldd, float* dwr);
bool exp2x_row(const float* x, float* y, int n, float lim, const float* w, float* yw, float* mx);
float row_max(const float* x, int n);
float exp_sub_sum(float* x, int n, float m);
// x[j] = exp(s * x[j] - m) (s * x[j] rounded, as scale() would), returns their sum; s > 0. The
// forward's softmax on raw brgemm products (DotScores::fold), which then need no scaling pass.
float exp_scale_sub_sum(float* x, int n, float s, float m);
// The forward's softmax over a row of n columns whose allowed keys are [lo, hi), in vectors aligned
// to x: row_max_in returns their maximum (NaN if one is NaN); exp_sub_sum_in writes exp(s * x[j] - m)
// there (s * x[j] rounded; s = 1: x[j] - m) and 0 in the other columns (no separate zeroing), and
// returns the sum.
float row_max_in(const float* x, int lo, int hi);
float exp_sub_sum_in(float* x, int n, int lo, int hi, float s, float m);
// Only at this level (the brgemm operands, gemm.h): y[j] = bfloat16(x[j]) rounded to nearest even (NaN
// stays NaN) for j < n, and 0 for n <= j < n_pad; x[j] *= s for j < n.
void to_bf16(const float* x, uint16_t* y, int n, int n_pad);
// y[(i / 2) * 2 * ldy + 2 j + i % 2] = bfloat16(s * x[i * ldx + j]) for i < round_up(nr, 2), j < n (rows
// past nr zero): rows i of x as the VNNI pairs of a brgemm B operand (gemm.h).
void vnni_rows(const float* x, int ldx, int nr, int n, float s, uint16_t* y, int ldy);
void scale(float* x, int n, float s);
// y[j] = s * x[j] for j < n; with non-temporal stores when nt and y is 64-byte aligned with n % 16 == 0
// (a result that is not read again soon: no read-for-ownership of y's lines; the caller fences).
void scale_to(const float* x, float* y, int n, float s, bool nt);
// dst[c * ldd + r] = src[r * lds + c] for 32-bit elements, r < rows, c < cols; dst rows are written in
// whole 16-element blocks (zeros past rows: ldd must leave room for round_up(rows, 16)).
void transpose32(const void* src, int64_t lds, int rows, int cols, void* dst, int64_t ldd);
// dp[j] = p[j] * (dp[j] - delta) (times s, rounded again, when s != 1) for j < n; returns the first j
// with p[j] > 1/2, or -1.
int ds_row(const float* p, float* dp, int n, float delta, float s);
}  // namespace avx512

}  // namespace fusedattn_cpu
