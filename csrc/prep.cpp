// Per-call set-up of the CPU ops (declared in tiles.h): 16-bit copies, the additive factor tables,
// delta = rowsum(dout * out), and the reduction of the rel_bias gradient.
#include <cstring>

#include "scratch.h"
#include "tiles.h"

namespace fusedattn_cpu {

Low16 low16(Isa isa, const Tensor& a, const Tensor& b) {
  Low16 r;
  const auto t = a.scalar_type();
  if (isa.level == Level::avx512 && use_gemm16(t)) {
    r.a = a.contiguous();
    r.b = b.contiguous();
    r.t = t;
  }
  return r;
}

bool use_brgemm(Isa isa, at::ScalarType t) {
  // float16 keeps MKL's gemm_f16f16f32 where the CPU multiplies it in hardware (gemm.h: use_gemm16)
  return isa.level == Level::avx512 && brgemm_works(at::kFloat) && !(t == at::kHalf && use_gemm16(t));
}

namespace {

const uint16_t* u16(const Tensor& t) { return static_cast<const uint16_t*>(t.data_ptr()); }

// Layouts of the brgemm operands, each written by one copy (the padding zeroed apart). x is (B, X, L, n).
// x^T: (B, X, n, LP), columns past L zero.
Tensor transposed(const Tensor& x, int64_t LP) {
  const int64_t L = x.size(2);
  Tensor y = scratch_empty({x.size(0), x.size(1), x.size(3), LP}, x.scalar_type());
  if (LP > L) y.narrow(3, L, LP - L).zero_();
  y.narrow(3, 0, L).copy_(x.transpose(2, 3));
  return y;
}

// The same for float32 x at the avx512 level (LP >= L): 16 x 16 register transposes, in parallel.
Tensor transposed_f32(const Tensor& x, int64_t LP) {
  const int64_t BX = x.size(0) * x.size(1), L = x.size(2), n = x.size(3), L16 = round_up(L, 16);
  Tensor y = scratch_empty({x.size(0), x.size(1), n, LP}, at::kFloat);
  const float* xs = x.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  constexpr int64_t KB = 256;
  const int64_t nkb = (L + KB - 1) / KB;
  parallel_items(BX * nkb, [&](auto pull) {
    for (int64_t t; (t = pull()) >= 0;) {
      const int64_t bx = t / nkb, j0 = (t % nkb) * KB, rows = std::min(KB, L - j0);
      float* dst = yd + bx * n * LP;
      if (j0 + round_up(rows, 16) > LP) {  // the transpose writes whole 16-column blocks: via a buffer
        std::vector<float> tmp(n * round_up(rows, 16));
        avx512::transpose32(xs + (bx * L + j0) * n, n, (int)rows, (int)n, tmp.data(), round_up(rows, 16));
        for (int64_t c = 0; c < n; ++c)
          std::memcpy(dst + c * LP + j0, tmp.data() + c * round_up(rows, 16), sizeof(float) * rows);
        continue;
      }
      avx512::transpose32(xs + (bx * L + j0) * n, n, (int)rows, (int)n, dst + j0, LP);
      if (j0 + KB >= L && LP > L16)  // columns past round_up(L, 16) (the transpose zeroes those before)
        for (int64_t c = 0; c < n; ++c) std::memset(dst + c * LP + L16, 0, sizeof(float) * (LP - L16));
    }
  });
  return y;
}

// Rows as VNNI pairs: (B, X, LP / 2, n, 2), y[.., j / 2, c, j % 2] = x[.., j, c]; rows past L, and past
// the batch's key length when lens is given, zero.
Tensor vnni_rows_of(const Tensor& x, int64_t LP, const std::vector<int64_t>* lens) {
  const int64_t B = x.size(0), L = x.size(2), n = x.size(3);
  Tensor y = scratch_empty({B, x.size(1), LP / 2, n, 2}, x.scalar_type());
  Tensor yp = y.permute({0, 1, 2, 4, 3});  // (B, X, LP / 2, 2, n)
  for (int64_t par = 0; par < 2; ++par) {
    Tensor dst = yp.select(3, par);  // rows 2 t + par
    const int64_t have = (L - par + 1) / 2;
    if (have > 0) dst.narrow(2, 0, have).copy_(x.slice(2, par, L, 2));
    if (LP / 2 > have) dst.narrow(2, have, LP / 2 - have).zero_();
    if (lens == nullptr) continue;
    for (int64_t b = 0; b < B; ++b) {  // keys at or past key_lengths
      const int64_t keep = ((*lens)[b] - par + 1) / 2;
      if (keep < have) dst.select(0, b).narrow(1, keep, have - keep).zero_();
    }
  }
  return y;
}

// Columns as VNNI pairs of the transpose: (B, X, n2 / 2, LP, 2) with n2 = round_up(n, 2),
// y[.., c / 2, j, c % 2] = x[.., j, c]; the padding zero.
Tensor vnni_cols_of(const Tensor& xs, int64_t LP) {
  const Tensor x = xs.contiguous();
  const int64_t B = x.size(0), X = x.size(1), L = x.size(2), n = x.size(3), n2 = round_up(n, 2);
  Tensor y = scratch_empty({B, X, n2 / 2, LP, 2}, x.scalar_type());
  if (n2 > n || LP > L) y.zero_();
  Tensor yp = y.permute({0, 1, 3, 2, 4});  // (B, X, LP, n2 / 2, 2)
  if (n2 == n) {
    yp.narrow(2, 0, L).copy_(x.view({B, X, L, n / 2, 2}));
  } else {
    yp.narrow(2, 0, L).narrow(3, 0, n / 2).copy_(x.narrow(3, 0, n - 1).reshape({B, X, L, n / 2, 2}));
    yp.narrow(2, 0, L).select(3, n / 2).select(3, 0).copy_(x.select(3, n - 1));
  }
  return y;
}

// rows padded with zero columns to n2 (a copy only when n2 > n)
Tensor pad_cols(const Tensor& x, int64_t n2) {
  return n2 == x.size(3) ? x.contiguous() : at::constant_pad_nd(x, {0, n2 - x.size(3)});
}

bool any_padding_key(const Problem& p) {
  for (int64_t l : p.klen)
    if (l < p.Lk) return true;
  return false;
}

}  // namespace

void prepare_dot_brgemm(DotMats& m, DotScores& sc, VMats* vm, const Problem& p, const Tensor& q,
                        const Tensor& k, const Tensor& v, bool panels) {
  const int64_t LkP = spread_ld(p.Lk);
  sc.LkP = LkP;
  if (q.scalar_type() == at::kBFloat16 && brgemm_works(at::kBFloat16)) {
    const int64_t D2 = round_up(p.D, 2);  // VNNI pairs along D: one zero column for an odd D
    sc.D2 = (int)D2;
    m.qb = pad_cols(q, D2);
    sc.qb = u16(m.qb);
    if (panels && D2 == p.D) {
      m.kb = k.contiguous();
      sc.kb = u16(m.kb);
      sc.panels = true;
    } else {
      m.kTv = vnni_cols_of(k, LkP);
      sc.kTv = u16(m.kTv);
    }
    if (vm != nullptr) {
      // keys at or past key_lengths become 0: a tile with an odd number of keys reads one more row of
      // its VNNI pair (times a zero weight), and padding may hold anything
      m.vv = vnni_rows_of(v, LkP, any_padding_key(p) ? &p.klen : nullptr);
      vm->vv = u16(m.vv);
      vm->LkP = LkP;
    }
    return;
  }
  m.qf = f32(q);
  m.kf = f32(k);
  sc.q = m.qf.data_ptr<float>();
  sc.k = m.kf.data_ptr<float>();
  if (panels) {
    sc.panels = true;
  } else {
    m.kT = transposed_f32(m.kf, LkP);  // (B, Hk, D, LkP)
    sc.kT = m.kT.data_ptr<float>();
  }
  if (vm != nullptr) {
    m.vf = f32(v);
    vm->v = m.vf.data_ptr<float>();
    vm->brg = true;
  }
}

void prepare_bwd_brgemm(BwdMats& m, const Problem& p, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& dout, bool dot) {
  m.on = true;
  m.LkP = spread_ld(p.Lk);
  auto keep = [&](Tensor t) { m.keep.push_back(t); return t; };
  if (q.scalar_type() == at::kBFloat16 && brgemm_works(at::kBFloat16)) {
    m.bf16 = true;
    m.Dv2 = (int)round_up(p.Dv, 2);
    m.dob = u16(keep(pad_cols(dout.contiguous(), m.Dv2)));
    m.vTv = u16(keep(vnni_cols_of(v, m.LkP)));
    m.doT16 = u16(keep(transposed(dout, p.Lq)));
    if (dot) {
      m.kv = u16(keep(vnni_rows_of(k, m.LkP, any_padding_key(p) ? &p.klen : nullptr)));
      m.qT16 = u16(keep(transposed(q, p.Lq)));
    }
    return;
  }
  m.vT = keep(transposed_f32(f32(v), m.LkP)).data_ptr<float>();
  m.doT = keep(transposed_f32(f32(dout), p.Lq)).data_ptr<float>();
  if (dot) m.qT = keep(transposed_f32(f32(q), p.Lq)).data_ptr<float>();
}

std::vector<uint8_t> nonfinite_rows(const float* x, int64_t rows, int64_t n) {
  std::vector<uint8_t> bad(std::max<int64_t>(rows, 1), 0);
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      // inf and NaN: all exponent bits set (an integer OR reduction: vectorizes, no chain of adds)
      uint32_t any = 0;
      for (int64_t d = 0; d < n; ++d) {
        uint32_t u;
        std::memcpy(&u, x + r * n + d, 4);
        any |= (u & 0x7F800000u) == 0x7F800000u;
      }
      bad[r] = any != 0;
    }
  });
  return bad;
}

