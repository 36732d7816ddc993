// Shared pieces of the CPU drivers (fusedattn_cpu.cpp) and their set-up (prep.cpp): scratch
// buffers, the work-item loop, the score providers (dot: gemm; additive: the e^{2x} factor loops)
// and the per-call preparation.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "checks.h"
#include "gemm.h"
#include "kernels.h"

namespace fusedattn_cpu {

using at::Tensor;

constexpr float kNegInf = -INFINITY;
// Rows with some |x| beyond this use tanh directly. Within it e^{2x} e^{2y} <= e^{80} ~ 5.5e34 stays
// finite, so 1 + e^{2x} e^{2y} is finite and its reciprocal normal: the Newton step of the vector
// reciprocals (d * rcp(d) with d = inf would be inf * 0 = NaN) and the division agree everywhere.
constexpr float kExpLimit = 20.f;

// 64-byte aligned float scratch.
struct Buf {
  float* p = nullptr;
  explicit Buf(int64_t n) {
    size_t bytes = ((size_t)std::max<int64_t>(n, 1) * sizeof(float) + 63) / 64 * 64;
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(p != nullptr, "fusedattn_cpu: out of memory for scratch");
  }
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  float* data() { return p; }
};

// Runs body(pull) on up to get_num_threads() threads; pull() hands out item indices 0..n-1
// (-1 when done). Items own disjoint outputs, so which thread runs an item does not matter.
template <class Body>
void parallel_items(int64_t n, const Body& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  auto pull = [&]() -> int64_t {
    const int64_t i = next.fetch_add(1);
    return i < n ? i : -1;
  };
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) { body(pull); });
}

// ----------------------------------------------------------------------------- score providers

// s_ij = scale * q_i . k_j through sgemm, or through gemm16 on the 16-bit inputs (q16, k16 set).
// y (nc x n, rows of n) = the first nc columns of x (n x ldx): the brgemm path's transposed dK / dV
// accumulators to rows. AVX-512 16 x 16 transposes when n is a multiple of 16 (transpose32 writes
// whole 16-row blocks), a scalar loop otherwise (the brgemm path runs at the avx512 level only).
inline void columns_to_rows(const float* x, int ldx, int n, int nc, float* y) {
  if (n % 16 == 0) {
    avx512::transpose32(x, ldx, n, nc, y, n);
    return;
  }
  for (int j = 0; j < nc; ++j)
    for (int d = 0; d < n; ++d) y[(int64_t)j * n + d] = x[(int64_t)d * ldx + j];
}

