// The torch side of serq's CPU kernels: argument checks, buffers, threads (torch's intra-op
// pool, so torch.set_num_threads governs them), and the ops `serq_cpu::*` that
// serq_ao/kernels/cpu_native.py calls. Compiled for any x86-64; the instruction-set variants
// (isa_*.cpp) are chosen per call by the `isa` argument, which Python picks once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "serq_cpu.h"

namespace serq_cpu {
namespace {

const int8_t kDoubledE2M1[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
const int8_t kOffsetE2M1[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};  // + 12
const int8_t kInt4[16] = {0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1};
const int64_t kDecodeRows = 8;  // up to this many rows, the decode kernel (weights read as packed)

int64_t detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return __builtin_cpu_supports("avx512vnni") ? AVX512_VNNI : AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return AVX2;
  return PORTABLE;
}

int64_t cpu_isa() {
  static const int64_t best = detect_isa();
  return best;
}

bool has_avx512_bf16() {
  static const bool has = cpu_isa() >= AVX512 && __builtin_cpu_supports("avx512bf16");
  return has;
}

// `isa` is the most the caller allows: code compiled ahead of time carries the value of the
// machine that compiled it, and runs on a lesser CPU with the best that CPU has.
Kernels kernels_for(int64_t isa) {
  TORCH_CHECK(isa >= PORTABLE && isa <= AVX512_VNNI, "serq_cpu: isa must be 0..3, got ", isa);
  switch (std::min(isa, cpu_isa())) {
    case AVX512_VNNI: return avx512_vnni::kernels();
    case AVX512: return avx512::kernels();
    case AVX2: return avx2::kernels();
    default: return portable::kernels();
  }
}

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// x (..., K) as (M, K) rows of float32, bfloat16 or float16 (float64 is rounded to float32
// first, as the reference does), and the pre-op's parts, checked; perm's values are read, so
// that no kernel reads outside x whatever a file holds. Owns what it converted.
struct Input {
  at::Tensor x, scale_inv, perm;
  ActInput in{};

