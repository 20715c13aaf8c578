// serq's CPU kernels for avx512_vnni: kernels.inc compiled for this instruction set alone.
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")
#define SERQ_VEC 512
#define SERQ_VNNI 1
#include "serq_cpu.h"

namespace serq_cpu {
namespace avx512_vnni {
#include "kernels.inc"
}  // namespace avx512_vnni
}  // namespace serq_cpu