struct DotScores {
  const float* q;  // (B, H, Lq, D) float32 (the backward's dk product; may be null in the forward)
  const float* k;  // (B, Hk, Lk, D)
  float scale;
  const Problem* p;
  const uint16_t* q16 = nullptr;  // the same in bfloat16/float16 when the scores use gemm16
  const uint16_t* k16 = nullptr;
  at::ScalarType t16 = at::kFloat;
  // brgemm operands (gemm.h), set when the call takes that path (prep.cpp: dot_brgemm): K^T in float32
  // (B, Hk, D, LkP); or, for bfloat16 inputs, q with rows of D2 = round_up(D, 2) and K^T in VNNI pairs
  // (B, Hk, D2 / 2, LkP, 2). LkP: spread_ld(Lk) (checks.h), the padding zero.
  const float* kT = nullptr;
  const uint16_t* qb = nullptr;
  const uint16_t* kTv = nullptr;
  int64_t LkP = 0;
  int D2 = 0;
  // Banded forward calls (a left window edge: each query tile reads a short key range) build no K^T:
  // each work item transposes only its keys into a thread-local panel (item_view), from the rows of K
  // (float32 k, or kb: bfloat16 rows of even D). pan: the panel (D or D / 2 rows of pan_ld 32-bit
  // elements) for keys from pan_j0 of one kv head.
  bool panels = false;
  const uint16_t* kb = nullptr;
  const float* pan = nullptr;
  int64_t pan_j0 = 0;
  int pan_ld = 0;
  bool uses_brgemm() const { return kT != nullptr || kTv != nullptr || panels; }
  // raw: tile() leaves the brgemm products unscaled and the forward's softmax applies the scale
  // (exp_scale_sub_sum); set by the forward when the scale is > 0 and no modifier reads the scores.
  bool raw = false;
  float fold() const { return raw ? scale : 1.f; }
  // mods_in: tile() leaves the brgemm products unscaled and apply_mods scales them (folded into the
  // first modifier's arithmetic: mods_scale); set with modifiers on the brgemm path, forward and backward.
  bool mods_in = false;
  float mods_scale() const { return mods_in ? scale : 1.f; }
  // This provider for one work item reading keys [klo, khi) of head h (a copy with its panel filled), or
  // itself when the call has no panels.
  DotScores item_view(int64_t b, int64_t h, int64_t klo, int64_t khi, std::vector<float>& buf) const {
    if (!panels) return *this;
    DotScores r = *this;
    const int n = (int)std::max<int64_t>(khi - klo, 0), ld = (int)spread_ld(n);
    const int64_t row = (b * p->Hk + h / p->G) * p->Lk + klo;
    const int cols = kb != nullptr ? (int)p->D / 2 : (int)p->D;  // bfloat16 pairs move as 32-bit words
    buf.resize((size_t)cols * ld);
    if (kb != nullptr)
      avx512::transpose32(kb + row * p->D, cols, n, cols, buf.data(), ld);
    else
      avx512::transpose32(k + row * p->D, cols, n, cols, buf.data(), ld);
    r.pan = buf.data();
    r.pan_j0 = klo;
    r.pan_ld = ld;
    return r;
  }
  // query and key tile; br(): the rows of a sub-tile when a tile straddles a window edge (see the drivers)
  // KA: forward key blocks start on a multiple of KA (2 would do for V's bfloat16 VNNI pairs; 16 keeps
  // the micro-kernels' B rows aligned: 1.5 % faster at window (256, 0) than 2, Zen 4)
  static constexpr int BQ = 128, BK = 256, KA = 16;
  // SUB: the forward takes sub-tiles when they compute 1/SUB fewer score entries (each brgemm call has a
  // fixed cost, so only a clear saving pays)
  static constexpr int SUB = 8;
  // BR: brgemm packs nothing per call, so 16-row sub-tiles pay (window (256, 0): 28.8 ms against 30.8
  // with 32); MKL's sgemm packs both operands per call, where 32 rows were faster than 16 and 64
  int br() const { return uses_brgemm() ? 16 : 32; }
  int64_t qoff(int64_t b, int64_t h, int64_t i) const { return ((b * p->H + h) * p->Lq + i) * p->D; }
  int64_t koff(int64_t b, int64_t hk, int64_t j) const { return ((b * p->Hk + hk) * p->Lk + j) * p->D; }
  const float* qrow(int64_t b, int64_t h, int64_t i) const { return q + qoff(b, h, i); }
  const float* krow(int64_t b, int64_t hk, int64_t j) const { return k + koff(b, hk, j); }
  void tile(Isa, int64_t b, int64_t h, int64_t i0, int nr, int64_t j0, int nc, float* S, int ldS) const {
    const int D = (int)p->D;
    if (uses_brgemm()) {  // the raw products, then the scale (as sgemm's alpha does)
      const int64_t bhk = b * p->Hk + h / p->G;
      if (pan != nullptr && kb != nullptr)
        brgemm_bf16(nr, nc, D2, qb + ((b * p->H + h) * p->Lq + i0) * D2, D2,
                    reinterpret_cast<const uint16_t*>(pan) + 2 * (j0 - pan_j0), pan_ld, false, S, ldS);
      else if (pan != nullptr)
        brgemm_f32(nr, nc, D, qrow(b, h, i0), D, pan + (j0 - pan_j0), pan_ld, false, S, ldS);
      else if (kT != nullptr)
        brgemm_f32(nr, nc, D, qrow(b, h, i0), D, kT + bhk * D * LkP + j0, (int)LkP, false, S, ldS);
      else
        brgemm_bf16(nr, nc, D2, qb + ((b * p->H + h) * p->Lq + i0) * D2, D2, kTv + bhk * D2 * LkP + 2 * j0,
                    (int)LkP, false, S, ldS);
      if (!raw && !mods_in)
        for (int i = 0; i < nr; ++i) avx512::scale(S + (int64_t)i * ldS, nc, scale);
      return;
    }
    if (q16 != nullptr)
      gemm16(t16, false, true, nr, nc, D, scale, q16 + qoff(b, h, i0), D, k16 + koff(b, h / p->G, j0), D, 0.f,
             S, ldS);
    else
      gemm(false, true, nr, nc, D, scale, qrow(b, h, i0), D, krow(b, h / p->G, j0), D, 0.f, S, ldS);
  }
};

