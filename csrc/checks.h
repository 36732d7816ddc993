// Problem sizes and the argument checks of the CPU ops (checks.cpp): every bad input gets a
// TORCH_CHECK error that names the op, the argument and the shapes.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fusedattn_cpu {

// Score modifiers applied to each tile after the raw scores (modifiers.cpp):
//   s = softcap * tanh(s / softcap)                       (softcap > 0)
//   s += rel[h, clamp(d, -(M-1), M-1) + M - 1]            (rel != nullptr, (H, 2M-1) float32)
//   s -= alibi[b * alibi_bstride + h] * |d|               (alibi != nullptr; b: the sequence when varlen)
// with d = j - i - (Lk - Lq), the bottom-right aligned distance (Problem::shift: per sequence when varlen).
struct Mods {
  float softcap = 0.f;
  const float* rel = nullptr;
  int64_t M = 0;
  const float* alibi = nullptr;
  int64_t alibi_bstride = 0;
  bool any() const { return softcap > 0.f || rel != nullptr || alibi != nullptr; }
};

struct Problem {
  int64_t B, H, Hk, G, Lq, Lk, D, Dv;
  bool causal;
  // window (left, right) on d = j - i - shift(i): -left <= d <= right; -1 = unbounded (causal: wr = 0)
  int64_t wl = -1, wr = -1;
  std::vector<int64_t> klen;
  Mods mods;
  // Packed variable-length batches (set_varlen): B == 1, sequence s holds the query rows
  // [cq[s], cq[s + 1]) and the keys [ck[s], ck[s + 1]); seq[i] is the sequence of row i. A row's keys
  // stay in its sequence and masks and distances align per sequence, so lo and lim stay
  // non-decreasing in i across the whole packed batch (the drivers need only that).
  std::vector<int64_t> cq, ck;
  std::vector<int32_t> seq;
  bool varlen() const { return !cq.empty(); }
  // d = j - i - shift(i): the bottom-right aligned distance (of row i's sequence)
  int64_t shift(int64_t i) const {
    if (!varlen()) return Lk - Lq;
    const int64_t s = seq[i];
    return ck[s + 1] - cq[s + 1];
  }
  // Keys lo(b, i) <= j < lim(b, i) are allowed for query i.
  int64_t lim(int64_t b, int64_t i) const {
    if (varlen()) {
      const int64_t s = seq[i];
      int64_t l = ck[s + 1];
      if (wr >= 0) l = std::min<int64_t>(l, i + shift(i) + wr + 1);
      return std::max<int64_t>(l, ck[s]);
    }
    int64_t l = klen[b];
    if (wr >= 0) l = std::min<int64_t>(l, i + Lk - Lq + wr + 1);
    return std::max<int64_t>(l, 0);
  }
  int64_t lo(int64_t, int64_t i) const {
    if (varlen()) {
      const int64_t s = seq[i];
      return wl >= 0 ? std::max<int64_t>(ck[s], i + shift(i) - wl) : ck[s];
    }
    return wl >= 0 ? std::max<int64_t>(0, i + Lk - Lq - wl) : 0;
  }
  // The end of row i's sequence (packed batches; else none): a group of rows the drivers run together
  // (sub-tile, backward block) stops there, so its keys are its sequence's.
  int64_t seq_end(int64_t i) const { return varlen() ? cq[seq[i] + 1] : INT64_MAX; }
  // Query rows [first_row, end_row) may see some key of [j0, j1).
  int64_t first_row(int64_t j0) const {
    if (varlen()) {  // the first row with lim > j0 (lim is non-decreasing)
      int64_t a = 0, e = Lq;
      while (a < e) {
        const int64_t m = (a + e) / 2;
        if (lim(0, m) > j0) e = m; else a = m + 1;
      }
      return a;
    }
    return wr >= 0 ? std::max<int64_t>(0, j0 - wr - (Lk - Lq)) : 0;
  }
  int64_t end_row(int64_t j1) const {
    if (varlen()) {  // the first row with lo >= j1 (lo is non-decreasing)
      int64_t a = 0, e = Lq;
      while (a < e) {
        const int64_t m = (a + e) / 2;
        if (lo(0, m) >= j1) e = m; else a = m + 1;
      }
      return a;
    }
    return wl >= 0 ? std::clamp<int64_t>(j1 - 1 + wl - (Lk - Lq) + 1, 0, Lq) : Lq;
  }
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
// Row stride (in 32-bit elements) of an operand read across many rows at once (K^T, V^T, the additive
// e^{2k} table): at least n, a multiple of 16 (64 bytes) and an odd one, so that consecutive rows fall in
// different L1 sets. A stride of a multiple of 4 KiB puts every row in one set: brgemm's Q.K^T at
// ldb = 2048 ran at 92 GFLOP/s against 113 at 2064 (1 thread, Zen 4).
inline int64_t spread_ld(int64_t n) {
  const int64_t ld = round_up(std::max<int64_t>(n, 1), 16);
  return (ld / 16) % 2 == 0 ? ld + 16 : ld;
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
// key_lengths as B values in [0, Lk] (all Lk when absent).
std::vector<int64_t> read_lengths(const char* op, const c10::optional<at::Tensor>& kl, int64_t B,
                                  int64_t Lk);
void check_w(const char* op, const at::Tensor& w, const at::Tensor& q);
void check_bwd(const char* op, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
               const at::Tensor& q, const at::Tensor& v);
// float32, contiguous (a copy in scratch memory unless it already is).
at::Tensor f32(const at::Tensor& t);
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     std::vector<int64_t> klen, bool causal);
bool empty_problem(const Problem& p);
// Packed sequences from int32 cu_seqlens_q / cu_seqlens_k (both or neither; checked: shapes, 0 start,
// non-decreasing, ending at Lq / Lk; B == 1, no key_lengths). Call before set_modifiers.
void set_varlen(const char* op, Problem& p, const c10::optional<at::Tensor>& cu_q,
                const c10::optional<at::Tensor>& cu_k, bool has_key_lengths);
// Window and score modifiers from the ops' optional arguments (checked; tensors kept alive by the caller
// in `keep`, as contiguous float32).
void set_modifiers(const char* op, Problem& p, int64_t window_left, int64_t window_right, double softcap,
                   const c10::optional<at::Tensor>& rel_bias, const c10::optional<at::Tensor>& alibi_slopes,
                   std::vector<at::Tensor>& keep);
// Applies p.mods to the score tile S (nr x nc, leading dim ldS) of query rows i0.. and keys j0..,
// after scaling it by pre (the brgemm path's unscaled products: DotScores::mods_scale, folded into the
// softcap's 1 / softcap or the bias addition's FMA); with softcap and T != nullptr, stores
// tanh(pre * s / softcap) in T (same layout) for the backward.
void apply_mods(const Problem& p, int64_t b, int64_t h, int64_t i0, int nr, int64_t j0, int nc, float* S,
                int ldS, float* T, float pre = 1.f);
// Backward of the biases: drel[idx(d)] += dS and drel[2M - 1 + idx(d)] += P (the softmax, same
// layout as dS) over the tile, in double; then dS *= 1 - T^2 (softcap). reduce_rel uses the
// softmax mass per distance to remove the rows' rounding residual (see prep.cpp).
void mods_backward(const Problem& p, int64_t i0, int nr, int64_t j0, int nc, float* dS, const float* P, int ldS,
                   const float* T, double* drel);

}  // namespace fusedattn_cpu