// delta_i = dout_i . out_i (accumulated in double). The one key that may dominate a row takes
// dP_ij - delta_i in another form (dominant_ds), so delta only meets the keys with P_ij <= 1/2.
std::vector<float> row_delta(const Problem& p, const float* dout, const float* out) {
  std::vector<float> delta(p.B * p.H * p.Lq);
  const int64_t Dv = p.Dv;
  at::parallel_for(0, p.B * p.H * p.Lq, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *a = dout + r * Dv, *o = out + r * Dv;
      double s[4] = {0.0, 0.0, 0.0, 0.0};  // four chains (a fixed order: the result is per row)
      int64_t d = 0;
      for (; d + 4 <= Dv; d += 4)
        for (int u = 0; u < 4; ++u) s[u] += (double)a[d + u] * o[d + u];
      for (; d < Dv; ++d) s[0] += (double)a[d] * o[d];
      delta[r] = (float)((s[0] + s[1]) + (s[2] + s[3]));
    }
  });
  return delta;
}

void prepare_additive(AddData& d, const Problem& p, const Tensor& q, const Tensor& k, const Tensor& w,
                      Isa isa, bool all_eq) {
  const int64_t A = p.D;
  d.q = f32(q);
  d.k = f32(k);
  d.w = f32(w);
  constexpr int64_t KB = AddScores::MB;  // row and key blocks of the tables' set-up
  const int64_t LkB = round_up(std::max<int64_t>(p.Lk, 1), KB), LkP = spread_ld(LkB);
  d.Eq = scratch_empty({p.B, p.H, p.Lq, A}, at::kFloat);
  d.EkT = scratch_empty({p.B, p.Hk, A, LkP}, at::kFloat);
  d.qflag = scratch_empty({p.B, p.H, p.Lq}, at::kByte);
  d.kflag = scratch_empty({p.B, p.Hk, p.Lk}, at::kByte);
  // the vector score loops' weight-scaled factors (kernels_avx2.cpp): Eq / w and 1 / w, each one
  // correctly rounded division, for the heads whose weights all admit the form
  const float* wp = d.w.data_ptr<float>();
  bool scaled = false;
  float* eqw = nullptr;
  float *qmx = nullptr, *kmx = nullptr;
  uint8_t* hs = nullptr;
  if (isa.level != Level::scalar) {
    d.iw = at::empty_like(d.w);
    d.wscaled = at::empty({p.H}, at::kByte);
    float* iwp = d.iw.data_ptr<float>();
    hs = d.wscaled.data_ptr<uint8_t>();
    // The paired loop saves per (query row, key) what its key maxima cost per key: with fewer than 16
    // query rows per key (decoding) the set-up would cost more than it saves, so those calls don't pair.
    const bool pairing = p.G * p.Lq >= 16;
    // 1: the weight-scaled loop and the paired one; 2: only the paired one (on safe tiles); 0: neither
    for (int64_t h = 0; h < p.H; ++h) {
      bool all = true, pairs = true;
      for (int64_t a = 0; a < A; ++a) {
        all &= weight_scaled_dim(iwp[h * A + a] = 1.f / wp[h * A + a]);
        pairs &= pairable_dim(wp[h * A + a]);
      }
      hs[h] = all ? 1 : pairs && pairing ? 2 : 0;
      scaled |= hs[h] != 0;
    }
    if (scaled) {
      d.Eqw = scratch_empty({p.B, p.H, p.Lq, A}, at::kFloat);
      eqw = d.Eqw.data_ptr<float>();
    }
    if (scaled && pairing) {
      // the paired form (kernels.h add_scores): pair centring, the per-head limit on max q + max k
      // (AddScores::pair_safe), the row and key maxima of q and k
      d.hw2 = at::empty({p.H, std::max<int64_t>(A / 2, 1)}, at::kFloat);
      d.plim = at::empty({p.H}, at::kFloat);
      float* h2 = d.hw2.data_ptr<float>();
      float* pl = d.plim.data_ptr<float>();
      for (int64_t h = 0; h < p.H; ++h) {
        double m = 0.0;  // max |1/w|
        for (int64_t a = 0; a < A; ++a) m = std::max(m, (double)std::fabs(iwp[h * A + a]));
        // |d| <= m (e^{2(max q + max k)} + 1) < 2^62 when m < 2^60 and max q + max k < ln(2^61 / m) / 2
        pl[h] = m < 0x1p60 ? (float)(0.5 * std::log(0x1p61 / m)) : -INFINITY;
        for (int64_t a = 0; a + 1 < A; a += 2) h2[h * (A / 2) + a / 2] = 0.5f * (wp[h * A + a] + wp[h * A + a + 1]);
      }
      d.qmax = scratch_empty({(p.B * p.H * p.Lq + KB - 1) / KB}, at::kFloat);
      d.kmax = scratch_empty({p.B * p.Hk * (LkB / KB)}, at::kFloat);
      qmx = d.qmax.data_ptr<float>();
      kmx = d.kmax.data_ptr<float>();
    }
  }
  const float* qp = d.q.data_ptr<float>();
  const float* kp = d.k.data_ptr<float>();
  float* eq = d.Eq.data_ptr<float>();
  float* ekt = d.EkT.data_ptr<float>();
  uint8_t* qf = d.qflag.data_ptr<uint8_t>();
  uint8_t* kf = d.kflag.data_ptr<uint8_t>();
  // one parallel region: items [0, nqb) are blocks of 64 query rows, the rest key blocks of 64
  // (per kv head), transposed into EkT (A, LkP); padding and flagged keys hold 1.
  const int64_t nq = p.B * p.H * p.Lq, nqb = (nq + KB - 1) / KB, nkb = LkB / KB;
  if (LkP > LkB) d.EkT.narrow(3, LkB, LkP - LkB).fill_(1.f);  // never read (tiles stop at round_up(Lk, 16))
  parallel_items(nqb + p.B * p.Hk * nkb, [&](auto pull) {
    Buf tmp(KB * A);
    for (int64_t t; (t = pull()) >= 0;) {
      if (t < nqb) {  // e^{2q}, and e^{2q} / w for the weight-scaled heads: one pass per row
        float mx = -INFINITY;
        for (int64_t r = t * KB; r < std::min(nq, (t + 1) * KB); ++r) {
          const int64_t h = (r / p.Lq) % p.H;
          const bool sw = scaled && hs[h] != 0;
          // the score loops of a head whose weights are all weight_scaled_dim read only e^{2q} / w
          float* y = all_eq || !sw || hs[h] != 1 ? eq + r * A : nullptr;
          qf[r] = exp2x_row(isa, qp + r * A, y, (int)A, kExpLimit, wp + h * A, sw ? eqw + r * A : nullptr, &mx);
        }
        if (qmx != nullptr) qmx[t] = 0.5f * std::log(mx);  // max q over the block (flagged rows hold e^0)
        continue;
      }
      t -= nqb;
      const int64_t bh = t / nkb, jb = (t % nkb) * KB;
      float* tb = tmp.data();
      float mx = -INFINITY;
      for (int64_t j = 0; j < KB; ++j) {
        const int64_t jj = jb + j;
        if (jj < p.Lk) {
          kf[bh * p.Lk + jj] = exp2x_row(isa, kp + (bh * p.Lk + jj) * A, tb + j * A, (int)A, kExpLimit, nullptr,
                                         nullptr, &mx);
          continue;
        }
        for (int64_t a = 0; a < A; ++a) tb[j * A + a] = 1.f;  // padding
        mx = std::max(mx, 1.f);
      }
      if (kmx != nullptr) kmx[t] = 0.5f * std::log(mx);  // max k over the block's keys (padding and flagged: e^0)
      float* e = ekt + bh * A * LkP + jb;
      if (isa.level == Level::avx512) {  // 16 x 16 register transposes (the scalar loop: ~1/3 of a window call's set-up)
        avx512::transpose32(tb, A, (int)KB, (int)A, e, LkP);
        continue;
      }
      for (int64_t a = 0; a < A; ++a)
        for (int64_t j = 0; j < KB; ++j) e[a * LkP + j] = tb[j * A + a];
    }
  });
  AddScores& sc = d.sc;
  sc.q = qp; sc.k = kp; sc.w = d.w.data_ptr<float>();
  sc.Eq = eq; sc.Eqw = eqw; sc.iw = scaled ? d.iw.data_ptr<float>() : nullptr; sc.wscaled = scaled ? hs : nullptr;
  if (qmx != nullptr) {
    sc.hw2 = d.hw2.data_ptr<float>(); sc.plim = d.plim.data_ptr<float>();
    sc.qmax = qmx; sc.kmax = kmx; sc.nkb = LkB / KB;
  }
  sc.EkT = ekt; sc.qflag = qf; sc.kflag = kf; sc.LkP = LkP; sc.p = &p;
}