// V as the forward's P.V operand: float32 rows (v) through sgemm, or through brgemm (brg); or bfloat16
// VNNI pairs (vv: (B, Hk, LkP / 2, Dv, 2), rows past key_lengths zero) with P rounded to bfloat16, as
// FlashAttention does on GPUs (the sums stay float32).
struct VMats {
  const float* v = nullptr;
  bool brg = false;
  const uint16_t* vv = nullptr;
  int64_t LkP = 0;
};

// brgemm operands of a dot-product call (prep.cpp), or none when the call uses sgemm / gemm16.
struct DotMats {
  Tensor qf, kf, vf, kT, qb, kTv, vv, kb;
};
// Whether a call in dtype t at this level takes the brgemm path (gemm.h: brgemm_works).
bool use_brgemm(Isa isa, at::ScalarType t);
// Fills m and points sc (and vm, when not null: the forward) at its tensors; q, k, v as given to the op.
// panels: per-item K^T panels instead of a K^T copy (banded forward calls; DotScores::item_view).
void prepare_dot_brgemm(DotMats& m, DotScores& sc, VMats* vm, const Problem& p, const Tensor& q,
                        const Tensor& k, const Tensor& v, bool panels);

// The backward's products through brgemm (prep.cpp: prepare_bwd_brgemm). dV and dK accumulate
// transposed (dV^T += dO^T P, dK^T += q^T dS, no per-tile transposes of P or dS):
//   float32:  V^T (B, Hk, Dv, LkP) for dP = dO V^T; q^T and dO^T (B, H, D | Dv, Lq) as the A operands.
//   bfloat16: dO with rows of Dv2 = round_up(Dv, 2) and V^T in VNNI pairs (B, Hk, Dv2 / 2, LkP, 2) for dP;
//             K in VNNI pairs (B, Hk, LkP / 2, D, 2) for dQ (keys past key_lengths zero); q^T and dO^T
//             (B, H, D | Dv, Lq); P and dS rounded to bfloat16 per block, as FlashAttention does on GPUs.
struct BwdMats {
  bool on = false, bf16 = false;
  int64_t LkP = 0;
  int Dv2 = 0;
  const float *vT = nullptr, *qT = nullptr, *doT = nullptr;
  const uint16_t *dob = nullptr, *vTv = nullptr, *kv = nullptr, *qT16 = nullptr, *doT16 = nullptr;
  std::vector<Tensor> keep;
};
// Fills m for a dot-product (score "dot") or additive call (only dP and dV then) at the brgemm path.
void prepare_bwd_brgemm(BwdMats& m, const Problem& p, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& dout, bool dot);

// 16-bit copies (contiguous, input dtype) for gemm16, or undefined tensors when the call uses sgemm.
struct Low16 {
  Tensor a, b;
  at::ScalarType t = at::kFloat;
  bool on() const { return a.defined(); }
  const uint16_t* pa() const { return on() ? static_cast<const uint16_t*>(a.data_ptr()) : nullptr; }
  const uint16_t* pb() const { return on() ? static_cast<const uint16_t*>(b.data_ptr()) : nullptr; }
};

// low16 for the pair (a, b): their 16-bit contiguous copies when the level is avx512 and
// use_gemm16(dtype) holds, else nothing (the call converts to float32 and uses sgemm).
Low16 low16(Isa isa, const Tensor& a, const Tensor& b);

