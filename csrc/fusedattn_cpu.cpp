// fusedattn_cpu: fused additive and dot-product attention for the CPU, forward and backward.
//
// Ops (schemas in TORCH_LIBRARY below): additive_fwd, additive_bwd, dot_fwd, dot_bwd, each with the
// window, softcap (dot), rel_bias, alibi_slopes and, for a packed batch, cu_seqlens_q / cu_seqlens_k
// (q (1, H, total_q, D): every sequence in one call; Problem in checks.h gives each row its sequence's
// keys and distances, and the row groups below end at sequence boundaries; docs/ARCHITECTURE.md).
// out, dq, dk, dv, dw come back in float32 for every input dtype (the caller rounds them; ring
// attention sums blocks' gradients unrounded); the backward takes out in float32 or the input dtype,
// and delta = rowsum(dout * out) from the float32 output keeps each row's dS summing to ~0, which the
// row-summed gradients (dw, drel_bias) need at 16-bit inputs (see docs/ARCHITECTURE.md).
//
// Layout: the launchers make q, k, v (and w, dout, out) contiguous float32 (a copy in scratch only
// when they are strided or 16-bit), O(L*D) against the O(Lq*Lk*D) work; no Lq x Lk tensor is stored:
// (query tile x key tile) blocks live in per-thread scratch. Products: oneDNN's brgemm at the avx512
// level, else MKL's sgemm or 16-bit gemm (gemm.h); the per-ISA loops of kernels*.cpp do the rest.
// Additive scores use tanh(x + y) = 1 - 2 / (1 + e^{2x} e^{2y}) with per-row e^{2q} and e^{2k}; a row
// with some |value| > 20 (or NaN) is flagged and its pairs use tanh directly.
// Forward: work items (batch, head, query tile, key split); each owns its output rows. When there
// are few items (a decoder step against long keys) the keys are split and the partial results are
// merged by their log-sum-exp. The split count depends only on the sizes, never on the thread
// count, so results are bitwise equal for any number of threads.
// Backward: work items (batch, kv head, key chunk); an item owns the dK/dV rows of its key tiles
// (grouped query heads are summed inside the item) and writes dQ into a buffer private to its key
// chunk; the chunk buffers (and dw partials) are then summed in a fixed order.
// Masks: a tile only computes the keys (forward) or key columns (backward) its rows may see. Where
// a window edge (or the start of a causal mask) cuts a tile diagonally, the forward runs it in
// sub-tiles of BR query rows and the backward its key tile in query blocks of BR rows, each over
// its own key range, when that computes 1/8 fewer entries; the choice depends on sizes only.
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include "grads.h"
#include "tiles.h"

