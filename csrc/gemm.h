// Matrix products of the CPU kernels, all through the BLAS bundled with libtorch_cpu (gemm.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fusedattn_cpu {

// Row-major C[M x N] = alpha * op(A) * op(B) + beta * C (float32, sgemm).
void gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
          int ldb, float beta, float* C, int ldc);

// The same with A, B in bfloat16 or float16 (raw 16-bit storage) and C in float32: products and
// sums in float32 (MKL's gemm_bf16bf16f32 / gemm_f16f16f32). Only call when use_gemm16() is true.
void gemm16(at::ScalarType t, bool ta, bool tb, int M, int N, int K, float alpha, const void* A, int lda,
            const void* B, int ldb, float beta, float* C, int ldc);

// Whether dot-product attention in dtype t takes its Q.K^T and dO.V^T products from gemm16 at the
// AVX-512 level: the library exports the routine and the CPU multiplies that type in hardware
// (AVX512-BF16 or AMX-BF16 for bfloat16; AVX512-FP16 or AMX-FP16 for float16). Elsewhere the inputs
// are converted to float32 and go through sgemm, which is then the faster of the two.
bool use_gemm16(at::ScalarType t);

}  // namespace fusedattn_cpu
