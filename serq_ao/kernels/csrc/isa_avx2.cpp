// serq's CPU kernels for avx2: kernels.inc compiled for this instruction set alone.
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#pragma GCC target("avx2,fma,f16c")
#define SERQ_VEC 256
#define SERQ_VNNI 0
#include "serq_cpu.h"

namespace serq_cpu {
namespace avx2 {
#include "kernels.inc"
}  // namespace avx2
}  // namespace serq_cpu