namespace fusedattn_cpu {
namespace {

// ----------------------------------------------------------------------------- forward

// Rows in the group that starts at row r0 of a tile of nr rows from row i0: R, cut at the end of
// the tile and of r0's sequence (packed batches).
inline int group_rows(const Problem& p, int64_t i0, int r0, int nr, int R) {
  return (int)std::min<int64_t>(std::min(R, nr - r0), p.seq_end(i0 + r0) - (i0 + r0));
}

// Score entries computed for query rows [0, nr) of a tile from row i0 with allowed keys
// [los[i], lims[i]) (both non-decreasing in i), keys limited to [kb, ke), when the rows run in groups
// of R (group_rows), each group over the keys its rows see (from a multiple of 16).
inline int64_t work_rows(const Problem& p, int64_t i0, const int64_t* los, const int64_t* lims, int nr, int R,
                         int64_t kb, int64_t ke, int64_t align) {
  int64_t w = 0;
  for (int r0 = 0, rn; r0 < nr; r0 += rn) {
    rn = group_rows(p, i0, r0, nr, R);
    w += rn * std::max<int64_t>(0, std::min(ke, lims[r0 + rn - 1]) - std::max(kb, los[r0]) / align * align);
  }
  return w;
}

// O[rn x Dv] += P[rn x nc] V[j0, j0 + nc) of kv head bhk = b * Hk + hk (VMats: sgemm, brgemm or bf16).
inline void pv_product(const Problem& p, const VMats& vm, int64_t bhk, int rn, int64_t j0, int nc, const float* P,
                       int ldP, uint16_t* P16, float* O) {
  const int Dv = (int)p.Dv;
  if (vm.vv != nullptr) {
    const int nc2 = (nc + 1) / 2 * 2;  // j0 is even: whole VNNI pairs
    for (int i = 0; i < rn; ++i) avx512::to_bf16(P + (int64_t)i * ldP, P16 + (int64_t)i * nc2, nc, nc2);
    brgemm_bf16(rn, Dv, nc2, P16, nc2, vm.vv + (bhk * vm.LkP + j0) * Dv, Dv, true, O, Dv);
  } else if (vm.brg) {
    brgemm_f32(rn, Dv, nc, P, ldP, vm.v + (bhk * p.Lk + j0) * Dv, Dv, true, O, Dv);
  } else {
    gemm(false, false, rn, Dv, nc, 1.f, P, ldP, vm.v + (bhk * p.Lk + j0) * Dv, Dv, 1.f, O, Dv);
  }
}

// out_f (B, H, Lq, Dv) float32 and lse (B, H, Lq) float32, both preallocated and contiguous.
template <class Scores>
void forward(const Problem& p, const Scores& sc, const VMats& vm, float* out, float* lse, Isa isa,
             bool final_out = false) {
  // final_out: out is the call's result (float32 inputs), not converted afterwards: written with
  // non-temporal stores at the avx512 level
  const bool stream_out = final_out && isa.level == Level::avx512;
  constexpr int BQ = Scores::BQ, BK = Scores::BK, KA = Scores::KA;
  const int BR = sc.br();
  const int64_t nqt = (p.Lq + BQ - 1) / BQ, nkt = (p.Lk + BK - 1) / BK;
  const int64_t base_items = p.B * p.H * nqt;
  // Few items (e.g. one decoder step): split the keys so every core has work.
  int64_t nsplit = 1;
  if (base_items < 8) nsplit = std::min<int64_t>(nkt, (8 + base_items - 1) / base_items);
  const int64_t chunk = round_up((p.Lk + nsplit - 1) / nsplit, BK);
  nsplit = (p.Lk + chunk - 1) / chunk;
  const int64_t rows = p.B * p.H * p.Lq;
  std::vector<float> part_o, part_m, part_l;
  if (nsplit > 1) {
    part_o.assign(nsplit * rows * p.Dv, 0.f);
    part_m.assign(nsplit * rows, kNegInf);
    part_l.assign(nsplit * rows, 0.f);
  }
  const int Dv = (int)p.Dv;

  // sub-tiles' key blocks: as wide as the scratch allows, and at least 512 keys (a window of 256 keys
  // is then one block per sub-tile: the additive tiles' 16 x 128 would be 256 + a 16-key remainder)
  const int WS = std::max(BQ * BK / BR, 512);
  // Banded calls with per-item K^T panels (DotScores::item_view) take TPI consecutive query tiles per
  // item under one panel: a key is transposed about once instead of (window + BQ) / BQ times. TPI
  // depends on the sizes only (results do not depend on the thread count).
  const int64_t TPI = sc.panels && nsplit == 1 ? std::clamp<int64_t>(base_items / 32, 1, 8) : 1;
  const int64_t ngr = (nqt + TPI - 1) / TPI;
  parallel_items(p.B * p.H * ngr * nsplit, [&](auto pull) {
    Buf S(std::max(BQ * BK, BR * WS)), O(BQ * std::max<int64_t>(p.Dv, 1));
    std::vector<uint16_t> P16(vm.vv != nullptr ? std::max(BQ * BK, BR * WS) + BQ : 0);
    std::vector<float> panel;  // the item's K^T (DotScores::item_view)
    float m[BQ], l[BQ];
    int64_t lims[BQ], los[BQ];
    for (int64_t it; (it = pull()) >= 0;) {
      const int64_t s = it % nsplit, rest = it / nsplit;
      // last query tiles first: under a causal mask they have the most keys
      const int64_t g = ngr - 1 - rest % ngr, bh = rest / ngr, b = bh / p.H, h = bh % p.H, hk = h / p.G;
      const int64_t qt0 = g * TPI, qt1 = std::min(nqt, qt0 + TPI);
      const int64_t kb = s * chunk, ke = std::min<int64_t>(p.Lk, kb + chunk);
      // the keys the group's rows may see (lo and lim are non-decreasing in the row)
      const auto& isc = sc.item_view(b, h, std::max(kb, p.lo(b, qt0 * BQ)) / KA * KA,
                                     std::min(ke, p.lim(b, std::min(p.Lq, qt1 * BQ) - 1)), panel);
      const float fs = isc.fold();  // 1, or the scale the raw scores still lack
      for (int64_t qt = qt0; qt < qt1; ++qt) {
        const int64_t i0 = qt * BQ;
        const int nr = (int)std::min<int64_t>(BQ, p.Lq - i0);
        for (int i = 0; i < nr; ++i) {  // both non-decreasing in i
          lims[i] = p.lim(b, i0 + i);
          los[i] = p.lo(b, i0 + i);
          m[i] = kNegInf;
          l[i] = 0.f;
        }
        std::memset(O.data(), 0, sizeof(float) * nr * Dv);
        // A tile that straddles a window edge (or the start of a causal mask) runs in sub-tiles of BR
        // rows, each over its own key range (see work_rows), with key blocks as wide as the scratch allows.
        const bool sub = nr > BR && work_rows(p, i0, los, lims, nr, BR, kb, ke, KA) * Scores::SUB <
                                        work_rows(p, i0, los, lims, nr, nr, kb, ke, KA) * (Scores::SUB - 1);
        const int R = sub ? BR : nr, W = sub ? WS : BK;
        for (int r0 = 0, rn; r0 < nr; r0 += rn) {
          rn = group_rows(p, i0, r0, nr, R);
          const int64_t kend = std::min(ke, lims[r0 + rn - 1]);
          // key blocks start on a multiple of KA (16: the additive tables are read in 16s; see DotScores)
          for (int64_t j0 = std::max(kb, los[r0]) / KA * KA; j0 < kend; j0 += W) {
            const int nc = (int)std::min<int64_t>(W, kend - j0);
            isc.tile(isa, b, h, i0 + r0, rn, j0, nc, S.data(), W);
            if (p.mods.any()) apply_mods(p, b, h, i0 + r0, rn, j0, nc, S.data(), W, nullptr, isc.mods_scale());
            for (int i = r0; i < r0 + rn; ++i) {
              float* srow = S.data() + (int64_t)(i - r0) * W;
              const int valid = (int)std::clamp<int64_t>(lims[i] - j0, 0, nc);
              const int first = (int)std::clamp<int64_t>(los[i] - j0, 0, valid);
              const bool v512 = isa.level == Level::avx512;
              // the row's maximum in scaled units (fs > 0 keeps the order: the same element)
              const float rm = valid == first ? kNegInf
                               : v512         ? avx512::row_max_in(srow, first, valid) * fs
                                              : row_max(isa, srow + first, valid - first) * fs;
              const float mn = (rm > m[i] || std::isnan(rm)) ? rm : m[i];  // a NaN score stays NaN
              if (mn == kNegInf) {  // nothing allowed yet in this row
                std::memset(srow, 0, sizeof(float) * nc);
                continue;
              }
              // a row's first block with an allowed key: its O row is still the memset zeros
              const bool first_block = m[i] == kNegInf;
              const float alpha = first_block ? 0.f : std::exp(m[i] - mn);
              // P = exp(s - mn) on the allowed keys [first, valid), 0 elsewhere
              float sum;
              if (v512) {
                sum = avx512::exp_sub_sum_in(srow, nc, first, valid, fs, mn);
              } else {  // fs is 1 here (raw scores only at the avx512 level)
                std::memset(srow, 0, sizeof(float) * first);
                std::memset(srow + valid, 0, sizeof(float) * (nc - valid));
                sum = valid == first ? 0.f : exp_sub_sum(isa, srow + first, valid - first, mn);
              }
              l[i] = l[i] * alpha + sum;
              m[i] = mn;
              if (alpha != 1.f && !first_block) {
                float* o = O.data() + (int64_t)i * Dv;
                if (isa.level == Level::avx512)
                  avx512::scale(o, Dv, alpha);
                else
                  for (int d = 0; d < Dv; ++d) o[d] *= alpha;
              }
            }
            pv_product(p, vm, b * p.Hk + hk, rn, j0, nc, S.data(), W, P16.data(), O.data() + (int64_t)r0 * Dv);
          }
        }
        const int64_t row0 = (b * p.H + h) * p.Lq + i0;
        for (int i = 0; i < nr; ++i) {
          const float* o = O.data() + (int64_t)i * Dv;
          if (nsplit > 1) {
            const int64_t r = s * rows + row0 + i;
            std::memcpy(part_o.data() + r * Dv, o, sizeof(float) * Dv);
            part_m[r] = m[i];
            part_l[r] = l[i];
            continue;
          }
          float* dst = out + (row0 + i) * Dv;
          if (l[i] > 0.f || std::isnan(l[i])) {  // NaN inputs give a NaN row
            const float inv = 1.f / l[i];
            if (isa.level == Level::avx512)
              avx512::scale_to(o, dst, Dv, inv, stream_out);
            else
              for (int d = 0; d < Dv; ++d) dst[d] = o[d] * inv;
            lse[row0 + i] = m[i] + std::log(l[i]);
          } else {
            for (int d = 0; d < Dv; ++d) dst[d] = 0.f;
            lse[row0 + i] = kNegInf;
          }
        }
      }  // the item's query tiles
    }
    if (vm.brg || vm.vv != nullptr) brgemm_done();
#if defined(__x86_64__) || defined(_M_X64)
    if (stream_out) _mm_sfence();  // the non-temporal output stores (scale_to) before the join
#endif
  });

  if (nsplit > 1) {  // merge the key splits by log-sum-exp, in split order
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float M = kNegInf;
        for (int64_t s = 0; s < nsplit; ++s) {
          const float ms = part_m[s * rows + r];
          M = (ms > M || std::isnan(ms)) ? ms : M;
        }
        float* dst = out + r * Dv;
        for (int d = 0; d < Dv; ++d) dst[d] = 0.f;
        if (M == kNegInf) {
          lse[r] = kNegInf;
          continue;
        }
        float L = 0.f;
        for (int64_t s = 0; s < nsplit; ++s) {
          const float ms = part_m[s * rows + r];
          if (ms == kNegInf) continue;
          const float c = std::exp(ms - M);
          L += part_l[s * rows + r] * c;
          const float* o = part_o.data() + (s * rows + r) * Dv;
          for (int d = 0; d < Dv; ++d) dst[d] += c * o[d];
        }
        const float inv = 1.f / L;
        for (int d = 0; d < Dv; ++d) dst[d] *= inv;
        lse[r] = M + std::log(L);
      }
    });
  }
}