  Input(const at::Tensor& x_any, int64_t in_features, const c10::optional<at::Tensor>& scale_inv_arg,
        const c10::optional<at::Tensor>& perm_arg, int64_t rotation) {
    TORCH_CHECK(x_any.dim() >= 1 && x_any.size(-1) == in_features, "serq_cpu: x has ",
                x_any.dim() ? x_any.size(-1) : 0, " columns, the weight ", in_features);
    TORCH_CHECK(in_features > 0, "serq_cpu: in_features must be positive");
    auto dtype = x_any.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
                "serq_cpu: x must be float32, bfloat16, float16 or float64, got ", dtype);
    x = x_any.reshape({-1, in_features});
    if (dtype == at::kDouble) x = x.to(at::kFloat);
    if (x.stride(1) != 1 || (x.size(0) > 1 && x.stride(0) < in_features)) x = x.contiguous();
    in.x = x.data_ptr();
    dtype = x.scalar_type();
    in.dtype = dtype == at::kFloat ? F32 : (dtype == at::kBFloat16 ? BF16 : F16);
    in.row_stride = x.size(0) > 1 ? x.stride(0) : in_features;
    in.k = in_features;
    if (scale_inv_arg.has_value()) {
      scale_inv = scale_inv_arg->to(at::kFloat).contiguous();
      TORCH_CHECK(scale_inv.dim() == 1 && scale_inv.size(0) == in_features,
                  "serq_cpu: scale_inv must have shape (", in_features, ",), got ", scale_inv.sizes());
      in.scale_inv = scale_inv.data_ptr<float>();
    }
    if (perm_arg.has_value()) {
      TORCH_CHECK(!at::isFloatingType(perm_arg->scalar_type()) && perm_arg->scalar_type() != at::kBool,
                  "serq_cpu: perm must be an integer tensor, got ", perm_arg->scalar_type());
      perm = perm_arg->to(at::kInt).contiguous();  // stored as int16 where it fits
      TORCH_CHECK(perm.dim() == 1 && perm.size(0) == in_features,
                  "serq_cpu: perm must have shape (", in_features, ",), got ", perm.sizes());
      const int32_t* values = perm.data_ptr<int32_t>();
      for (int64_t j = 0; j < in_features; ++j)
        TORCH_CHECK(values[j] >= 0 && values[j] < in_features, "serq_cpu: perm[", j, "] = ", values[j],
                    " is not a column of x (0..", in_features - 1, ")");
      in.perm = values;
    }
    TORCH_CHECK(rotation >= 0 && rotation <= 4096 && (rotation & (rotation - 1)) == 0,
                "serq_cpu: rotation must be 0 or a power of two, got ", rotation);
    in.rotation = (int)rotation;
  }
};

// A GEMM's (M, N) result in the dtype of x, as the reference returns it: the kernels round
// their float32 sums to bfloat16 / float16 as they store them (one pass, no float32 copy);
// float64 is computed in float32 (the reference's rounding) and widened.
struct Output {
  at::Tensor tensor;
  Output(int64_t m, int64_t n, const at::Tensor& x) {
    auto dtype = x.scalar_type() == at::kDouble ? at::kFloat : x.scalar_type();
    tensor = at::empty({m, n}, at::TensorOptions().dtype(dtype));
  }
  void* data() { return tensor.data_ptr(); }
  int dtype() const {
    auto t = tensor.scalar_type();
    return t == at::kFloat ? F32 : (t == at::kBFloat16 ? BF16 : F16);
  }
  at::Tensor shaped(const at::Tensor& x) const {  // (..., N) as x's leading shape
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = tensor.size(1);
    return tensor.to(x.scalar_type()).view(shape);  // .to: a no-op but for float64
  }
};

// Buffers of the activation operand, carved from one allocation (a decode-sized linear runs
// in microseconds: ten allocations were a sixth of it); `decode` adds the decode kernel's layouts,
// `signed_codes` the signed ones of the prepacked MXFP4 kernel.
struct Operand {
  at::Tensor storage;
  ActOperand op{};
  Operand(int64_t m, int64_t k_padded, bool decode, bool signed_codes = false) {
    int64_t ka = round_up(k_padded, 512);  // whole groups of 256 code bytes for the decode kernel
    int64_t codes = round_up(m * ka, 64), halves = round_up(m * ka / 2, 64);
    int64_t blocks = round_up(m * ka / 32 * 4, 64), lanes = round_up(m * ka / 8 * 4, 64);
    int64_t bytes = codes + 2 * blocks + (decode ? 4 * halves + 2 * lanes : 0) + (signed_codes ? codes + blocks : 0);
    storage = at::empty({bytes + 64}, at::TensorOptions().dtype(at::kByte));
    uint8_t* next = storage.data_ptr<uint8_t>();
    next += (64 - reinterpret_cast<uintptr_t>(next) % 64) % 64;  // every piece on a cache line
    auto take = [&next](int64_t size) { uint8_t* piece = next; next += size; return piece; };
    op.ka = ka;
    op.u8 = take(codes);
    op.scale = reinterpret_cast<float*>(take(blocks));
    op.zero = reinterpret_cast<float*>(take(blocks));
    if (decode) {
      op.even = take(halves);
      op.odd = take(halves);
      op.even_in_order = take(halves);
      op.odd_in_order = take(halves);
      op.scale_lane = reinterpret_cast<float*>(take(lanes));
      op.zero_lane = reinterpret_cast<float*>(take(lanes));
    }
    if (signed_codes) {
      op.s8 = reinterpret_cast<int8_t*>(take(codes));
      op.offset_sum = reinterpret_cast<int32_t*>(take(blocks));
    }
  }
};

bool use_decode(int64_t m, int64_t gemm) {
  TORCH_CHECK(gemm >= 0 && gemm <= 2, "serq_cpu: gemm must be 0 (by rows), 1 (decode) or 2 (prefill), got ", gemm);
  return gemm == 1 || (gemm == 0 && m <= kDecodeRows);
}

const uint8_t* checked_codes(const at::Tensor& t, int64_t rows, int64_t bytes, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kByte && t.dim() == 2 && t.size(0) == rows && t.size(1) == bytes &&
                  (bytes == 0 || t.stride(1) == 1),
              "serq_cpu: ", name, " must be a uint8 (", rows, ", ", bytes, ") tensor with contiguous rows, got ",
              t.sizes());
  return t.data_ptr<uint8_t>();
}

