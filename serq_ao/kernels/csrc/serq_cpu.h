// The CPU kernels of serq's packed linears: the problem descriptions shared by the torch glue
// (ops.cpp, compiled for any x86-64) and the instruction-set variants (isa_*.cpp, each
// compiled for its own target and chosen at run time). Plain C++ only: the variants must not
// include torch headers, whose inline functions the linker could otherwise take from a
// variant built for a newer CPU than the one running it.
#pragma once

#include <stdint.h>

namespace serq_cpu {

// Instruction-set paths, in order of preference; values are the `isa` argument of the ops
// (the most a call may use: a CPU that lacks it runs the best it has).
enum Isa : int { PORTABLE = 0, AVX2 = 1, AVX512 = 2, AVX512_VNNI = 3 };

enum InputDtype : int { F32 = 0, BF16 = 1, F16 = 2 };  // of activations and outputs

// float32 to bfloat16 and float16 bits, rounded to nearest even as torch's .to() rounds (NaN:
// the quiet NaN of the sign, 0x7FC0 as torch's bfloat16; float16 overflows to infinity).
inline uint16_t bfloat16_bits(float f) {
  uint32_t x;
  __builtin_memcpy(&x, &f, 4);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1)) >> 16);
}

inline uint16_t float16_bits(float f) {
  uint32_t x;
  __builtin_memcpy(&x, &f, 4);
  uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
  x &= 0x7FFFFFFFu;
  if (x > 0x7F800000u) return sign | 0x7E00;  // NaN
  if (x >= 0x477FF000u) return sign | 0x7C00;  // 65520 and up round to infinity
  if (x < 0x38800000u) {  // below 2^-14: a subnormal (or zero), f * 2^24 rounded to an integer
    float scaled, magic = 8388608.0f;  // + 2^23 rounds to nearest even integer in the last place
    __builtin_memcpy(&scaled, &x, 4);
    float rounded = scaled * 16777216.0f + magic;
    uint32_t bits;
    __builtin_memcpy(&bits, &rounded, 4);
    return sign | (uint16_t)(bits - 0x4B000000u);  // 1024 is the smallest normal, encoded alike
  }
  return sign | (uint16_t)((x - 0x38000000u + 0xFFFu + ((x >> 13) & 1)) >> 13);  // rebias, round 13 bits
}

// Output element `at` of a GEMM's (M, N) result, in `dtype` (InputDtype).
inline void write_output(void* out, int dtype, int64_t at, float y) {
  if (dtype == F32) ((float*)out)[at] = y;
  else ((uint16_t*)out)[at] = dtype == BF16 ? bfloat16_bits(y) : float16_bits(y);
}

// The activation side of a linear: x (M, K) rows, the pre-op's parts (each may be absent).
struct ActInput {
  const void* x;
  int dtype;            // InputDtype
  int64_t row_stride;   // elements between rows
  int64_t k;            // d_in
  const float* scale_inv;  // (K,) or null
  const int32_t* perm;     // (K,) or null, checked to lie in [0, K) by the caller
  int rotation;            // block Hadamard size, 0: none
};

// Quantized activations in the form the GEMMs read: per row, `ka` unsigned bytes (codes moved
// to u8: MXFP4 doubled-grid value + 12, INT the asymmetric code), zero past the quantized
// columns; per block of 32 columns a float scale and a float zero point (the offset), so that
// the value of column k is (u8 - zero) * scale.
struct ActOperand {
  int64_t ka;        // bytes per row: a multiple of 512, >= the widest activation segment read
  uint8_t* u8;       // (M, ka)
  float* scale;      // (M, ka / 32)
  float* zero;       // (M, ka / 32)
  // for the decode kernel (null otherwise): u8's even and odd columns apart, (M, ka / 2) each,
  // as the two nibbles of a code byte hold them; scale and zero per 8 columns, (M, ka / 8)
  uint8_t* even;  // in 16-block groups transposed for AVX-512 (kernels.inc), else as even_in_order
  uint8_t* odd;
  uint8_t* even_in_order;
  uint8_t* odd_in_order;
  float* scale_lane;
  float* zero_lane;
  // MXFP4 for the prepacked kernel (null otherwise): the codes' values (the doubled grid) as
  // signed bytes, (M, ka), and 12 times their sum per block of 32, (M, ka / 32): the kernel
  // multiplies them by the weight's values + 12 (unsigned), so that no weight sums are needed
  int8_t* s8;
  int32_t* offset_sum;  // the kernel starts its int32 sums there, negated
};

// One stretch of a weight row: bytes of two 4-bit codes each (element 2i low nibble), whose
// element 0 multiplies activation column `act_k` and sits at column `k` of K' = Kp + r.
struct WeightSegment {
  const uint8_t* codes;
  int64_t row_stride;  // bytes
  int64_t bytes;       // per row (0: segment absent)
  int64_t act_k;       // a multiple of 32
  int64_t k;           // a multiple of 32
};

