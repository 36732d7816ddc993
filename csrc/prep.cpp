// Per-call set-up of the CPU ops (declared in tiles.h): 16-bit copies, the additive factor tables,
// delta = rowsum(dout * out), and the reduction of the rel_bias gradient.
#include <cstring>

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
}  // namespace

void prepare_dot_brgemm(DotMats& m, DotScores& sc, VMats* vm, const Problem& p, const Tensor& q,
                        const Tensor& k, const Tensor& v) {
  const int64_t LkP = round_up(std::max<int64_t>(p.Lk, 1), 16);
  sc.LkP = LkP;
  if (q.scalar_type() == at::kBFloat16 && brgemm_works(at::kBFloat16)) {
    const int64_t D2 = round_up(p.D, 2);  // VNNI pairs along D: one zero column for an odd D
    sc.D2 = (int)D2;
    m.qb = at::constant_pad_nd(q, {0, D2 - p.D}).contiguous();
    m.kTv = at::constant_pad_nd(k, {0, D2 - p.D, 0, LkP - p.Lk})
                .view({p.B, p.Hk, LkP, D2 / 2, 2})
                .permute({0, 1, 3, 2, 4})
                .contiguous();
    sc.qb = u16(m.qb);
    sc.kTv = u16(m.kTv);
    if (vm != nullptr) {
      // keys at or past key_lengths become 0: a tile with an odd number of keys reads one more row of
      // its VNNI pair (times a zero weight), and padding may hold anything
      Tensor klen = at::tensor(std::vector<int64_t>(p.klen.begin(), p.klen.end()), at::kLong).view({p.B, 1, 1, 1});
      Tensor keep = at::arange(LkP, at::kLong).view({1, 1, LkP, 1}) < klen;
      Tensor vp = at::constant_pad_nd(v, {0, 0, 0, LkP - p.Lk}).masked_fill(keep.logical_not(), 0);
      m.vv = vp.view({p.B, p.Hk, LkP / 2, 2, p.Dv}).permute({0, 1, 2, 4, 3}).contiguous();
      vm->vv = u16(m.vv);
      vm->LkP = LkP;
    }
    return;
  }
  m.qf = f32(q);
  m.kf = f32(k);
  m.kT = at::constant_pad_nd(m.kf.transpose(2, 3), {0, LkP - p.Lk}).contiguous();  // (B, Hk, D, LkP)
  sc.q = m.qf.data_ptr<float>();
  sc.k = m.kf.data_ptr<float>();
  sc.kT = m.kT.data_ptr<float>();
  if (vm != nullptr) {
    m.vf = f32(v);
    vm->v = m.vf.data_ptr<float>();
    vm->brg = true;
  }
}

namespace {
// rows at or past key_lengths of x (B, Hk, L, n), L >= Lk, set to 0
Tensor zero_padding_keys(const Tensor& x, const Problem& p) {
  Tensor klen = at::tensor(std::vector<int64_t>(p.klen.begin(), p.klen.end()), at::kLong).view({p.B, 1, 1, 1});
  Tensor keep = at::arange(x.size(2), at::kLong).view({1, 1, x.size(2), 1}) < klen;
  return x.masked_fill(keep.logical_not(), 0);
}
// (B, X, L, n) -> (B, X, n, L) contiguous
Tensor tr(const Tensor& x) { return x.transpose(2, 3).contiguous(); }
}  // namespace

void prepare_bwd_brgemm(BwdMats& m, const Problem& p, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& dout, bool dot) {
  m.on = true;
  m.LkP = round_up(std::max<int64_t>(p.Lk, 1), 16);
  const int64_t padk = m.LkP - p.Lk;
  auto keep = [&](Tensor t) { m.keep.push_back(t); return t; };
  if (q.scalar_type() == at::kBFloat16 && brgemm_works(at::kBFloat16)) {
    m.bf16 = true;
    m.Dv2 = (int)round_up(p.Dv, 2);
    const int64_t padv = m.Dv2 - p.Dv;
    m.dob = u16(keep(at::constant_pad_nd(dout, {0, padv}).contiguous()));
    m.vTv = u16(keep(at::constant_pad_nd(v, {0, padv, 0, padk})
                         .view({p.B, p.Hk, m.LkP, m.Dv2 / 2, 2})
                         .permute({0, 1, 3, 2, 4})
                         .contiguous()));
    m.doT16 = u16(keep(tr(dout)));
    if (dot) {
      m.kv = u16(keep(zero_padding_keys(at::constant_pad_nd(k, {0, 0, 0, padk}), p)
                          .view({p.B, p.Hk, m.LkP / 2, 2, p.D})
                          .permute({0, 1, 2, 4, 3})
                          .contiguous()));
      m.qT16 = u16(keep(tr(q)));
    }
    return;
  }
  m.vT = keep(at::constant_pad_nd(tr(f32(v)), {0, padk}).contiguous()).data_ptr<float>();
  m.doT = keep(tr(f32(dout))).data_ptr<float>();
  if (dot) m.qT = keep(tr(f32(q))).data_ptr<float>();
}

