// serq's CPU kernels for portable: kernels.inc compiled for this instruction set alone.
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define SERQ_VEC 0
#define SERQ_VNNI 0
#include "serq_cpu.h"

namespace serq_cpu {
namespace portable {
#include "kernels.inc"
}  // namespace portable
}  // namespace serq_cpu