// s_ij = sum_a w_a tanh(q_ia + k_ja) = sum_a w_a - 2 sum_a w_a / (1 + e^{2 q_ia} e^{2 k_ja}),
// with a direct tanh for rows whose |values| exceed kExpLimit (flagged).
struct AddScores {
  const float* q;    // (B, H, Lq, A)
  const float* k;    // (B, Hk, Lk, A)
  const float* w;    // (H, A)
  const float* Eq;   // (B, H, Lq, A): e^{2q}, 1 on flagged rows (prepare_additive: not always every head)
  const float* Eqw = nullptr;  // (B, H, Lq, A): Eq / w[h] (vector levels; null at the scalar level)
  const float* iw = nullptr;   // (H, A): 1 / w (vector levels; null at the scalar level)
  // (H,): 1 when every weight of head h is weight_scaled_dim (kernels.h: the weight-scaled and the paired
  // loops), 2 when they are only pairable_dim (the paired loop on safe tiles, else the plain one), 0 else
  const uint8_t* wscaled = nullptr;
  // The paired form's data (kernels.h add_scores; null when no head is weight-scaled): per head the pairs'
  // centring (w_2m + w_2m+1) / 2 and the limit on max q + max k (prep.cpp); the largest q of each block
  // of MB query rows (of the (B, H, Lq) rows in order) and the largest k of each block of MB keys of a
  // kv head, taken from the factor tables (flagged rows and padding count as 0: their factors are e^0).
  static constexpr int64_t MB = 64;
  const float* hw2 = nullptr;   // (H, A / 2)
  const float* plim = nullptr;  // (H,)
  const float* qmax = nullptr;  // (ceil(B H Lq / MB),)
  const float* kmax = nullptr;  // (B, Hk, nkb)
  int64_t nkb = 0;              // key blocks per kv head
  const float* EkT;  // (B, Hk, A, LkP): e^{2k} transposed and padded with 1
  const uint8_t* qflag;  // (B, H, Lq)
  const uint8_t* kflag;  // (B, Hk, Lk)
  int64_t LkP;
  const Problem* p;
  static constexpr int BQ = 32, BK = 128, KA = 16;  // BK 128 vs 64: backward ~6% faster (Zen 4)
  // sub-tiles whenever they save 1/32 of the entries: the cost is per entry (window (256, 0): 32 x 288
  // entries per tile against 2 x 16 x 272)
  static constexpr int SUB = 32;
  int br() const { return 16; }
  bool uses_brgemm() const { return false; }
  float fold() const { return 1.f; }
  float mods_scale() const { return 1.f; }
  static constexpr bool panels = false;
  const AddScores& item_view(int64_t, int64_t, int64_t, int64_t, std::vector<float>&) const { return *this; }

  const float* eq(int64_t b, int64_t h, int64_t i) const { return Eq + ((b * p->H + h) * p->Lq + i) * p->D; }
  bool scaled(int64_t h) const { return wscaled && wscaled[h] == 1; }
  bool pairable(int64_t h) const { return wscaled && wscaled[h] != 0 && hw2; }
  const float* eqw(int64_t b, int64_t h, int64_t i) const { return Eqw + ((b * p->H + h) * p->Lq + i) * p->D; }
  const float* ekt(int64_t b, int64_t hk, int64_t j) const { return EkT + (b * p->Hk + hk) * p->D * LkP + j; }
  bool qf(int64_t b, int64_t h, int64_t i) const { return qflag[(b * p->H + h) * p->Lq + i] != 0; }
  bool kf(int64_t b, int64_t hk, int64_t j) const { return kflag[(b * p->Hk + hk) * p->Lk + j] != 0; }
  const float* qrow(int64_t b, int64_t h, int64_t i) const { return q + ((b * p->H + h) * p->Lq + i) * p->D; }
  const float* krow(int64_t b, int64_t hk, int64_t j) const { return k + ((b * p->Hk + hk) * p->Lk + j) * p->D; }
  bool flagged(int64_t b, int64_t h, int64_t i, int64_t j) const { return qf(b, h, i) || kf(b, h / p->G, j); }
  // Whether some pair of the tile needs the direct tanh (O(nr + nc); the pair loops are skipped if not).
  bool any_flagged(int64_t b, int64_t h, int64_t i0, int nr, int64_t j0, int nc) const {
    const uint8_t* qfl = qflag + (b * p->H + h) * p->Lq + i0;
    const uint8_t* kfl = kflag + (b * p->Hk + h / p->G) * p->Lk + j0;
    int f = 0;
    for (int i = 0; i < nr; ++i) f |= qfl[i];
    for (int j = 0; j < nc; ++j) f |= kfl[j];
    return f != 0;
  }

  float direct(int64_t b, int64_t h, int64_t i, int64_t j) const {
    const float* x = qrow(b, h, i);
    const float* y = krow(b, h / p->G, j);
    const float* wh = w + h * p->D;
    float s = 0.f;
    for (int64_t a = 0; a < p->D; ++a) s += wh[a] * std::tanh(x[a] + y[a]);
    return s;
  }