std::vector<uint8_t> nonfinite_rows(const float* x, int64_t rows, int64_t n) {
  std::vector<uint8_t> bad(std::max<int64_t>(rows, 1), 0);
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float acc = 0.f;  // x * 0 is 0 for finite x, NaN for inf and NaN (branch-free: vectorizes)
      for (int64_t d = 0; d < n; ++d) acc += x[r * n + d] * 0.f;
      bad[r] = acc != 0.f;
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
      double s = 0.0;
      for (int64_t d = 0; d < Dv; ++d) s += (double)dout[r * Dv + d] * out[r * Dv + d];
      delta[r] = (float)s;
    }
  });
  return delta;
}

void prepare_additive(AddData& d, const Problem& p, const Tensor& q, const Tensor& k, const Tensor& w,
                      Isa isa) {
  const int64_t A = p.D;
  d.q = f32(q);
  d.k = f32(k);
  d.w = f32(w);
  const int64_t LkP = round_up(std::max<int64_t>(p.Lk, 1), AddScores::BK);
  d.Eq = at::empty({p.B, p.H, p.Lq, A}, at::kFloat);
  d.EkT = at::empty({p.B, p.Hk, A, LkP}, at::kFloat);
  d.qflag = at::empty({p.B, p.H, p.Lq}, at::kByte);
  d.kflag = at::empty({p.B, p.Hk, p.Lk}, at::kByte);
  const float* qp = d.q.data_ptr<float>();
  const float* kp = d.k.data_ptr<float>();
  float* eq = d.Eq.data_ptr<float>();
  float* ekt = d.EkT.data_ptr<float>();
  uint8_t* qf = d.qflag.data_ptr<uint8_t>();
  uint8_t* kf = d.kflag.data_ptr<uint8_t>();
  // 1 when some |x| > kExpLimit or x is NaN (branch-free, so the loop vectorizes)
  auto flagged_row = [](const float* x, int64_t n) {
    int f = 0;
    for (int64_t a = 0; a < n; ++a) f |= !(std::fabs(x[a]) <= kExpLimit);
    return f != 0;
  };
  // one parallel region: items [0, nqb) are blocks of 64 query rows, the rest key blocks of 64
  // (per kv head), transposed into EkT (A, LkP); padding and flagged keys hold 1.
  constexpr int64_t KB = 64;
  const int64_t nq = p.B * p.H * p.Lq, nqb = (nq + KB - 1) / KB, nkb = LkP / KB;
  parallel_items(nqb + p.B * p.Hk * nkb, [&](auto pull) {
    Buf tmp(KB * A);
    for (int64_t t; (t = pull()) >= 0;) {
      if (t < nqb) {
        for (int64_t r = t * KB; r < std::min(nq, (t + 1) * KB); ++r) {
          const float* x = qp + r * A;
          const bool f = flagged_row(x, A);
          qf[r] = f;
          if (f) {
            for (int64_t a = 0; a < A; ++a) eq[r * A + a] = 1.f;
          } else {
            exp2x(isa, x, eq + r * A, (int)A);
          }
        }
        continue;
      }
      t -= nqb;
      const int64_t bh = t / nkb, jb = (t % nkb) * KB;
      float* tb = tmp.data();
      for (int64_t j = 0; j < KB; ++j) {
        const int64_t jj = jb + j;
        bool f = jj >= p.Lk;
        if (!f) {
          const float* y = kp + (bh * p.Lk + jj) * A;
          f = flagged_row(y, A);
          kf[bh * p.Lk + jj] = f;
          if (!f) exp2x(isa, y, tb + j * A, (int)A);
        }
        if (f)
          for (int64_t a = 0; a < A; ++a) tb[j * A + a] = 1.f;
      }
      float* e = ekt + bh * A * LkP + jb;
      for (int64_t a = 0; a < A; ++a)
        for (int64_t j = 0; j < KB; ++j) e[a * LkP + j] = tb[j * A + a];
    }
  });
  AddScores& sc = d.sc;
  sc.q = qp; sc.k = kp; sc.w = d.w.data_ptr<float>();
  sc.Eq = eq; sc.EkT = ekt; sc.qflag = qf; sc.kflag = kf; sc.LkP = LkP; sc.p = &p;
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
