// The one matrix-product engine under every kernel that multiplies matrices (linear layers,
// the lm_head, the 4-bit base's dequantized tiles, attention): oneDNN's matmul primitive.
//
// oneDNN picks its kernel from the CPU at run time (avx2, avx512_core brgemm, bf16, AMX),
// so the binary built for x86-64-v3 still runs at the widest instruction set the machine
// has. Debian's libdnnl is built with the OpenMP runtime (DNNL_CPU_RUNTIME ==
// DNNL_RUNTIME_OMP, linked against libgomp), so its threads are the same pool as our own
// OpenMP regions; a product called inside one of our parallel regions runs on the calling
// thread alone.
//
// Vocabulary: a *primitive* is oneDNN's compiled kernel for one product signature (shapes,
// transposes, leading dimensions, alpha, accumulate, input format, thread count); creating
// one costs 0.3-5 ms, running it microseconds to seconds, so each signature is created
// once and kept in a small cache, shared by all threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace flotilla::kernels {

enum class Transpose : uint8_t { no, yes };

// Number format of A and B; C and the accumulation are float32 in every format.
// bf16: bfloat16 inputs (8-bit mantissa, each input rounded with relative error <= 2^-9),
// products and sums in float32 (oneDNN's avx512_core_bf16 / AMX kernels).
enum class GemmInput : uint8_t { f32, bf16 };

// C (M, N) = alpha * op(A) @ op(B) + (accumulate ? C : 0), all row-major.
// op(A) is (M, K): A is (M, K) with leading dimension lda, or (K, M) when ta == yes.
// op(B) is (K, N): B is (K, N) with leading dimension ldb, or (N, K) when tb == yes.
// C (M, N) has leading dimension ldc. K == 0 leaves C (accumulate) or zeroes it.
// Deterministic: the same call with the same thread count gives the same bits.
// Callable from several threads at once and from inside an OpenMP parallel region.
void gemm(Transpose ta, Transpose tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, bool accumulate, float* C, int64_t ldc);

// The same with A and B in bf16 (uint16_t bits as tensor/dtype.hpp's f32_to_bf16 makes
// them); C and the accumulation float32. Needs gemm_bf16_supported(): throws Error where
// oneDNN has no bf16 matmul for this CPU.
void gemm_bf16(Transpose ta, Transpose tb, int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A,
               int64_t lda, const uint16_t* B, int64_t ldb, bool accumulate, float* C, int64_t ldc);

// Whether oneDNN runs bf16 products on this CPU (avx512_core and newer: natively with
// AVX512_BF16 or AMX, emulated on plain AVX-512); false on an AVX2-only machine.
bool gemm_bf16_supported();

// out (n) = in (n) rounded to bf16 (nearest even). Multithreaded for large n.
void convert_to_bf16(const float* in, int64_t n, uint16_t* out);

// Products with fewer rows than this (decoding one token, a few prompts) go to oneDNN's
// GEMM routine (dnnl_sgemm) instead of a matmul primitive: a KV-cache step has a new shape
// every token, which would cost a primitive creation (0.3-5 ms) per token, and at one row
// dnnl_sgemm is the faster one (measured on this project's AMD EPYC, 1 thread, N x K =
// 2048 x 768: 25 against 9 GFLOP/s; at 8 rows 54 against 62, at 32 rows 95 against 114).
inline constexpr int64_t kGemmPrimitiveMinRows = 16;

// What the engine holds and runs on; for tests and `flotilla doctor`.
struct GemmEngineInfo {
  std::string library;      // "oneDNN 2.6.3 (CPU runtime: OpenMP)"
  std::string isa;          // the widest ISA oneDNN will use here, e.g. "avx512_core_bf16"
  size_t cached_primitives = 0;
};
GemmEngineInfo gemm_engine_info();

// Drops every cached primitive (tests: a fresh cache; nothing else needs it).
void gemm_clear_cache();

}  // namespace flotilla::kernels
