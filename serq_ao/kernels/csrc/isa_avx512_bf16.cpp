// linear_int8_weights for bfloat16 activations on CPUs with AVX512_BF16 (`vdpbf16ps`): two
// products per float32 lane and instruction, twice the rate of float32 FMAs. Compiled for this
// instruction set alone; ops.cpp calls it only where the CPU has it, x is bfloat16 and the
// caller allows AVX-512.
//
// Numerics: a code |q| <= 127 is exact in bfloat16, and a bfloat16 times a bfloat16 is exact in
// float32, so every product is exact as in the float32 path; the float32 sums differ only in
// order (lane pairs), within the same gamma(K + 2) bound. vdpbf16ps treats subnormal inputs
// and results as zero: at most 127 * 2^-126 per product lost (cpu_native.int8_weights_error_bound).
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
#include "serq_cpu.h"

namespace serq_cpu {
namespace avx512_bf16 {
namespace {

const int KB = 32;    // k per vector: 32 bfloat16 values
const int COLS = 4;   // weight rows per tile
const int ROWS = 4;   // x rows per tile: 16 accumulators + 4 weight vectors + 1 x vector of 32 zmm

inline float bf16_float(uint16_t bits) {
  uint32_t value = (uint32_t)bits << 16;
  float f;
  memcpy(&f, &value, 4);
  return f;
}

inline __m512bh widen(const int8_t* p) {  // 32 codes -> 32 bfloat16, exactly
  __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
  return _mm512_cvtne2ps_pbh(high, low);  // lanes 0-15 from low
}

inline __m512bh load_bh(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

// Lane l of the result: the sum of v[l]'s 16 lanes, for 16 vectors at once (45 shuffles and adds
// where 16 reductions took ~130). Each sum's order depends on its own vector alone, so an output
// is summed alike whatever tile it falls in.
inline __m512 sum_lanes(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int q = 0; q < 8; ++q)  // per 128-bit lane: (v0 0+2, v1 0+2, v0 1+3, v1 1+3) of v = v[2q], v[2q+1]
    pairs[q] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * q], v[2 * q + 1]), _mm512_unpackhi_ps(v[2 * q], v[2 * q + 1]));
  for (int q = 0; q < 4; ++q) {  // per 128-bit lane: one partial sum of each of v[4q .. 4q + 3]
    __m512d a = _mm512_castps_pd(pairs[2 * q]), b = _mm512_castps_pd(pairs[2 * q + 1]);
    quads[q] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // the four 128-bit lanes of each quad summed, quad q into 128-bit lane q
  __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x44), _mm512_shuffle_f32x4(quads[0], quads[1], 0xEE));
  __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x44), _mm512_shuffle_f32x4(quads[2], quads[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x88), _mm512_shuffle_f32x4(low, high, 0xDD));
}

// x rows [m, m + RM) against weight rows [n, n + RN); `widened`: their first K - K % 32 codes as
// bfloat16, rows `stride` apart, or null: widen them here.
template <int RM, int RN>
void tile(const Int8WeightsProblem& p, int64_t m, int64_t n, const uint16_t* widened, int64_t stride) {
  const int64_t vector_k = p.k - p.k % KB;
  const uint16_t* x[RM];
  const int8_t* w[RN];
  for (int i = 0; i < RM; ++i) x[i] = p.x_bf16 + (m + i) * p.x_row_stride;
  for (int j = 0; j < RN; ++j) w[j] = p.w + (n + j) * p.w_row_stride;
  __m512 acc[RM][RN];
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < RN; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < vector_k; k += KB) {
    __m512bh wv[RN];
    for (int j = 0; j < RN; ++j) wv[j] = widened ? load_bh(widened + j * stride + k) : widen(w[j] + k);
    for (int i = 0; i < RM; ++i) {
      __m512bh xv = load_bh(x[i] + k);
      for (int j = 0; j < RN; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
  __m512 lanes[ROWS * COLS];  // output (i, j) at 4 i + j; zeros where the tile is smaller
  for (int l = 0; l < ROWS * COLS; ++l) lanes[l] = l / COLS < RM && l % COLS < RN ? acc[l / COLS][l % COLS] : _mm512_setzero_ps();
  float sums[ROWS * COLS];
  _mm512_storeu_ps(sums, sum_lanes(lanes));
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < RN; ++j) {
      float sum = sums[COLS * i + j];
      for (int64_t k = vector_k; k < p.k; ++k) sum += bf16_float(x[i][k]) * (float)w[j][k];  // exact product
      float value = sum * p.scale[n + j];
      if (p.bias) value = value + p.bias[n + j];
      write_output(p.out, p.out_dtype, (m + i) * p.n + n + j, value);
    }
}

template <int RM>
void columns(const Int8WeightsProblem& p, int64_t m, int64_t n, int64_t count, const uint16_t* widened,
             int64_t stride) {
  switch (count) {
    case 4: tile<RM, 4>(p, m, n, widened, stride); break;
    case 3: tile<RM, 3>(p, m, n, widened, stride); break;
    case 2: tile<RM, 2>(p, m, n, widened, stride); break;
    default: tile<RM, 1>(p, m, n, widened, stride); break;
  }
}

}  // namespace

void gemm_int8_weights_bf16(const Int8WeightsProblem& p, int64_t n0, int64_t n1) {
  const int64_t stride = p.k - p.k % KB;
  // with more x rows than one tile, each tile's codes are widened once (as in int8_weights.inc)
  uint16_t* widened = p.m > ROWS && stride ? (uint16_t*)malloc((size_t)(COLS * stride) * sizeof(uint16_t)) : nullptr;
  for (int64_t n = n0; n < n1; n += COLS) {
    int64_t count = n1 - n < COLS ? n1 - n : COLS, m = 0;
    if (widened)
      for (int64_t j = 0; j < count; ++j)
        for (int64_t k = 0; k < stride; k += KB)
          _mm512_storeu_si512(widened + j * stride + k, (__m512i)widen(p.w + (n + j) * p.w_row_stride + k));
    for (; m + ROWS <= p.m; m += ROWS) columns<ROWS>(p, m, n, count, widened, stride);
    switch (p.m - m) {
      case 3: columns<3>(p, m, n, count, widened, stride); break;
      case 2: columns<2>(p, m, n, count, widened, stride); break;
      case 1: columns<1>(p, m, n, count, widened, stride); break;
      default: break;
    }
  }
  free(widened);
}

}  // namespace avx512_bf16
}  // namespace serq_cpu