void run_gemm(const Kernels& k, GemmProblem& p, bool decode) {
  if (decode) {
    at::parallel_for(0, p.n, 16, [&](int64_t n0, int64_t n1) { k.gemm_decode(p, n0, n1); });
    return;
  }
  int64_t width = k.prefill_columns, panels = (p.n + width - 1) / width;
  at::parallel_for(0, panels, 1, [&](int64_t b0, int64_t b1) {
    k.gemm_prefill(p, b0 * width, std::min(p.n, b1 * width));
  });
}

void quantize_rows(int64_t m, const std::function<void(int64_t, int64_t)>& body) {
  at::parallel_for(0, m, 4, body);
}

std::tuple<at::Tensor, at::Tensor> quantize_mxfp4(const at::Tensor& x, const c10::optional<at::Tensor>& scale_inv,
                                                  const c10::optional<at::Tensor>& perm, int64_t rotation, bool rceil,
                                                  int64_t isa) {
  Input input(x, x.size(-1), scale_inv, perm, rotation);
  const ActInput& in = input.in;
  Kernels k = kernels_for(isa);
  int64_t m = input.x.size(0), blocks = (in.k + 31) / 32;
  auto codes = at::empty({m, blocks * 16}, at::TensorOptions().dtype(at::kByte));
  auto scales = at::empty({m, blocks}, at::TensorOptions().dtype(at::kByte));
  uint8_t *c = codes.data_ptr<uint8_t>(), *s = scales.data_ptr<uint8_t>();
  quantize_rows(m, [&](int64_t m0, int64_t m1) { k.quantize_mxfp4(in, m0, m1, rceil, c, blocks * 16, s, blocks, nullptr); });
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  lead.push_back(-1);
  return {codes.view(lead), scales.view(lead)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int(const at::Tensor& x, const c10::optional<at::Tensor>& scale_inv,
                                                            const c10::optional<at::Tensor>& perm, int64_t rotation,
                                                            int64_t bits, int64_t group_size, int64_t isa) {
  Input input(x, x.size(-1), scale_inv, perm, rotation);
  const ActInput& in = input.in;
  TORCH_CHECK(bits == 4 || bits == 8, "serq_cpu: activation bits must be 4 or 8, got ", bits);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0, "serq_cpu: group_size must be a multiple of 32, got ", group_size);
  Kernels k = kernels_for(isa);
  int64_t m = input.x.size(0), groups = (in.k + group_size - 1) / group_size;
  auto q = at::empty({m, groups * group_size}, at::TensorOptions().dtype(at::kByte));
  auto scale = at::empty({m, groups}, at::TensorOptions().dtype(at::kFloat));
  auto zero = at::empty({m, groups}, at::TensorOptions().dtype(at::kInt));
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* sp = scale.data_ptr<float>();
  int32_t* zp = zero.data_ptr<int32_t>();
  quantize_rows(m, [&](int64_t m0, int64_t m1) {
    k.quantize_int(in, m0, m1, (int)bits, group_size, qp, groups * group_size, sp, zp, groups, nullptr);
  });
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  lead.push_back(-1);
  return {q.view(lead), scale.view(lead), zero.view(lead)};
}

// bias as float32 (the reference adds it in float32), into `keep`
const float* checked_bias(const c10::optional<at::Tensor>& bias, int64_t n, at::Tensor& keep) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && at::isFloatingType(bias->scalar_type()),
              "serq_cpu: bias must be a floating (", n, ",) tensor, got ", bias->scalar_type(), " ", bias->sizes());
  keep = bias->to(at::kFloat).contiguous();
  return keep.data_ptr<float>();
}

// The columns over which the prefill kernel sums in int32 before scaling: an INT group (its
// int32 sums stay exact in float32 up to 2^24 / (255 * 8) columns), else 32 (MXFP4: 32 too).
int64_t scale_block_columns(int64_t group_size) { return group_size <= 4096 ? group_size : 32; }