// ----------------------------------------------------------------------------- backward

// The key columns [*ca, *ca + *nc) of the tile [j0, j0 + ncv) that query rows [i0, i0 + nr) see, *ca
// rounded down to a multiple of 16 (j0 is one); false when they see none.
inline bool block_cols(const Problem& p, int64_t b, int64_t i0, int nr, int64_t j0, int ncv, int* ca, int* nc) {
  const int lo = (int)(std::clamp<int64_t>(p.lo(b, i0) - j0, 0, ncv) / 16 * 16);
  const int hi = (int)std::clamp<int64_t>(p.lim(b, i0 + nr - 1) - j0, 0, ncv);
  *ca = lo;
  *nc = hi - lo;
  return hi > lo;
}

// Score entries the backward computes for the key tile [j0, j0 + ncv) with query blocks of R rows
// from row i (to iend), each over the columns its rows see.
inline int64_t bwd_work(const Problem& p, int64_t b, int64_t j0, int ncv, int64_t i, int64_t iend, int R) {
  int64_t w = 0;
  for (int ca, nc, nr; i < iend; i += nr) {
    nr = (int)std::min<int64_t>(std::min<int64_t>(R, iend - i), p.seq_end(i) - i);
    if (block_cols(p, b, i, nr, j0, ncv, &ca, &nc)) w += (int64_t)nr * nc;
  }
  return w;
}

// dP_ij - delta_i for the key j that holds more than half of row i's softmax (at most one per row),
// in the form dout_i . (v_j - out_i). dP_ij = dout_i . v_j and delta_i = dout_i . out_i are each
// rounded on the scale of |dout||v|; when the softmax saturates, out_i -> v_j and their difference is
// pure rounding noise that the backward then multiplies by q or k (|q| up to 1e30 gave dk ~ 1e22).
// Here the difference v_j - out_i is taken first: exactly 0 for a one-hot row (so dS = 0 and a key
// that alone is allowed gets dk = 0 exactly), and small with it otherwise. Costs one length-Dv dot
// product per query row.
inline float dominant_ds(const float* dout, const float* out, const float* vj, int Dv) {
  float s = 0.f;
  for (int d = 0; d < Dv; ++d) s += dout[d] * (vj[d] - out[d]);
  return s;
}

