// Matrix products of the CPU kernels, all through libraries libtorch_cpu bundles (gemm.cpp): MKL's
// sgemm, its mixed-precision gemms, and oneDNN's brgemm micro-kernels (at::native::cpublas::brgemm).
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

// oneDNN's batch-reduce GEMM micro-kernel through libtorch (at::native::cpublas::brgemm; JIT-compiled
// per shape on first use and cached per thread): row-major C[M x N] = A[M x K] B[K x N] (+ C when add).
// No packing of A or B per call, so small tiles run near the FMA peak (Zen 4, one thread, M=32 N=304
// K=64: 113 GFLOP/s against MKL sgemm's 90). float32; or bfloat16 A (lda >= K, K even) with B in VNNI
// pairs, B[k][n] at Bv[(k / 2) * 2 * ldb + 2 * n + k % 2] (AVX512-BF16 dot products, float32 sums).
void brgemm_f32(int M, int N, int K, const float* A, int lda, const float* B, int ldb, bool add, float* C,
                int ldc);
void brgemm_bf16(int M, int N, int K, const uint16_t* A, int lda, const uint16_t* Bv, int ldb, bool add,
                 float* C, int ldc);
// Whether the brgemm path serves dtype t (float32; bfloat16 only where the CPU has AVX512-BF16 or AMX):
// libtorch has the micro-kernels for this CPU and a probe product (run once per process) is exact.
bool brgemm_works(at::ScalarType t);
// Releases the AMX tile state brgemm may hold on this thread (a no-op elsewhere); call after a run of
// brgemm calls, before the thread leaves the parallel region.
void brgemm_done();

}  // namespace fusedattn_cpu