// The rel_bias gradient (empty when there is none): the partials of items (b, hk, chunk) x G summed per
// query head h = hk*G + g, in item order (deterministic for any thread count), in double.
// Each softmax row's dS sums to 0, so the gradient of a head sums to 0 over the distances. The
// recomputed softmax (float32 lse, vector exp) and delta = dout.out leave each row a small residual
// that a distance bucket covering most of the rows' keys (a clamped edge, T5's far buckets) would sum
// over all rows: the head's total residual is taken off the distances in proportion to their
// softmax mass (the partials' second half), where a row's residual lies.
Tensor reduce_rel(const Problem& p, const std::vector<double>& part, int64_t n_items,
                  const c10::optional<Tensor>& rel_bias) {
  if (!rel_bias.has_value() || !rel_bias->defined()) return at::empty({0}, at::kFloat);
  const int64_t nrel = 2 * p.mods.M - 1;
  std::vector<double> acc(p.H * 2 * nrel, 0.0);
  for_each_partial(p, part.data(), n_items, 2 * nrel, [&](int64_t h, const double* st) {
    for (int64_t e = 0; e < 2 * nrel; ++e) acc[h * 2 * nrel + e] += st[e];
  });
  Tensor out = at::empty({p.H, nrel}, at::kFloat);
  float* o = out.data_ptr<float>();
  for (int64_t h = 0; h < p.H; ++h) {
    const double* ds = acc.data() + h * 2 * nrel;
    const double* pm = ds + nrel;
    double res = 0.0, mass = 0.0;
    for (int64_t e = 0; e < nrel; ++e) {
      res += ds[e];
      mass += pm[e];
    }
    const bool fix = std::isfinite(res) && std::isfinite(mass) && mass > 0.0;
    for (int64_t e = 0; e < nrel; ++e) o[h * nrel + e] = (float)(fix ? ds[e] - res * pm[e] / mass : ds[e]);
  }
  return out.to(rel_bias->scalar_type());
}

Tensor rel_grad_zeros(const c10::optional<Tensor>& rel_bias) {
  return rel_bias.has_value() && rel_bias->defined() ? at::zeros_like(*rel_bias) : at::empty({0}, at::kFloat);
}

}  // namespace fusedattn_cpu