// A prepacked weight (prepack_weight's output for this path) checked against the problem, then
// read by the prefill kernel in place of the segments' codes.
void use_panels(GemmProblem& p, const at::Tensor& panels, const Kernels& k, int64_t isa) {
  int64_t width = k.prefill_columns, columns = p.segment[1].k + 2 * p.segment[1].bytes;
  if (!p.segment[1].bytes) columns = 2 * p.segment[0].bytes;
  TORCH_CHECK(width > 1, "serq_cpu: the instruction-set path ", std::min(isa, cpu_isa()),
              " has no prepacked GEMM (prepack_weight refuses it too)");
  std::vector<int64_t> expected{(p.n + width - 1) / width, panel_quads(columns, p.block_columns), 2 * width};
  TORCH_CHECK(panels.scalar_type() == at::kByte && panels.sizes() == at::IntArrayRef(expected) && panels.is_contiguous(),
              "serq_cpu: panels must be a contiguous uint8 ", at::IntArrayRef(expected),
              " tensor (prepack_weight's output for this weight and instruction-set path), got ", panels.scalar_type(),
              " ", panels.sizes());
  p.panels = panels.data_ptr<uint8_t>();
}

// Weight codes as stored (`codes`: qdata) or prepacked (`panels`): exactly one is given.
at::Tensor mxfp4_linear(const at::Tensor& x, const at::Tensor* qdata, const at::Tensor* panels, const at::Tensor& scale,
                        int64_t out_features, int64_t in_features, int64_t rank, bool rceil, const c10::optional<at::Tensor>& scale_inv,
                        const c10::optional<at::Tensor>& perm, const c10::optional<at::Tensor>& bias, int64_t rotation,
                        int64_t isa, int64_t gemm) {
  Input input(x, in_features, scale_inv, perm, rotation);
  const ActInput& in = input.in;
  Kernels k = kernels_for(isa);
  int64_t kp = round_up(in_features, 32), m = input.x.size(0);
  int64_t n = qdata ? qdata->size(0) : out_features;
  TORCH_CHECK(rank >= 0 && rank % 32 == 0 && rank <= kp, "serq_cpu: rank must be a multiple of 32 in [0, ", kp, "], got ", rank);
  const uint8_t* codes = qdata ? checked_codes(*qdata, n, (kp + rank) / 2, "qdata") : nullptr;
  const uint8_t* scales = nullptr;
  if (panels) {  // the scales in panel order too: (N / P, K' / 32, P)
    int64_t width = k.prefill_columns;
    std::vector<int64_t> expected{(n + width - 1) / width, (kp + rank) / 32, width};
    TORCH_CHECK(width > 1 && scale.scalar_type() == at::kByte && scale.sizes() == at::IntArrayRef(expected) &&
                    scale.is_contiguous(),
                "serq_cpu: the scales of a prepacked MXFP4 weight must be a contiguous uint8 ", at::IntArrayRef(expected),
                " tensor (prepack_e8m0's output for this path), got ", scale.scalar_type(), " ", scale.sizes());
    scales = scale.data_ptr<uint8_t>();
  } else {
    scales = checked_codes(scale, n, (kp + rank) / 32, "scale");
  }
  bool decode = !panels && use_decode(m, gemm);
  Operand operand(m, kp, decode, panels != nullptr);
  quantize_rows(m, [&](int64_t m0, int64_t m1) { k.quantize_mxfp4(in, m0, m1, rceil, nullptr, 0, nullptr, 0, &operand.op); });
  Output out(m, n, x);
  GemmProblem p{};
  p.m = m;
  p.n = n;
  int64_t stride = qdata ? qdata->stride(0) : 0;
  p.segment[0] = WeightSegment{codes, stride, kp / 2, 0, 0};
  p.segment[1] = WeightSegment{codes ? codes + kp / 2 : nullptr, stride, rank / 2, 0, kp};
  p.nibble_values = kDoubledE2M1;
  p.offset_values = kOffsetE2M1;
  p.scale_kind = E8M0_BYTES;
  p.e8m0 = panels ? nullptr : scales;
  p.panel_e8m0 = panels ? scales : nullptr;
  p.e8m0_row_stride = panels ? 0 : scale.stride(0);
  p.block_columns = 32;
  p.act = &operand.op;
  if (panels) use_panels(p, *panels, k, isa);
  at::Tensor bias_f32;
  p.bias = checked_bias(bias, n, bias_f32);
  p.out = out.data();
  p.out_dtype = out.dtype();
  if (m && n) run_gemm(k, p, decode);
  return out.shaped(x);
}