// Fills dq (B,H,Lq,D), dk (B,Hk,Lk,D), dv (B,Hk,Lk,Dv) (float32, contiguous; every element is
// written, so they may be uninitialized) and
// returns the dw state partials (items x G x dw_size) for the caller to reduce.
template <class Scores, class Grad>
std::vector<double> backward(const Problem& p, const Scores& sc, const Grad& gr, const float* v,
                            const float* dout, const float* out, const float* lse, const float* delta,
                            float* dq, float* dk, float* dv, int64_t* n_items_out, Isa isa,
                            std::vector<double>* drel_part = nullptr, const Low16& dv16 = Low16(),
                            const BwdMats& bm = BwdMats()) {
  constexpr int BQ = Scores::BQ, BK = Scores::BK;
  const int BR = sc.br();
  const int64_t nkt = (p.Lk + BK - 1) / BK;
  const int64_t bhk = p.B * p.Hk;
  int64_t nchunk = std::min<int64_t>(nkt, (8 + bhk - 1) / bhk);
  const int64_t dq_numel = p.B * p.H * p.Lq * p.D;
  // cap the private dQ buffers at 512 MiB
  while (nchunk > 1 && nchunk * dq_numel * 4 > (int64_t(512) << 20)) --nchunk;
  std::vector<float> dq_part;
  if (nchunk > 1) dq_part.assign(nchunk * dq_numel, 0.f);
  const int64_t n_items = bhk * nchunk;
  *n_items_out = n_items;
  const int dws = Grad::dw_size(p);
  std::vector<double> dw_part(std::max<int64_t>(n_items * p.G * dws, 1), 0.0);
  const int Dv = (int)p.Dv;
  // rel_bias gradient partials per (item, group member), reduced by the caller in a fixed order
  const int64_t nrel = p.mods.rel != nullptr ? 2 * (2 * p.mods.M - 1) : 0;  // dS and P sums
  if (drel_part != nullptr) drel_part->assign(std::max<int64_t>(n_items * p.G * nrel, 1), 0.0);
  const bool softcap = p.mods.softcap > 0.f;
  const float fs = sc.fold();  // 1, or the scale the raw scores still lack

  parallel_items(n_items, [&](auto pull) {
    Buf S(BQ * BK), dP(BQ * BK), dkacc(gr.dk_size(p, BK)), dvacc(BK * std::max(Dv, 1));
    // bfloat16 brgemm operands of a block: P in VNNI pairs of rows, dO^T with its rows padded to even
    std::vector<uint16_t> P16(bm.bf16 ? (BQ + 1) * BK : 0), A16(bm.bf16 ? (BQ + 2) * std::max(Dv, 1) : 0);
    Buf T(softcap ? BQ * BK : 1);
    int rng[2 * BQ];  // allowed columns [first, valid) of each row of a block
    for (int64_t it; (it = pull()) >= 0;) {
      const int64_t c = it % nchunk, bk_ = it / nchunk, b = bk_ / p.Hk, hk = bk_ % p.Hk;
      float* dqbase = nchunk > 1 ? dq_part.data() + c * dq_numel : dq;
      if (nchunk == 1)  // this item owns the dq rows of its query heads
        std::memset(dq + (b * p.H + hk * p.G) * p.Lq * p.D, 0, sizeof(float) * p.G * p.Lq * p.D);
      double* dwst_item = dw_part.data() + it * p.G * dws;
      for (int64_t kt = c; kt < nkt; kt += nchunk) {
        const int64_t j0 = kt * BK;
        const int nc = (int)std::min<int64_t>(BK, p.Lk - j0);
        if (j0 >= p.klen[b]) {  // no query sees these keys
          std::memset(dk + ((b * p.Hk + hk) * p.Lk + j0) * p.D, 0, sizeof(float) * nc * p.D);
          std::memset(dv + ((b * p.Hk + hk) * p.Lk + j0) * p.Dv, 0, sizeof(float) * nc * Dv);
          continue;
        }
        // keys at or beyond key_lengths are never read (padding may hold anything, even NaN);
        // their dk, dv rows stay zero
        const int ncv = (int)std::min<int64_t>(nc, p.klen[b] - j0);
        std::memset(dkacc.data(), 0, sizeof(float) * gr.dk_size(p, BK));
        std::memset(dvacc.data(), 0, sizeof(float) * BK * Dv);
        const float* vt = v + ((b * p.Hk + hk) * p.Lk + j0) * p.Dv;
        const int64_t istart = p.first_row(j0), iend = p.end_row(j0 + ncv);
        // Query blocks of BQ rows from a multiple of BQ, or of BR rows from istart when the key tile
        // straddles a window edge; a block computes only the key columns its rows see.
        const int64_t ib = istart / BQ * BQ;
        const bool sub =
            bwd_work(p, b, j0, ncv, istart, iend, BR) * 8 < bwd_work(p, b, j0, ncv, ib, iend, BQ) * 7;
        const int R = sub ? BR : BQ;
        for (int64_t g = 0; g < p.G; ++g) {
          const int64_t h = hk * p.G + g;
          double* dwst = dwst_item + g * dws;
          double* drel = nrel > 0 ? drel_part->data() + (it * p.G + g) * nrel : nullptr;
          for (int64_t i0 = sub ? istart : ib, nr; i0 < iend; i0 += nr) {
            nr = (int)std::min<int64_t>(std::min<int64_t>(R, iend - i0), p.seq_end(i0) - i0);
            int ca, nc;  // the block's key columns [ca, ca + nc) of the tile (ca a multiple of 16)
            if (!block_cols(p, b, i0, nr, j0, ncv, &ca, &nc)) continue;
            const int64_t c0 = j0 + ca, row0 = (b * p.H + h) * p.Lq + i0;
            const float* vc = vt + (int64_t)ca * Dv;
            sc.tile(isa, b, h, i0, nr, c0, nc, S.data(), BK);
            if (p.mods.any())
              apply_mods(p, b, h, i0, nr, c0, nc, S.data(), BK, softcap ? T.data() : nullptr, sc.mods_scale());
            const float* dor = dout + row0 * p.Dv;
            const int64_t bhk = b * p.Hk + hk;
            if (bm.bf16)
              brgemm_bf16(nr, nc, bm.Dv2, bm.dob + row0 * bm.Dv2, bm.Dv2, bm.vTv + bhk * bm.Dv2 * bm.LkP + 2 * c0,
                          (int)bm.LkP, false, dP.data(), BK);
            else if (bm.on)
              brgemm_f32(nr, nc, Dv, dor, Dv, bm.vT + bhk * Dv * bm.LkP + c0, (int)bm.LkP, false, dP.data(), BK);
            else if (dv16.on())
              gemm16(dv16.t, false, true, nr, nc, Dv, 1.f, dv16.pa() + row0 * p.Dv, Dv,
                     dv16.pb() + ((b * p.Hk + hk) * p.Lk + c0) * p.Dv, Dv, 0.f, dP.data(), BK);
            else
              gemm(false, true, nr, nc, Dv, 1.f, dor, Dv, vc, Dv, 0.f, dP.data(), BK);
            bool any = false;
            // columns the block's products read: nc (dot), or up to a multiple of 16 (additive: add_bwd)
            const int nz = (int)std::min<int64_t>(BK, round_up(nc, 16));
            for (int i = 0; i < nr; ++i) {
              float* srow = S.data() + i * BK;
              float* drow = dP.data() + i * BK;
              const float L = lse[row0 + i];
              const int valid = (int)std::clamp<int64_t>(p.lim(b, i0 + i) - c0, 0, nc);
              const int first = (int)std::clamp<int64_t>(p.lo(b, i0 + i) - c0, 0, valid);
              rng[2 * i] = rng[2 * i + 1] = 0;
              if (L == kNegInf || valid == first) {
                std::memset(srow, 0, sizeof(float) * nz);
                std::memset(drow, 0, sizeof(float) * nz);
                continue;
              }
              any = true;
              rng[2 * i] = first;
              rng[2 * i + 1] = valid;
              // P only where allowed (a NaN lse must not reach the other columns)
              if (fs == 1.f)
                exp_sub_sum(isa, srow + first, valid - first, L);
              else  // raw scores (DotScores::raw): bitwise the scaled ones' exp
                avx512::exp_scale_sub_sum(srow + first, valid - first, fs, L);
              for (int j = 0; j < first; ++j) srow[j] = 0.f;
              for (int j = valid; j < nz; ++j) srow[j] = 0.f;
              const float dl = delta[row0 + i];
              for (int j = 0; j < first; ++j) drow[j] = 0.f;
              // dS = P (dP - delta); the row's dominant key (P > 1/2, see dominant_ds) another way
              int dom = first;
              if (isa.level == Level::avx512) {
                const int f = avx512::ds_row(srow + first, drow + first, valid - first, dl, fs);
                dom = f < 0 ? valid : first + f;
              } else {  // fs is 1 here (raw scores only at the avx512 level)
                for (int j = first; j < valid; ++j) drow[j] = srow[j] * (drow[j] - dl);
              }
              for (int j = dom; j < valid; ++j)
                if (srow[j] > 0.5f)
                  drow[j] = srow[j] * dominant_ds(dor + (int64_t)i * Dv, out + (row0 + i) * p.Dv,
                                                  vc + (int64_t)j * Dv, Dv) * fs;
              for (int j = valid; j < nz; ++j) drow[j] = 0.f;
            }
            if (!any) continue;
            if (nrel > 0 || softcap) mods_backward(p, i0, nr, c0, nc, dP.data(), S.data(), BK, T.data(), drel);
            if (bm.bf16) {  // dV^T += dO^T P
              const int nr2 = (nr + 1) / 2 * 2;
              const int64_t bh = b * p.H + h;
              for (int d = 0; d < Dv; ++d) {
                std::memcpy(A16.data() + (int64_t)d * nr2, bm.doT16 + (bh * Dv + d) * p.Lq + i0, 2 * nr);
                if (nr2 > nr) A16[(int64_t)d * nr2 + nr] = 0;
              }
              avx512::vnni_rows(S.data(), BK, nr, nc, 1.f, P16.data(), nc);
              brgemm_bf16(Dv, nc, nr2, A16.data(), nr2, P16.data(), nc, true, dvacc.data() + ca, BK);
            } else if (bm.on) {
              brgemm_f32(Dv, nc, nr, bm.doT + (b * p.H + h) * Dv * p.Lq + i0, (int)p.Lq, S.data(), BK, true,
                         dvacc.data() + ca, BK);
            } else {
              gemm(true, false, nc, Dv, nr, 1.f, S.data(), BK, dor, Dv, 1.f, dvacc.data() + (int64_t)ca * Dv, Dv);
            }
            gr.consume(isa, b, h, i0, nr, c0, nc, dP.data(), rng, dqbase + row0 * p.D,
                       dkacc.data() + gr.dk_offset(p, ca), dwst);
          }
        }
        gr.write_dk(p, dkacc.data(), nc, dk + ((b * p.Hk + hk) * p.Lk + j0) * p.D);
        float* dvt = dv + ((b * p.Hk + hk) * p.Lk + j0) * p.Dv;
        if (bm.on) {  // dV^T (Dv x BK) to rows
          columns_to_rows(dvacc.data(), BK, Dv, nc, dvt);
        } else {
          std::memcpy(dvt, dvacc.data(), sizeof(float) * nc * Dv);
        }
      }
    }
    if (sc.uses_brgemm() || bm.on) brgemm_done();
  });

  if (nchunk > 1) {  // dq = sum of the chunk buffers, in chunk order
    at::parallel_for(0, dq_numel, 4096, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        float s = 0.f;
        for (int64_t c = 0; c < nchunk; ++c) s += dq_part[c * dq_numel + e];
        dq[e] = s;
      }
    });
  }
  return dw_part;
}