enum WeightScaleKind : int { E8M0_BYTES = 0, INT_GROUPS = 1 };

struct GemmProblem {
  int64_t m, n;
  WeightSegment segment[2];  // main W^q, then the correction R
  const int8_t* nibble_values;  // (16,) value of each 4-bit code (MXFP4: doubled E2M1 grid)
  int scale_kind;               // WeightScaleKind
  // E8M0_BYTES: (N, K'/32) bytes covering both segments, value 2^(byte - 127)
  const uint8_t* e8m0;
  int64_t e8m0_row_stride;
  // INT_GROUPS: main scales (N, groups) float per `group_size` columns; correction (N,) float
  const float* group_scale;
  int64_t group_scale_row_stride;
  int64_t group_size;
  const float* correction_scale;
  // columns that share one activation and one weight scale, over which the prefill kernel
  // sums in int32: 32 (MXFP4), the group size (INT, a multiple of 32)
  int64_t block_columns;
  const ActOperand* act;
  const float* bias;  // (N,) or null
  void* out;          // (M, N) row-major, in out_dtype (InputDtype: x's, as torch's linear returns)
  int out_dtype;
  // the codes of both segments prepacked in panels (prepack_panels below), or null: the
  // segments' codes as stored. Read by gemm_prefill alone.
  const uint8_t* panels;
  // with act->s8: (16,) each 4-bit weight code's value + 12, unsigned
  const int8_t* offset_values;
  // with panels, MXFP4: the E8M0 bytes in panel order, (N / P, K' / 32, P), or null: e8m0
  const uint8_t* panel_e8m0;
};

// Prepacked weights (the `prepack_weight` op): the codes of K' = Kp + r, zeros up to whole
// groups of block_columns, rearranged once into the order the prefill kernel reads, still 4 bits
// a value. Per panel of P = prefill_columns output columns (N padded to a multiple of P with
// zeros), per quad q of 4 columns of K', 2P bytes: byte 4c + i holds (column n0 + c, k = 4q + i)
// in its low nibble and (column n0 + P/2 + c, same k) in its high nibble. A table lookup of the
// two nibbles of one vector load gives the two vectors the kernel multiplies, with no store.
inline int64_t panel_quads(int64_t columns, int64_t block_columns) {  // quads per panel, K' = columns
  return (columns + block_columns - 1) / block_columns * block_columns / 4;
}

// A float activation times an int8 weight with one float scale per weight row (a tied LM head /
// embedding table stored as int8): out[m, n] = (sum_k x[m, k] * w[n, k]) * scale[n] + bias[n].
// Numerics: the codes are exact as floats; the sum is float32 (vector variants: per-lane fused
// multiply-adds, a reduction, then the k past the last whole vector in order; portable: in
// order), then the scale and the bias, so |out - exact| <= gamma(K + 2) (scale sum_k |x| |w| +
// |bias|), gamma(n) = n u / (1 - n u), u = 2^-24.
struct Int8WeightsProblem {
  int64_t m, n, k;
  const float* x;        // (M, K) rows, or null: x_bf16
  const uint16_t* x_bf16;  // (M, K) bfloat16 rows (the AVX512_BF16 kernel reads these), or null
  int64_t x_row_stride;  // elements
  const int8_t* w;       // (N, K) rows
  int64_t w_row_stride;  // bytes
  const float* scale;    // (N,)
  const float* bias;     // (N,) or null
  void* out;             // (M, N) row-major, in out_dtype (InputDtype)
  int out_dtype;
};

// The variant of one instruction set; `rows` kernels take output rows [n0, n1) for every m.
struct Kernels {
  void (*quantize_mxfp4)(const ActInput& in, int64_t m0, int64_t m1, bool rceil, uint8_t* codes,
                         int64_t codes_stride, uint8_t* scales, int64_t scales_stride, const ActOperand* op);
  void (*quantize_int)(const ActInput& in, int64_t m0, int64_t m1, int bits, int64_t group, uint8_t* q,
                       int64_t q_stride, float* scale, int32_t* zero, int64_t groups_stride, const ActOperand* op);
  void (*gemm_decode)(const GemmProblem& p, int64_t n0, int64_t n1);  // few rows of activations
  void (*gemm_prefill)(const GemmProblem& p, int64_t n0, int64_t n1);  // many rows
  int prefill_columns;  // n0, n1 of gemm_prefill are multiples of this (1: no panels, no prepacking)
  void (*gemm_int8_weights)(const Int8WeightsProblem& p, int64_t n0, int64_t n1);  // columns [n0, n1), every row
};

namespace portable { Kernels kernels(); }
namespace avx2 { Kernels kernels(); }
namespace avx512 { Kernels kernels(); }
namespace avx512_vnni { Kernels kernels(); }
// for bfloat16 activations where the CPU has AVX512_BF16 (isa_avx512_bf16.cpp)
namespace avx512_bf16 { void gemm_int8_weights_bf16(const Int8WeightsProblem& p, int64_t n0, int64_t n1); }

}  // namespace serq_cpu