at::Tensor linear_mxfp4(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale, int64_t in_features,
                        int64_t rank, bool rceil, const c10::optional<at::Tensor>& scale_inv,
                        const c10::optional<at::Tensor>& perm, const c10::optional<at::Tensor>& bias, int64_t rotation,
                        int64_t isa, int64_t gemm) {
  return mxfp4_linear(x, &qdata, nullptr, scale, 0, in_features, rank, rceil, scale_inv, perm, bias, rotation, isa, gemm);
}

at::Tensor linear_mxfp4_panels(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& scale,
                               int64_t out_features, int64_t in_features, int64_t rank, bool rceil, const c10::optional<at::Tensor>& scale_inv,
                               const c10::optional<at::Tensor>& perm, const c10::optional<at::Tensor>& bias,
                               int64_t rotation, int64_t isa) {
  TORCH_CHECK(out_features >= 0, "serq_cpu: out_features must be >= 0, got ", out_features);
  return mxfp4_linear(x, nullptr, &panels, scale, out_features, in_features, rank, rceil, scale_inv, perm, bias, rotation, isa, 2);
}

// As mxfp4_linear; with panels, `rank` is the correction's columns (its codes are in the panels).
at::Tensor int_linear(const at::Tensor& x, const at::Tensor* qdata, const at::Tensor* panels, const at::Tensor& scale,
                      int64_t in_features, int64_t group_size, int64_t activation_bits, int64_t panels_rank,
                      const c10::optional<at::Tensor>& correction_qdata, const c10::optional<at::Tensor>& correction_scale,
                      const c10::optional<at::Tensor>& scale_inv, const c10::optional<at::Tensor>& perm,
                      const c10::optional<at::Tensor>& bias, int64_t rotation, int64_t isa, int64_t gemm) {
  Input input(x, in_features, scale_inv, perm, rotation);
  const ActInput& in = input.in;
  TORCH_CHECK(activation_bits == 4 || activation_bits == 8, "serq_cpu: activation_bits must be 4 or 8, got ", activation_bits);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0, "serq_cpu: group_size must be a multiple of 32, got ", group_size);
  Kernels k = kernels_for(isa);
  int64_t kp = round_up(in_features, group_size), n = qdata ? qdata->size(0) : scale.size(0), m = input.x.size(0);
  const uint8_t* codes = qdata ? checked_codes(*qdata, n, kp / 2, "qdata") : nullptr;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 2 && scale.size(0) == n &&
                  scale.size(1) == kp / group_size && scale.stride(1) == 1,
              "serq_cpu: scale must be a float32 (", n, ", ", kp / group_size, ") tensor with contiguous rows");
  int64_t rank = panels ? panels_rank : (correction_qdata.has_value() ? 2 * correction_qdata->size(1) : 0);
  TORCH_CHECK(rank >= 0 && rank % 32 == 0 && rank <= kp, "serq_cpu: the correction must have a multiple of 32 columns in [0, ",
              kp, "], got ", rank);
  TORCH_CHECK(panels || correction_qdata.has_value() == correction_scale.has_value(),
              "serq_cpu: correction_qdata and correction_scale come together");
  TORCH_CHECK(!panels || (rank > 0) == correction_scale.has_value(),
              "serq_cpu: correction_scale is given exactly when rank > 0");
  const uint8_t* correction = nullptr;
  const float* correction_scales = nullptr;
  if (rank) {
    if (!panels) correction = checked_codes(*correction_qdata, n, rank / 2, "correction_qdata");
    const auto& cs = *correction_scale;
    TORCH_CHECK(cs.scalar_type() == at::kFloat && cs.numel() == n && cs.size(0) == n && (n <= 1 || cs.stride(0) == 1),
                "serq_cpu: correction_scale must be a contiguous float32 (", n, ", 1) tensor");
    correction_scales = cs.data_ptr<float>();
  }
  bool decode = !panels && use_decode(m, gemm);
  Operand operand(m, kp, decode);
  quantize_rows(m, [&](int64_t m0, int64_t m1) {
    k.quantize_int(in, m0, m1, (int)activation_bits, group_size, nullptr, 0, nullptr, nullptr, 0, &operand.op);
  });
  Output out(m, n, x);
  GemmProblem p{};
  p.m = m;
  p.n = n;
  p.segment[0] = WeightSegment{codes, qdata ? qdata->stride(0) : 0, kp / 2, 0, 0};
  p.segment[1] = WeightSegment{correction, correction ? correction_qdata->stride(0) : 0, rank / 2, 0, kp};
  p.nibble_values = kInt4;
  p.scale_kind = INT_GROUPS;
  p.group_scale = scale.data_ptr<float>();
  p.group_scale_row_stride = scale.stride(0);
  p.group_size = group_size;
  p.correction_scale = correction_scales;
  p.block_columns = scale_block_columns(group_size);
  p.act = &operand.op;
  if (panels) use_panels(p, *panels, k, isa);
  at::Tensor bias_f32;
  p.bias = checked_bias(bias, n, bias_f32);
  p.out = out.data();
  p.out_dtype = out.dtype();
  if (m && n) run_gemm(k, p, decode);
  return out.shaped(x);
}