Tensor f32_zeros(const Tensor& t) { return at::zeros(t.sizes(), t.options().dtype(at::kFloat)); }

std::tuple<Tensor, Tensor> empty_fwd(const Tensor& q, const Tensor& v) {
  Tensor out = at::zeros({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options().dtype(at::kFloat));
  Tensor lse = at::full({q.size(0), q.size(1), q.size(2)}, kNegInf, q.options().dtype(at::kFloat));
  return {out, lse};
}

// ----------------------------------------------------------------------------- ops

std::tuple<Tensor, Tensor> additive_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                        const Tensor& w, const c10::optional<Tensor>& key_lengths,
                                        bool causal, int64_t window_left, int64_t window_right,
                                        const c10::optional<Tensor>& rel_bias,
                                        const c10::optional<Tensor>& alibi_slopes,
                                        const c10::optional<Tensor>& cu_seqlens_q,
                                        const c10::optional<Tensor>& cu_seqlens_k) {
  const char* op = "fusedattn_cpu::additive_fwd";
  const Isa isa = current_isa();  // once per call
  check_qkv(op, q, k, v);
  check_w(op, w, q);
  Problem p = make_problem(q, k, v, read_lengths(op, key_lengths, q.size(0), k.size(2)), causal);
  set_varlen(op, p, cu_seqlens_q, cu_seqlens_k, key_lengths.has_value() && key_lengths->defined());
  std::vector<Tensor> keep;
  set_modifiers(op, p, window_left, window_right, 0.0, rel_bias, alibi_slopes, keep);
  if (empty_problem(p)) return empty_fwd(q, v);
  AddData d;
  prepare_additive(d, p, q, k, w, isa, /*all_eq=*/false);
  Tensor vf = f32(v);
  Tensor out = at::empty({p.B, p.H, p.Lq, p.Dv}, q.options().dtype(at::kFloat));
  Tensor lse = at::empty({p.B, p.H, p.Lq}, q.options().dtype(at::kFloat));
  VMats vm{vf.data_ptr<float>(), use_brgemm(isa, at::kFloat)};
  forward(p, d.sc, vm, out.data_ptr<float>(), lse.data_ptr<float>(), isa, q.scalar_type() == at::kFloat);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> additive_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& w,
    const c10::optional<Tensor>& key_lengths, bool causal, const Tensor& out, const Tensor& lse,
    int64_t window_left, int64_t window_right, const c10::optional<Tensor>& rel_bias,
    const c10::optional<Tensor>& alibi_slopes, const c10::optional<Tensor>& cu_seqlens_q,
    const c10::optional<Tensor>& cu_seqlens_k) {
  const char* op = "fusedattn_cpu::additive_bwd";
  const Isa isa = current_isa();  // once per call
  check_qkv(op, q, k, v);
  check_w(op, w, q);
  check_bwd(op, dout, out, lse, q, v);
  Problem p = make_problem(q, k, v, read_lengths(op, key_lengths, q.size(0), k.size(2)), causal);
  set_varlen(op, p, cu_seqlens_q, cu_seqlens_k, key_lengths.has_value() && key_lengths->defined());
  std::vector<Tensor> keep;
  set_modifiers(op, p, window_left, window_right, 0.0, rel_bias, alibi_slopes, keep);
  if (empty_problem(p))
    return {f32_zeros(q), f32_zeros(k), f32_zeros(v), f32_zeros(w), rel_grad_zeros(rel_bias)};
  AddData d;
  prepare_additive(d, p, q, k, w, isa, /*all_eq=*/true);
  Tensor vf = f32(v), dof = f32(dout), of = f32(out), lsef = lse.contiguous();
  std::vector<float> delta = row_delta(p, dof.data_ptr<float>(), of.data_ptr<float>());
  auto fo = q.options().dtype(at::kFloat);
  Tensor dq = at::empty({p.B, p.H, p.Lq, p.D}, fo), dk = at::empty({p.B, p.Hk, p.Lk, p.D}, fo);
  Tensor dv = at::empty({p.B, p.Hk, p.Lk, p.Dv}, fo);
  AddGrad gr{&d.sc};
  // dP = dO V^T and dV^T += dO^T P through brgemm at the avx512 level (no operand packing per call, as
  // MKL's sgemm does), in float32 for every input dtype (the float32 copies: P is not rounded)
  BwdMats bm;
  if (use_brgemm(isa, at::kFloat)) prepare_bwd_brgemm(bm, p, d.q, d.k, vf, dof, false);
  int64_t n_items = 0;
  std::vector<double> drelp;
  std::vector<double> dwp = backward(p, d.sc, gr, vf.data_ptr<float>(), dof.data_ptr<float>(), of.data_ptr<float>(),
                                    lsef.data_ptr<float>(), delta.data(), dq.data_ptr<float>(),
                                    dk.data_ptr<float>(), dv.data_ptr<float>(), &n_items, isa, &drelp, Low16(), bm);
  const int64_t A = p.D;
  Tensor dw = at::zeros({p.H, A}, fo);
  float* dwo = dw.data_ptr<float>();
  std::vector<double> dwd(p.H * A, 0.0);
  for_each_partial(p, dwp.data(), n_items, AddGrad::dw_size(p), [&](int64_t h, const double* st) {
    for (int64_t a = 0; a < A; ++a) dwd[h * A + a] += -2.0 * st[a] + st[A + a];
  });
  for (int64_t e = 0; e < p.H * A; ++e) dwo[e] = (float)dwd[e];
  return {dq, dk, dv, dw, reduce_rel(p, drelp, n_items, rel_bias)};  // float32 (see the top)
}

