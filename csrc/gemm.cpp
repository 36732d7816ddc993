// Matrix products (gemm.h): sgemm and the mixed-precision gemms of the MKL that libtorch_cpu bundles.
#include "gemm.h"

#include <ATen/native/CPUBlas.h>
#include <cpuid.h>
#include <dlfcn.h>

#include <vector>

namespace fusedattn_cpu {

namespace {

void* lookup_symbol(const char* name) {
  void* h = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  void* f = h != nullptr ? dlsym(h, name) : nullptr;
  return f != nullptr ? f : dlsym(RTLD_DEFAULT, name);
}

// MKL picks its algorithm (and summation order) by its thread count, and a product called outside an
// OpenMP region (a call with one work item runs inline) would run on every thread: the results then
// depended on torch's thread count. Each product runs on the calling thread alone, as inside the
// work-item loops; MKL's thread-local setting is restored afterwards (0: the global one). The C entry
// point is the mixed-case name (mkl_service.h maps mkl_set_num_threads_local to it; the lower-case
// symbol is the Fortran one, which takes a pointer).
class OneMklThread {
  using SetLocal = int (*)(int);
  static SetLocal fn() {
    static const SetLocal f = reinterpret_cast<SetLocal>(lookup_symbol("MKL_Set_Num_Threads_Local"));
    return f;
  }
  int prev_ = 0;

 public:
  OneMklThread() {
    if (fn() != nullptr) prev_ = fn()(1);
  }
  ~OneMklThread() {
    if (fn() != nullptr) fn()(prev_);
  }
};

}  // namespace

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
  const OneMklThread one;
  sgemm_(&ca, &cb, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

namespace {

// cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32 (MKL): layout, transa, transb as CBLAS enums, LP64 ints.
using Gemm16Fn = void (*)(int, int, int, int, int, int, float, const void*, int, const void*, int, float, float*,
                          int);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// Looked up at run time in the already loaded libtorch_cpu: a torch built without MKL simply lacks it.
Gemm16Fn lookup(const char* name) { return reinterpret_cast<Gemm16Fn>(lookup_symbol(name)); }

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
  const OneMklThread one;
  fn_for(t)(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, M, N, K, alpha, A, lda, B, ldb, beta, C,
            ldc);
}

void brgemm_f32(int M, int N, int K, const float* A, int lda, const float* B, int ldb, bool add, float* C,
                int ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!add)
      for (int i = 0; i < M; ++i) std::fill(C + (int64_t)i * ldc, C + (int64_t)i * ldc + N, 0.f);
    return;
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, false);
}

void brgemm_bf16(int M, int N, int K, const uint16_t* A, int lda, const uint16_t* Bv, int ldb, bool add,
                 float* C, int ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!add)
      for (int i = 0; i < M; ++i) std::fill(C + (int64_t)i * ldc, C + (int64_t)i * ldc + N, 0.f);
    return;
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, reinterpret_cast<const at::BFloat16*>(A),
                              reinterpret_cast<const at::BFloat16*>(Bv), C, true);
}

void brgemm_done() { at::native::cpublas::brgemm_release(true); }

namespace {

// A 3 x 5 x 6 product with small integers (exact in bfloat16 and float32), B's rows strided by 7:
// any error (no micro-kernel for this CPU, another VNNI layout) shows as an exception or a wrong sum.
bool probe(at::ScalarType t) {
  constexpr int M = 3, N = 5, K = 6, LDB = 7;
  float a[M * K], b[K * LDB], c[M * N], want[M * N];
  for (int i = 0; i < M * K; ++i) a[i] = (float)(i % 5 - 2);
  for (int i = 0; i < K * LDB; ++i) b[i] = (float)(i % 7 - 3);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = 0.f;
      for (int k = 0; k < K; ++k) s += a[i * K + k] * b[k * LDB + j];
      want[i * N + j] = s + 1.f;
    }
  try {
    for (float& x : c) x = 1.f;
    if (t == at::kFloat) {
      brgemm_f32(M, N, K, a, K, b, LDB, true, c, N);
    } else {
      uint16_t a16[M * K], bv[K * LDB];
      for (int i = 0; i < M * K; ++i) a16[i] = c10::BFloat16(a[i]).x;
      for (int k = 0; k < K; ++k)
        for (int j = 0; j < LDB; ++j) bv[(k / 2) * 2 * LDB + 2 * j + k % 2] = c10::BFloat16(b[k * LDB + j]).x;
      brgemm_bf16(M, N, K, a16, K, bv, LDB, true, c, N);
    }
    brgemm_done();
  } catch (const std::exception&) {
    return false;
  }
  for (int i = 0; i < M * N; ++i)
    if (c[i] != want[i]) return false;
  return true;
}

}  // namespace

bool brgemm_works(at::ScalarType t) {
  static const bool f = probe(at::kFloat);
  static const bool bf = hw_multiplies(at::kBFloat16) && probe(at::kBFloat16);
  return t == at::kFloat ? f : t == at::kBFloat16 ? bf : false;
}

}  // namespace fusedattn_cpu