at::Tensor linear_int(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale, int64_t in_features,
                      int64_t group_size, int64_t activation_bits, const c10::optional<at::Tensor>& correction_qdata,
                      const c10::optional<at::Tensor>& correction_scale, const c10::optional<at::Tensor>& scale_inv,
                      const c10::optional<at::Tensor>& perm, const c10::optional<at::Tensor>& bias, int64_t rotation,
                      int64_t isa, int64_t gemm) {
  return int_linear(x, &qdata, nullptr, scale, in_features, group_size, activation_bits, 0, correction_qdata,
                    correction_scale, scale_inv, perm, bias, rotation, isa, gemm);
}

at::Tensor linear_int_panels(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& scale, int64_t in_features,
                             int64_t group_size, int64_t rank, int64_t activation_bits,
                             const c10::optional<at::Tensor>& correction_scale, const c10::optional<at::Tensor>& scale_inv,
                             const c10::optional<at::Tensor>& perm, const c10::optional<at::Tensor>& bias,
                             int64_t rotation, int64_t isa) {
  return int_linear(x, nullptr, &panels, scale, in_features, group_size, activation_bits, rank, c10::nullopt,
                    correction_scale, scale_inv, perm, bias, rotation, isa, 2);
}

// The codes of K' = [main | correction] (uint8, two 4-bit codes a byte, element 2i in the low
// nibble) prepacked in panels for the prefill kernel of `isa` (serq_cpu.h has the layout).
// group_size: the columns that share a weight scale (32 for MXFP4, the INT group size); K' is
// padded with zeros to whole blocks of the kernel's. Once per weight, at load: plain loops,
// parallel over panels.
at::Tensor prepack_weight(const at::Tensor& main, const c10::optional<at::Tensor>& correction, int64_t group_size,
                          int64_t isa) {
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0, "serq_cpu: group_size must be a multiple of 32, got ", group_size);
  int64_t block_columns = scale_block_columns(group_size);
  Kernels k = kernels_for(isa);
  int64_t width = k.prefill_columns, half = width / 2;
  TORCH_CHECK(width > 1, "serq_cpu: prepack_weight: the instruction-set path ", std::min(isa, cpu_isa()),
              " has no prepacked GEMM; keep the codes as stored");
  int64_t n = main.size(0), main_bytes = main.dim() == 2 ? main.size(1) : -1;
  TORCH_CHECK(main_bytes >= 0 && (2 * main_bytes) % group_size == 0,
              "serq_cpu: main must be (N, bytes) codes of a multiple of group_size (", group_size, ") columns, got ",
              main.sizes());
  const uint8_t* main_codes = checked_codes(main, n, main_bytes, "main");
  int64_t correction_bytes = correction.has_value() ? correction->size(-1) : 0;
  const uint8_t* correction_codes = correction.has_value() ? checked_codes(*correction, n, correction_bytes, "correction") : nullptr;
  TORCH_CHECK((2 * correction_bytes) % 32 == 0, "serq_cpu: the correction must have a multiple of 32 columns, got ",
              2 * correction_bytes);
  int64_t columns = 2 * (main_bytes + correction_bytes), quads = panel_quads(columns, block_columns);
  int64_t panels = (n + width - 1) / width, main_stride = main.stride(0);
  int64_t correction_stride = correction_codes ? correction->stride(0) : 0;
  auto out = at::zeros({panels, quads, 2 * width}, at::TensorOptions().dtype(at::kByte));
  uint8_t* packed = out.data_ptr<uint8_t>();
  // a byte of the output holds column `lane` (low nibble) and column `lane + half` (high) of the
  // panel at one k: built from one code byte of each row (two k), two output bytes at a time
  auto row_byte = [&](int64_t row, int64_t byte) -> uint8_t {
    if (row >= n) return 0;  // past N: zeros
    return byte < main_bytes ? main_codes[row * main_stride + byte]
                             : correction_codes[row * correction_stride + byte - main_bytes];
  };
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t panel = p0; panel < p1; ++panel) {
      uint8_t* at_panel = packed + panel * quads * 2 * width;
      for (int64_t lane = 0; lane < half; ++lane) {
        int64_t low_row = panel * width + lane, high_row = low_row + half;
        if (low_row >= n) break;
        for (int64_t byte = 0; byte < columns / 2; ++byte) {
          uint8_t low = row_byte(low_row, byte), high = row_byte(high_row, byte);
          int64_t j = 2 * byte;  // k of the byte's low nibble; j and j + 1 share a quad
          uint8_t* at = at_panel + j / 4 * 2 * width + 4 * lane + j % 4;
          at[0] = (uint8_t)((low & 15) | (high << 4));
          at[1] = (uint8_t)((low >> 4) | (high & 0xF0));
        }
      }
    }
  });
  return out;
}