std::tuple<Tensor, Tensor> dot_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const c10::optional<Tensor>& key_lengths, double scale, bool causal,
                                   int64_t window_left, int64_t window_right, double softcap,
                                   const c10::optional<Tensor>& rel_bias,
                                   const c10::optional<Tensor>& alibi_slopes,
                                   const c10::optional<Tensor>& cu_seqlens_q,
                                   const c10::optional<Tensor>& cu_seqlens_k) {
  const char* op = "fusedattn_cpu::dot_fwd";
  const Isa isa = current_isa();  // once per call
  check_qkv(op, q, k, v);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  Problem p = make_problem(q, k, v, read_lengths(op, key_lengths, q.size(0), k.size(2)), causal);
  set_varlen(op, p, cu_seqlens_q, cu_seqlens_k, key_lengths.has_value() && key_lengths->defined());
  std::vector<Tensor> keep;
  set_modifiers(op, p, window_left, window_right, softcap, rel_bias, alibi_slopes, keep);
  if (empty_problem(p)) return empty_fwd(q, v);
  Tensor out = at::empty({p.B, p.H, p.Lq, p.Dv}, q.options().dtype(at::kFloat));
  Tensor lse = at::empty({p.B, p.H, p.Lq}, q.options().dtype(at::kFloat));
  if (use_brgemm(isa, q.scalar_type())) {  // oneDNN micro-kernels (gemm.h)
    DotMats mats;
    DotScores sc{nullptr, nullptr, (float)scale, &p};
    VMats vm;
    prepare_dot_brgemm(mats, sc, &vm, p, q, k, v, p.wl >= 0);
    sc.raw = scale > 0 && !p.mods.any();  // the softmax applies the scale (no pass over the scores)
    sc.mods_in = p.mods.any();            // or the modifiers do
    forward(p, sc, vm, out.data_ptr<float>(), lse.data_ptr<float>(), isa, q.scalar_type() == at::kFloat);
    return {out, lse};
  }
  const Low16 qk16 = low16(isa, q, k);  // 16-bit scores: no float32 copies of q and k
  Tensor qf = qk16.on() ? Tensor() : f32(q), kf = qk16.on() ? Tensor() : f32(k), vf = f32(v);
  DotScores sc{qk16.on() ? nullptr : qf.data_ptr<float>(), qk16.on() ? nullptr : kf.data_ptr<float>(),
               (float)scale, &p, qk16.pa(), qk16.pb(), qk16.t};
  forward(p, sc, VMats{vf.data_ptr<float>()}, out.data_ptr<float>(), lse.data_ptr<float>(), isa,
          q.scalar_type() == at::kFloat);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dot_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
    const c10::optional<Tensor>& key_lengths, double scale, bool causal, const Tensor& out, const Tensor& lse,
    int64_t window_left, int64_t window_right, double softcap, const c10::optional<Tensor>& rel_bias,
    const c10::optional<Tensor>& alibi_slopes, const c10::optional<Tensor>& cu_seqlens_q,
    const c10::optional<Tensor>& cu_seqlens_k) {
  const char* op = "fusedattn_cpu::dot_bwd";
  const Isa isa = current_isa();  // once per call
  check_qkv(op, q, k, v);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  check_bwd(op, dout, out, lse, q, v);
  Problem p = make_problem(q, k, v, read_lengths(op, key_lengths, q.size(0), k.size(2)), causal);
  set_varlen(op, p, cu_seqlens_q, cu_seqlens_k, key_lengths.has_value() && key_lengths->defined());
  std::vector<Tensor> keep;
  set_modifiers(op, p, window_left, window_right, softcap, rel_bias, alibi_slopes, keep);
  if (empty_problem(p)) return {f32_zeros(q), f32_zeros(k), f32_zeros(v), rel_grad_zeros(rel_bias)};
  Tensor qf = f32(q), kf = f32(k), vf = f32(v), dof = f32(dout), of = f32(out), lsef = lse.contiguous();
  // the scores as the forward formed them (the same products, bit for bit: P = exp(s - lse))
  const bool brg = use_brgemm(isa, q.scalar_type());
  const Low16 qk16 = brg ? Low16() : low16(isa, q, k), dv16 = brg ? Low16() : low16(isa, dout, v);
  DotScores sc{qf.data_ptr<float>(), kf.data_ptr<float>(), (float)scale, &p, qk16.pa(), qk16.pb(), qk16.t};
  DotMats mats;
  BwdMats bm;
  if (brg) {
    // float16 (and float32) inputs go in as the float32 copies above: no second conversion
    const bool b16 = q.scalar_type() == at::kBFloat16 && brgemm_works(at::kBFloat16);
    prepare_dot_brgemm(mats, sc, nullptr, p, b16 ? q : qf, b16 ? k : kf, b16 ? v : vf, false);
    sc.q = qf.data_ptr<float>();  // the gradient products read float32 rows
    sc.k = kf.data_ptr<float>();
    prepare_bwd_brgemm(bm, p, b16 ? q : qf, b16 ? k : kf, b16 ? v : vf, b16 ? dout : dof, true);
    sc.raw = scale > 0 && !p.mods.any();  // P = exp(scale * s - lse) in one pass, as the forward
    sc.mods_in = p.mods.any();            // the modifiers scale, as in the forward
  }
  std::vector<float> delta = row_delta(p, dof.data_ptr<float>(), of.data_ptr<float>());
  auto fo = q.options().dtype(at::kFloat);
  Tensor dq = at::empty({p.B, p.H, p.Lq, p.D}, fo), dk = at::empty({p.B, p.Hk, p.Lk, p.D}, fo);
  Tensor dv = at::empty({p.B, p.Hk, p.Lk, p.Dv}, fo);
  const std::vector<uint8_t> qbad = nonfinite_rows(qf.data_ptr<float>(), p.B * p.H * p.Lq, p.D),
                             kbad = nonfinite_rows(kf.data_ptr<float>(), p.B * p.Hk * p.Lk, p.D);
  DotGrad gr{&sc, qbad.data(), kbad.data(), brg ? &bm : nullptr};
  int64_t n_items = 0;
  std::vector<double> drelp;
  backward(p, sc, gr, vf.data_ptr<float>(), dof.data_ptr<float>(), of.data_ptr<float>(), lsef.data_ptr<float>(),
           delta.data(), dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(), &n_items, isa, &drelp,
           dv16, bm);
  return {dq, dk, dv, reduce_rel(p, drelp, n_items, rel_bias)};  // float32 (see the top)
}