  // Whether the tile's |d| = |e^{2q}/w e^{2k} + 1/w| stay below 2^62 (kernels.h add_scores), in
  // O((nr + nc) / MB): |d| <= max|1/w| (e^{2 (max q + max k)} + 1), checked as max q + max k < plim[h].
  // Keys past Lk in the last 16-column group hold e^0 in EkT (so max k starts at 0).
  bool pair_safe(int64_t b, int64_t h, int64_t i0, int nr, int64_t j0, int nc) const {
    const int64_t r0 = (b * p->H + h) * p->Lq + i0, kb = (b * p->Hk + h / p->G) * nkb;
    float mq = -INFINITY, mk = 0.f;
    for (int64_t t = r0 / MB; t <= (r0 + nr - 1) / MB; ++t) mq = std::max(mq, qmax[t]);
    for (int64_t t = j0 / MB; t <= (j0 + nc - 1) / MB; ++t) mk = std::max(mk, kmax[kb + t]);
    return mq + mk < plim[h];
  }

  // j0 must be a multiple of 16 (EkT is read up to round_up(nc, 16) columns on); ldS too.
  void tile(Isa isa, int64_t b, int64_t h, int64_t i0, int nr, int64_t j0, int nc, float* S, int ldS) const {
    const int64_t hk = h / p->G;
    const int nc16 = (int)round_up(nc, 16);
    const bool paired = pairable(h) && pair_safe(b, h, i0, nr, j0, nc), ws = paired || scaled(h);
    add_scores(isa, nr, nc16, (int)p->D, eq(b, h, i0), ws ? eqw(b, h, i0) : nullptr, ekt(b, hk, j0), LkP,
               w + h * p->D, ws ? iw + h * p->D : nullptr, paired ? hw2 + h * (p->D / 2) : nullptr, S, ldS);
    if (!any_flagged(b, h, i0, nr, j0, nc)) return;
    for (int i = 0; i < nr; ++i)
      for (int j = 0; j < nc; ++j)
        if (flagged(b, h, i0 + i, j0 + j)) S[(int64_t)i * ldS + j] = direct(b, h, i0 + i, j0 + j);
  }
};

// ----------------------------------------------------------------------------- set-up (prep.cpp)

struct AddData {
  Tensor q, k, w, Eq, Eqw, iw, wscaled, hw2, plim, qmax, kmax, EkT, qflag, kflag;
  AddScores sc;
};

// Fills d (float32 copies, the factor tables e^{2q}, e^{2k} transposed, the direct-tanh flags). Without
// all_eq (the forward: only the score loops read the tables), the rows of e^{2q} of the heads that take
// the weight-scaled loops (AddScores::scaled) are left unwritten; the backward's gradient loop reads them.
void prepare_additive(AddData& d, const Problem& p, const Tensor& q, const Tensor& k, const Tensor& w,
                      Isa isa, bool all_eq);

// 1 for each of the `rows` rows of x (row length n) holding an inf or NaN.
std::vector<uint8_t> nonfinite_rows(const float* x, int64_t rows, int64_t n);

// delta_i = dout_i . out_i for every query row (see prep.cpp).
std::vector<float> row_delta(const Problem& p, const float* dout, const float* out);

// The rel_bias gradient from the per-item partials (prep.cpp), and its value for empty problems.
// Per-(item, group member) partials of the backward, `stride` floats each, items (b, hk, chunk) in that
// order: calls f(h, partial) for every partial of query head h = hk*G + g, in item order (deterministic).
template <class T, class F>
void for_each_partial(const Problem& p, const T* part, int64_t n_items, int64_t stride, F f) {
  const int64_t per_bhk = n_items / (p.B * p.Hk);
  for (int64_t h = 0; h < p.H; ++h) {
    const int64_t hk = h / p.G, g = h % p.G;
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t c = 0; c < per_bhk; ++c) f(h, part + (((b * p.Hk + hk) * per_bhk + c) * p.G + g) * stride);
  }
}
Tensor reduce_rel(const Problem& p, const std::vector<double>& part, int64_t n_items,
                  const c10::optional<Tensor>& rel_bias);
Tensor rel_grad_zeros(const c10::optional<Tensor>& rel_bias);

}  // namespace fusedattn_cpu
