// Matrix products (gemm.h): sgemm and the mixed-precision gemms of the MKL that libtorch_cpu bundles.
#include "gemm.h"

#include <cpuid.h>
#include <dlfcn.h>

namespace fusedattn_cpu {

// Single-precision GEMM of the BLAS bundled with libtorch_cpu (column-major, Fortran interface).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c, const int* ldc);

void gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
          int ldb, float beta, float* C, int ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) C[(int64_t)i * ldc + j] = beta == 0.f ? 0.f : beta * C[(int64_t)i * ldc + j];
    return;
  }
  // row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T
  const char ca = tb ? 'T' : 'N', cb = ta ? 'T' : 'N';
  sgemm_(&ca, &cb, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

namespace {

// cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32 (MKL): layout, transa, transb as CBLAS enums, LP64 ints.
using Gemm16Fn = void (*)(int, int, int, int, int, int, float, const void*, int, const void*, int, float, float*,
                          int);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// Looked up at run time in the already loaded libtorch_cpu: a torch built without MKL simply lacks it.
Gemm16Fn lookup(const char* name) {
  void* h = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  void* f = h != nullptr ? dlsym(h, name) : nullptr;
  if (f == nullptr) f = dlsym(RTLD_DEFAULT, name);
  return reinterpret_cast<Gemm16Fn>(f);
}

Gemm16Fn fn_for(at::ScalarType t) {
  static const Gemm16Fn bf = lookup("cblas_gemm_bf16bf16f32");
  static const Gemm16Fn hf = lookup("cblas_gemm_f16f16f32");
  return t == at::kBFloat16 ? bf : t == at::kHalf ? hf : nullptr;
}

bool hw_multiplies(at::ScalarType t) {
  unsigned a = 0, b = 0, c = 0, d = 0, a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
  if (t == at::kBFloat16) return (a1 & (1u << 5)) || (d & (1u << 22));   // AVX512_BF16, AMX-BF16
  if (t == at::kHalf) return (d & (1u << 23)) || (a1 & (1u << 21));      // AVX512_FP16, AMX-FP16
  return false;
}

}  // namespace

bool use_gemm16(at::ScalarType t) {
  static const bool bf = fn_for(at::kBFloat16) != nullptr && hw_multiplies(at::kBFloat16);
  static const bool hf = fn_for(at::kHalf) != nullptr && hw_multiplies(at::kHalf);
  return t == at::kBFloat16 ? bf : t == at::kHalf ? hf : false;
}

void gemm16(at::ScalarType t, bool ta, bool tb, int M, int N, int K, float alpha, const void* A, int lda,
            const void* B, int ldb, float beta, float* C, int ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) C[(int64_t)i * ldc + j] = beta == 0.f ? 0.f : beta * C[(int64_t)i * ldc + j];
    return;
  }
  fn_for(t)(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, M, N, K, alpha, A, lda, B, ldb, beta, C,
            ldc);
}

}  // namespace fusedattn_cpu