bool has_avx2() { return current_isa().level >= Level::avx2; }
std::string isa_name() { return level_name(current_isa().level); }
void set_isa(c10::string_view name) { set_level(std::string(name)); }
std::vector<std::string> supported_isas() { return supported_levels(); }
bool uses_gemm16(c10::string_view dtype) {
  const at::ScalarType t = dtype == "bfloat16" ? at::kBFloat16 : dtype == "float16" ? at::kHalf : at::kFloat;
  return current_isa().level == Level::avx512 && !use_brgemm(current_isa(), t) && use_gemm16(t);
}
std::string gemm_path(c10::string_view dtype) {
  const at::ScalarType t = dtype == "bfloat16" ? at::kBFloat16 : dtype == "float16" ? at::kHalf : at::kFloat;
  if (use_brgemm(current_isa(), t)) return t == at::kBFloat16 && brgemm_works(t) ? "brgemm-bf16" : "brgemm";
  return uses_gemm16(dtype) ? "gemm16" : "sgemm";
}


}  // namespace
}  // namespace fusedattn_cpu

TORCH_LIBRARY(fusedattn_cpu, m) {
  // the trailing window / softcap / bias arguments are fusedattn.spec's modifiers (defaults: none);
  // the backward ops return the rel_bias gradient last (an empty tensor without rel_bias)
#define MODS "int window_left=-1, int window_right=-1, Tensor? rel_bias=None, Tensor? alibi_slopes=None, " \
             "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None"
#define DOT_MODS "int window_left=-1, int window_right=-1, float softcap=0., Tensor? rel_bias=None, " \
                 "Tensor? alibi_slopes=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None"
  m.def("additive_fwd(Tensor q, Tensor k, Tensor v, Tensor w, Tensor? key_lengths, bool causal, " MODS
        ") -> (Tensor, Tensor)");
  m.def("additive_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor w, Tensor? key_lengths, bool causal, "
        "Tensor out, Tensor lse, " MODS ") -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("dot_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_lengths, float scale, bool causal, " DOT_MODS
        ") -> (Tensor, Tensor)");
  m.def("dot_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? key_lengths, float scale, bool causal, "
        "Tensor out, Tensor lse, " DOT_MODS ") -> (Tensor, Tensor, Tensor, Tensor)");
#undef MODS
#undef DOT_MODS
  // The instruction-set level in use: "scalar", "avx2" or "avx512" (see isa.cpp); ValueError when
  // FUSEDATTN_CPU_ISA names an unknown level or one this CPU lacks.
  m.def("isa() -> str", &fusedattn_cpu::isa_name);
  // Switches the level for the rest of the process (tests run every level this way).
  m.def("set_isa(str level) -> ()", &fusedattn_cpu::set_isa);
  // The levels this CPU and OS can run, lowest first.
  m.def("supported_isas() -> str[]", &fusedattn_cpu::supported_isas);
  // Whether the level in use is avx2 or higher (kept for older callers; isa() says which).
  m.def("uses_avx2() -> bool", &fusedattn_cpu::has_avx2);
  // Whether dot attention in dtype ("bfloat16" / "float16") takes Q.K^T and dO.V^T from 16-bit
  // GEMMs at the level in use (gemm.h: use_gemm16); otherwise its inputs are converted to float32.
  m.def("uses_gemm16(str dtype) -> bool", &fusedattn_cpu::uses_gemm16);
  // The products of dot-product attention in dtype at the level in use: "brgemm-bf16" (oneDNN's brgemm
  // on bfloat16 VNNI operands, AVX512-BF16 or AMX), "brgemm" (its float32 kernels), "gemm16" (MKL's
  // 16-bit gemm) or "sgemm" (MKL float32).
  m.def("gemm_path(str dtype) -> str", &fusedattn_cpu::gemm_path);
}

TORCH_LIBRARY_IMPL(fusedattn_cpu, CPU, m) {
  m.impl("additive_fwd", &fusedattn_cpu::additive_fwd);
  m.impl("additive_bwd", &fusedattn_cpu::additive_bwd);
  m.impl("dot_fwd", &fusedattn_cpu::dot_fwd);
  m.impl("dot_bwd", &fusedattn_cpu::dot_bwd);
}

// The extension module itself is empty: importing it registers the ops above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
