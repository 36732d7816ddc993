// The backward's gradient consumers (fusedattn_cpu.cpp: backward): given dS for a (query block x key
// tile), they accumulate dq rows, the key tile's dk accumulator and per-item state. DotGrad: the matrix
// products (sgemm, or brgemm with BwdMats); AddGrad: the additive factor loops.
#pragma once

#include <cstring>
#include <vector>

#include "tiles.h"

namespace fusedattn_cpu {

// Gradient consumers: given dS for a (query tile x key tile), accumulate into
// dq rows (dqr, leading dim D), the key-tile accumulator dkacc, and per-item state.
struct DotGrad {
  const DotScores* sc;
  // rows of q (B, H, Lq) and k (B, Hk, Lk) holding a non-finite value (nonfinite_rows)
  const uint8_t* qbad;
  const uint8_t* kbad;
  const BwdMats* bm = nullptr;  // brgemm operands: dK accumulates transposed (D x BK)
  bool tr() const { return bm != nullptr && bm->on; }
  int dk_size(const Problem& p, int BK) const { return BK * (int)p.D; }
  int64_t dk_offset(const Problem& p, int ca) const { return tr() ? ca : (int64_t)ca * p.D; }
  static int dw_size(const Problem&) { return 0; }
  // rng: the allowed columns [first, valid) of each row (empty for rows with dS = 0). dS is 0 outside
  // them, but 0 * NaN is NaN: when the block's keys (queries) hold a non-finite value, dq (dk) takes
  // each row (column) over its allowed range only, so rows that never see a NaN key stay finite.
  void consume(Isa, int64_t b, int64_t h, int64_t i0, int nr, int64_t j0, int nc, float* dS,
               const int* rng, float* dqr, float* dkacc, double*) const {
    const Problem& p = *sc->p;
    const int D = (int)p.D, BK = DotScores::BK;
    const int64_t hk = h / p.G;
    const bool qok = !any_set(qbad + (b * p.H + h) * p.Lq + i0, nr);
    // (a bfloat16 block with an odd nc reads one more key row of its VNNI pair, times a zero weight)
    const int ncr = bm != nullptr && bm->bf16 ? (int)std::min<int64_t>((nc + 1) / 2 * 2, p.Lk - j0) : nc;
    const bool kok = !any_set(kbad + (b * p.Hk + hk) * p.Lk + j0, ncr);
    if (tr() && qok && kok) {
      brgemm_products(b, h, i0, nr, j0, nc, dS, dqr, dkacc);
      return;
    }
    const float alpha = sc->raw ? 1.f : sc->scale;  // raw scores: dS arrives scaled (ds_row)
    if (qok) {
      if (tr())  // dK^T += scale q^T dS
        gemm(true, false, D, nc, nr, alpha, sc->qrow(b, h, i0), D, dS, BK, 1.f, dkacc, BK);
      else
        gemm(true, false, nc, D, nr, alpha, dS, BK, sc->qrow(b, h, i0), D, 1.f, dkacc, D);
    } else {
      for (int j = 0; j < nc; ++j) {  // rows seeing column j: an interval (lo, lim non-decreasing)
        int ia = 0;
        while (ia < nr && !(rng[2 * ia] <= j && j < rng[2 * ia + 1])) ++ia;
        int ie = ia;
        while (ie < nr && rng[2 * ie] <= j && j < rng[2 * ie + 1]) ++ie;
        if (ie == ia) continue;
        if (tr())
          gemm(true, false, D, 1, ie - ia, alpha, sc->qrow(b, h, i0 + ia), D, dS + (int64_t)ia * BK + j, BK,
               1.f, dkacc + j, BK);
        else
          gemm(true, false, 1, D, ie - ia, alpha, dS + (int64_t)ia * BK + j, BK, sc->qrow(b, h, i0 + ia), D,
               1.f, dkacc + (int64_t)j * D, D);
      }
    }
    if (kok) {
      gemm(false, false, nr, D, nc, alpha, dS, BK, sc->krow(b, hk, j0), D, 1.f, dqr, D);
    } else {
      for (int i = 0; i < nr; ++i) {
        const int f = rng[2 * i], n = rng[2 * i + 1] - f;
        if (n > 0)
          gemm(false, false, 1, D, n, alpha, dS + (int64_t)i * BK + f, BK, sc->krow(b, hk, j0 + f), D, 1.f,
               dqr + (int64_t)i * D, D);
      }
    }
  }
  // dQ += scale dS K and dK^T += q^T (scale dS) through brgemm (BwdMats); dS is scaled in place, or
  // already scaled (raw scores: the driver's ds_row applied the scale).
  void brgemm_products(int64_t b, int64_t h, int64_t i0, int nr, int64_t j0, int nc, float* dS, float* dqr,
                       float* dkT) const {
    const Problem& p = *sc->p;
    const int D = (int)p.D, BK = DotScores::BK;
    const int64_t bh = b * p.H + h, bhk = b * p.Hk + h / p.G;
    if (!sc->raw)
      for (int i = 0; i < nr; ++i) avx512::scale(dS + (int64_t)i * BK, nc, sc->scale);
    if (!bm->bf16) {
      brgemm_f32(nr, D, nc, dS, BK, sc->krow(b, h / p.G, j0), D, true, dqr, D);
      brgemm_f32(D, nc, nr, bm->qT + bh * D * p.Lq + i0, (int)p.Lq, dS, BK, true, dkT, BK);
      return;
    }
    thread_local std::vector<uint16_t> R16, V16, A16;
    const int nc2 = (nc + 1) / 2 * 2, nr2 = (nr + 1) / 2 * 2;
    R16.resize((size_t)DotScores::BQ * BK);
    V16.resize((size_t)DotScores::BQ * BK);
    A16.resize((size_t)DotScores::BQ * std::max(D, 1));
    // scale * dS rounded to bfloat16 once: rows of nc2 (A of dQ) and VNNI pairs of rows (B of dK^T)
    for (int i = 0; i < nr; ++i) avx512::to_bf16(dS + (int64_t)i * BK, R16.data() + (int64_t)i * nc2, nc, nc2);
    avx512::vnni_rows(dS, BK, nr, nc, 1.f, V16.data(), nc);
    brgemm_bf16(nr, D, nc2, R16.data(), nc2, bm->kv + (bhk * bm->LkP + j0) * D, D, true, dqr, D);
    for (int d = 0; d < D; ++d) {
      std::memcpy(A16.data() + (int64_t)d * nr2, bm->qT16 + (bh * D + d) * p.Lq + i0, 2 * nr);
      if (nr2 > nr) A16[(int64_t)d * nr2 + nr] = 0;
    }
    brgemm_bf16(D, nc, nr2, A16.data(), nr2, V16.data(), nc, true, dkT, BK);
  }
  static bool any_set(const uint8_t* f, int n) {
    int a = 0;
    for (int i = 0; i < n; ++i) a |= f[i];
    return a != 0;
  }
  // dk rows j (tile-local) from the accumulator.
  void write_dk(const Problem& p, const float* dkacc, int nc, float* dk) const {
    if (!tr()) {
      std::memcpy(dk, dkacc, sizeof(float) * nc * p.D);
      return;
    }
    columns_to_rows(dkacc, DotScores::BK, (int)p.D, nc, dk);
  }
};

// dw state per (item, group member), in double: [0..A) = sum dS (r - 1/2) over fast pairs, [A..2A) =
// sum dS t over direct pairs; dw = -2 [0..A) + [A..2A). A block's sums are taken in float32 (the ISA
// kernels) and added to the state in double: the state sums every block of the item, and a float32
// state lost ~eps x (sum of |block sums|) over long sequences (a float32 case, L = 700 x 512, tanh
// saturated, missed the 2x rule for dw by 1.02x). dk accumulator: A x BK, then an A x BK buffer.
struct AddGrad {
  const AddScores* sc;
  static int dk_size(const Problem& p, int BK) { return 2 * BK * (int)p.D; }
  static int64_t dk_offset(const Problem&, int ca) { return ca; }  // a column of dkT
  static int dw_size(const Problem& p) { return 2 * (int)p.D; }
  void consume(Isa isa, int64_t b, int64_t h, int64_t i0, int nr, int64_t j0, int nc, float* dS, const int*,
               float* dqr, float* dkT, double* dwst) const {
    const Problem& p = *sc->p;
    const int A = (int)p.D, BK = AddScores::BK;
    thread_local std::vector<float> dwbuf;  // this block's dw sums
    dwbuf.assign(2 * (size_t)A, 0.f);
    float* dwb = dwbuf.data();
    const int64_t hk = h / p.G;
    const float* wh = sc->w + h * A;
    const int nc16 = (int)round_up(nc, 16);
    // pairs that need the direct tanh: handle them here and drop them from the fast kernel
    for (int i = 0; i < (sc->any_flagged(b, h, i0, nr, j0, nc) ? nr : 0); ++i) {
      for (int j = 0; j < nc; ++j) {
        float& ds = dS[i * BK + j];
        if (ds == 0.f || !sc->flagged(b, h, i0 + i, j0 + j)) continue;
        const float* x = sc->qrow(b, h, i0 + i);
        const float* y = sc->krow(b, hk, j0 + j);
        float* dq = dqr + (int64_t)i * A;
        for (int a = 0; a < A; ++a) {
          const float t = std::tanh(x[a] + y[a]);
          const float g = ds * wh[a] * (1.f - t * t);
          dq[a] += g;
          dkT[a * BK + j] += g;
          dwb[A + a] += ds * t;
        }
        ds = 0.f;
      }
    }
    // the fast kernel sums this block's dk terms into a zeroed buffer (blocked summation); dkT and
    // tmp start at the block's first column (ld BK)
    float* tmp = dkT + (int64_t)A * BK;
    for (int a = 0; a < A; ++a) std::memset(tmp + (int64_t)a * BK, 0, sizeof(float) * nc16);
    add_bwd(isa, nr, nc16, A, sc->eq(b, h, i0), sc->ekt(b, hk, j0), sc->LkP, wh, dS, BK, dqr, tmp, BK, dwb);
    for (int e = 0; e < 2 * A; ++e) dwst[e] += dwb[e];
    for (int a = 0; a < A; ++a)
      for (int j = 0; j < nc16; ++j) dkT[(int64_t)a * BK + j] += tmp[(int64_t)a * BK + j];
  }
  void write_dk(const Problem& p, const float* dkT, int nc, float* dk) const {
    const int A = (int)p.D, BK = AddScores::BK;
    for (int j = 0; j < nc; ++j)
      for (int a = 0; a < A; ++a) dk[(int64_t)j * A + a] = dkT[a * BK + j];
  }
};

}  // namespace fusedattn_cpu