// out = (x q^T) * scale + bias with q int8 (N, K) and one float scale per row of q: a tied LM
// head / embedding table stored as int8. x is small (M * K floats): converted to float32 rows
// once; the kernel reads the weight as stored (rows contiguous, any row stride).
at::Tensor linear_int8_weights(const at::Tensor& x_any, const at::Tensor& qdata, const at::Tensor& scale_any,
                               const c10::optional<at::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(qdata.scalar_type() == at::kChar && qdata.dim() == 2,
              "serq_cpu: linear_int8_weights: qdata must be a 2-D int8 (N, K) tensor, got ", qdata.scalar_type(), " ",
              qdata.sizes());
  int64_t n = qdata.size(0), k = qdata.size(1);
  TORCH_CHECK(qdata.stride(1) == 1 || k <= 1 || n == 0,
              "serq_cpu: linear_int8_weights: qdata's rows must be contiguous (stride(1) == 1), got strides ",
              qdata.strides());
  TORCH_CHECK(x_any.dim() >= 1 && x_any.size(-1) == k, "serq_cpu: linear_int8_weights: x has ",
              x_any.dim() ? x_any.size(-1) : 0, " columns, qdata ", k);
  auto dtype = x_any.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
              "serq_cpu: linear_int8_weights: x must be float32, bfloat16, float16 or float64, got ", dtype);
  TORCH_CHECK(at::isFloatingType(scale_any.scalar_type()) && scale_any.dim() == 1 && scale_any.size(0) == n,
              "serq_cpu: linear_int8_weights: scale must be a floating (", n, ",) tensor, got ",
              scale_any.scalar_type(), " ", scale_any.sizes());
  Kernels kernels = kernels_for(isa);
  // bfloat16 activations on a CPU with AVX512_BF16 (where the caller allows AVX-512): two
  // products per lane and instruction, the same exact products (isa_avx512_bf16.cpp)
  bool bf16_dots = dtype == at::kBFloat16 && std::min(isa, cpu_isa()) >= AVX512 && has_avx512_bf16();
  at::Tensor x = x_any.reshape({-1, k}).to(bf16_dots ? at::kBFloat16 : at::kFloat).contiguous();
  at::Tensor scale = scale_any.to(at::kFloat).contiguous(), bias_f32;
  int64_t m = x.size(0);
  Output out(m, n, x_any);
  Int8WeightsProblem p{m, n, k, bf16_dots ? nullptr : x.data_ptr<float>(),
                       bf16_dots ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr, k,
                       qdata.data_ptr<int8_t>(), qdata.stride(0), scale.data_ptr<float>(),
                       checked_bias(bias, n, bias_f32), out.data(), out.dtype()};
  auto gemm = bf16_dots ? avx512_bf16::gemm_int8_weights_bf16 : kernels.gemm_int8_weights;
  if (m && n) {
    // threads take whole tiles of 4 columns; a chunk holds at least ~64k multiply-adds, so that
    // a small head is not split into slices cheaper than waking a thread
    int64_t quads = (n + 3) / 4, grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, m * k));
    at::parallel_for(0, quads, grain, [&](int64_t q0, int64_t q1) { gemm(p, 4 * q0, std::min(n, 4 * q1)); });
  }
  return out.shaped(x_any);
}

