// Problem sizes and the argument checks of the CPU ops (checks.cpp): every bad input gets a
// TORCH_CHECK error that names the op, the argument and the shapes.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fusedattn_cpu {

struct Problem {
  int64_t B, H, Hk, G, Lq, Lk, D, Dv;
  bool causal;
  std::vector<int64_t> klen;
  // Keys j < lim(b, i) are allowed for query i.
  int64_t lim(int64_t b, int64_t i) const {
    int64_t l = klen[b];
    if (causal) l = std::min<int64_t>(l, i + Lk - Lq + 1);
    return std::max<int64_t>(l, 0);
  }
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
// key_lengths as B values in [0, Lk] (all Lk when absent).
std::vector<int64_t> read_lengths(const char* op, const c10::optional<at::Tensor>& kl, int64_t B,
                                  int64_t Lk);
void check_w(const char* op, const at::Tensor& w, const at::Tensor& q);
void check_bwd(const char* op, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
               const at::Tensor& q, const at::Tensor& v);
// float32, contiguous.
at::Tensor f32(const at::Tensor& t);
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     std::vector<int64_t> klen, bool causal);
bool empty_problem(const Problem& p);

}  // namespace fusedattn_cpu
