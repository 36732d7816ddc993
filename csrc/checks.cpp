// Argument checks and problem sizes of the CPU ops (declared in checks.h).
#include "checks.h"
#include "scratch.h"

namespace fusedattn_cpu {

using at::Tensor;

void check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  for (const Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->defined(), op, ": undefined tensor");
    TORCH_CHECK(t->device().is_cpu(), op, ": tensors must be on the CPU, got ", t->device());
    TORCH_CHECK(t->dim() == 4, op, ": q, k, v must have 4 dimensions, got shape ", t->sizes());
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 ||
                  q.scalar_type() == at::kHalf,
              op, ": dtype must be float32, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hk = k.size(1), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, op, ": batch sizes differ: q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.size(3) == D, op, ": q and k head dims differ: q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(v.size(1) == Hk && v.size(2) == Lk, op, ": k and v must agree in heads and length: k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(Hk > 0 ? H % Hk == 0 : H == 0, op, ": H=", H, " must be a multiple of Hk=", Hk);
}

std::vector<int64_t> read_lengths(const char* op, const c10::optional<Tensor>& kl, int64_t B,
                                  int64_t Lk) {
  std::vector<int64_t> out(B, Lk);
  if (!kl.has_value() || !kl->defined()) return out;
  const Tensor& t = *kl;
  TORCH_CHECK(t.device().is_cpu(), op, ": key_lengths must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": key_lengths must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, op, ": key_lengths must have shape (", B, ",), got ",
              t.sizes());
  Tensor c = t.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(p[b] >= 0 && p[b] <= Lk, op, ": key_lengths[", b, "]=", p[b], " not in [0, ", Lk, "]");
    out[b] = p[b];
  }
  return out;
}

void check_w(const char* op, const Tensor& w, const Tensor& q) {
  TORCH_CHECK(w.defined() && w.device().is_cpu(), op, ": w must be a CPU tensor");
  TORCH_CHECK(w.scalar_type() == q.scalar_type(), op, ": w dtype ", w.scalar_type(),
              " differs from q dtype ", q.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == q.size(1) && w.size(1) == q.size(3), op,
              ": w must have shape (H, D) = (", q.size(1), ", ", q.size(3), "), got ", w.sizes());
}

void check_bwd(const char* op, const Tensor& dout, const Tensor& out, const Tensor& lse,
               const Tensor& q, const Tensor& v) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Dv = v.size(3);
  for (const Tensor* t : {&dout, &out}) {
    TORCH_CHECK(t->defined() && t->device().is_cpu(), op, ": dout and out must be CPU tensors");
    // out may also be the forward's float32 result (before rounding to the input dtype)
    TORCH_CHECK(t->scalar_type() == q.scalar_type() || (t == &out && t->scalar_type() == at::kFloat), op,
                ": dout/out dtype ", t->scalar_type(), " differs from q dtype ", q.scalar_type());
    TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == H && t->size(2) == Lq &&
                    t->size(3) == Dv,
                op, ": dout/out must have shape (", B, ", ", H, ", ", Lq, ", ", Dv, "), got ", t->sizes());
  }
  TORCH_CHECK(lse.defined() && lse.device().is_cpu() && lse.scalar_type() == at::kFloat, op,
              ": lse must be a float32 CPU tensor");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == Lq, op,
              ": lse must have shape (", B, ", ", H, ", ", Lq, "), got ", lse.sizes());
}

Tensor f32(const Tensor& t) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t;
  // a converted or strided input (bfloat16, a transposed view such as a packed (total, H, D) batch):
  // the copy in scratch memory, whose pages the last call already touched
  Tensor c = scratch_empty(t.sizes(), at::kFloat);
  c.copy_(t);
  return c;
}

Problem make_problem(const Tensor& q, const Tensor& k, const Tensor& v,
                     std::vector<int64_t> klen, bool causal) {
  scratch_budget_bytes();  // FUSEDATTN_CPU_SCRATCH_MIB checked on every op's first call
  Problem p;
  p.B = q.size(0); p.H = q.size(1); p.Lq = q.size(2); p.D = q.size(3);
  p.Hk = k.size(1); p.Lk = k.size(2); p.Dv = v.size(3);
  p.G = p.Hk > 0 ? p.H / p.Hk : 1;
  p.causal = causal;
  p.klen = std::move(klen);
  return p;
}

bool empty_problem(const Problem& p) { return p.B == 0 || p.H == 0 || p.Lq == 0 || p.Lk == 0; }

namespace {
std::vector<int64_t> read_cu(const char* op, const char* name, const Tensor& t, int64_t total) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) >= 1, op, ": ", name, " must have shape (batch + 1,), got ", t.sizes());
  const Tensor c = t.contiguous();
  const int32_t* x = c.data_ptr<int32_t>();
  std::vector<int64_t> out(t.size(0));
  for (int64_t s = 0; s < t.size(0); ++s) {
    out[s] = x[s];
    TORCH_CHECK(s > 0 || x[0] == 0, op, ": ", name, " must start at 0, got ", x[0]);
    TORCH_CHECK(s == 0 || x[s] >= x[s - 1], op, ": ", name, " must be non-decreasing, got ", x[s - 1],
                " then ", x[s], " at ", s);
  }
  TORCH_CHECK(out.back() == total, op, ": ", name, " must end at the packed total ", total, ", got ",
              out.back());
  return out;
}
}  // namespace

void set_varlen(const char* op, Problem& p, const c10::optional<Tensor>& cu_q, const c10::optional<Tensor>& cu_k,
                bool has_key_lengths) {
  const bool hq = cu_q.has_value() && cu_q->defined(), hk = cu_k.has_value() && cu_k->defined();
  if (!hq && !hk) return;
  TORCH_CHECK(hq && hk, op, ": cu_seqlens_q and cu_seqlens_k go together");
  TORCH_CHECK(p.B == 1, op, ": packed sequences take q of shape (1, H, total_q, D), got batch ", p.B);
  TORCH_CHECK(!has_key_lengths, op, ": key_lengths and cu_seqlens exclude each other");
  p.cq = read_cu(op, "cu_seqlens_q", *cu_q, p.Lq);
  p.ck = read_cu(op, "cu_seqlens_k", *cu_k, p.Lk);
  TORCH_CHECK(p.cq.size() == p.ck.size(), op, ": cu_seqlens_q and cu_seqlens_k must have the same length, got ",
              p.cq.size(), " and ", p.ck.size());
  p.seq.resize(p.Lq);
  for (int64_t s = 0; s + 1 < (int64_t)p.cq.size(); ++s)
    for (int64_t i = p.cq[s]; i < p.cq[s + 1]; ++i) p.seq[i] = (int32_t)s;
}

}  // namespace fusedattn_cpu