// columns of one panel: what prepack_weight and the prepacked ops of `isa` use (1: none)
int64_t panel_columns(int64_t isa) { return kernels_for(isa).prefill_columns; }

}  // namespace

TORCH_LIBRARY(serq_cpu, m) {
  m.def("cpu_isa() -> int", &cpu_isa);
  m.def("quantize_mxfp4(Tensor x, Tensor? scale_inv, Tensor? perm, int rotation, bool rceil, int isa) -> (Tensor, Tensor)");
  m.def("quantize_int(Tensor x, Tensor? scale_inv, Tensor? perm, int rotation, int bits, int group_size, int isa)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("linear_mxfp4(Tensor x, Tensor qdata, Tensor scale, int in_features, int rank, bool rceil, Tensor? scale_inv,"
        " Tensor? perm, Tensor? bias, int rotation, int isa, int gemm) -> Tensor");
  m.def("linear_int(Tensor x, Tensor qdata, Tensor scale, int in_features, int group_size, int activation_bits,"
        " Tensor? correction_qdata, Tensor? correction_scale, Tensor? scale_inv, Tensor? perm, Tensor? bias,"
        " int rotation, int isa, int gemm) -> Tensor");
  m.def("panel_columns(int isa) -> int", &panel_columns);
  m.def("prepack_weight(Tensor main, Tensor? correction, int group_size, int isa) -> Tensor");
  m.def("linear_mxfp4_panels(Tensor x, Tensor panels, Tensor scale, int out_features, int in_features, int rank, bool rceil,"
        " Tensor? scale_inv, Tensor? perm, Tensor? bias, int rotation, int isa) -> Tensor");
  m.def("linear_int_panels(Tensor x, Tensor panels, Tensor scale, int in_features, int group_size, int rank,"
        " int activation_bits, Tensor? correction_scale, Tensor? scale_inv, Tensor? perm, Tensor? bias, int rotation,"
        " int isa) -> Tensor");
  m.def("linear_int8_weights(Tensor x, Tensor qdata, Tensor scale, Tensor? bias, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(serq_cpu, CPU, m) {
  m.impl("quantize_mxfp4", &quantize_mxfp4);
  m.impl("quantize_int", &quantize_int);
  m.impl("linear_mxfp4", &linear_mxfp4);
  m.impl("linear_int", &linear_int);
  m.impl("prepack_weight", &prepack_weight);
  m.impl("linear_mxfp4_panels", &linear_mxfp4_panels);
  m.impl("linear_int_panels", &linear_int_panels);
  m.impl("linear_int8_weights", &linear_int8_weights);
}

}  // namespace serq_cpu
