// Fused DDIM / DDPM / DDIM-inversion step (+ classifier-free guidance) on CPU: one pass over
// memory. Work is split into chunks of one sample; each chunk is processed in tiles of TILE
// elements that are widened to float, run through short branch-free loops (which GCC vectorises
// in the AVX2 / AVX-512 clones) and narrowed back. Contract: see dlcore/ops/sampler.py.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/common.h"
#include "sampler_math.h"

namespace {

using namespace dlcore::sampler;
using dlcore::cpu::fast_expf;

constexpr int64_t TILE = 256;
constexpr int64_t CHUNK = 16384;  // elements per parallel task
constexpr int64_t STATS_CHUNK = 4096;  // must match dlcore/ops/sampler.py
// Below this many elements a step runs on the calling thread: waking the pool costs more.
constexpr int64_t MIN_PARALLEL_ELEMS = 32768;

// at::parallel_for grain (in jobs of job_elems elements) keeping small calls serial.
inline int64_t grain_for(int64_t job_elems) {
  return std::max<int64_t>(1, MIN_PARALLEL_ELEMS / std::max<int64_t>(1, job_elems));
}

enum class Dt { F32, F16, BF16 };

inline uint32_t as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Bit-exact IEEE half <-> float with round-to-nearest-even, written with selects only so the
// loops vectorise without F16C.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const uint32_t sub = as_bits(float(em) * 5.9604644775390625e-8f);
  const uint32_t normal = (em << 13) + 0x38000000u;
  const uint32_t special = (em << 13) + 0x70000000u;
  const uint32_t r = em >= 0x7c00u ? special : (em < 0x0400u ? sub : normal);
  return as_float(r | sign);
}

inline uint16_t float_to_half(float x) {
  uint32_t f = as_bits(x);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  const uint32_t big = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
  const uint32_t denorm = as_bits(as_float(f) + 0.5f) - 0x3f000000u;
  const uint32_t mant_odd = (f >> 13) & 1u;
  const uint32_t normal = (f + 0xc8000fffu + mant_odd) >> 13;
  const uint32_t o = f >= 0x47800000u ? big : (f < 0x38800000u ? denorm : normal);
  return uint16_t(o | (sign >> 16));
}

inline float bf16_to_float(uint16_t b) { return as_float(uint32_t(b) << 16); }

inline uint16_t float_to_bf16(float x) {
  const uint32_t u = as_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return uint16_t((x != x) ? 0x7fc0u : rounded);
}

DLCORE_MULTIVERSION void load_tile(const void* src, Dt dt, int64_t n, float* dst) {
  if (dt == Dt::F32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (dt == Dt::F16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(s[i]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
  }
}

DLCORE_MULTIVERSION void store_tile(const float* src, Dt dt, int64_t n, void* dst) {
  if (dt == Dt::F32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (dt == Dt::F16) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_half(src[i]);
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
  }
}

// log(x) for x in [1e-7, 1]: exponent split, then 2*atanh((m-1)/(m+1)) as an odd series
// (|s| <= 0.172, truncation error < 1e-9). Vectorises, unlike libm's logf.
inline float log_unit(float x) {
  const uint32_t u = as_bits(x);
  int32_t e = int32_t((u >> 23) & 0xffu) - 127;
  float m = as_float((u & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  float p = 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p + float(e) * 0.69314718055994531f;
}

// cos(2*pi*u) for u in [0, 1): reduce to y in [-1/4, 1/4] where cos(2*pi*u) = -sin(2*pi*y) up to
// sign, then an odd Taylor series to z^13 (error < 1e-8 on [-pi/2, pi/2]).
inline float cos_2pi(float u) {
  float r = u - std::nearbyint(u);  // [-1/2, 1/2]
  r = r < 0.0f ? -r : r;            // cos is even: [0, 1/2]
  const float z = 6.283185307179586f * (r - 0.25f);  // cos(2 pi r) = -sin(z)
  const float z2 = z * z;
  float p = -1.0f / 6227020800.0f;
  p = p * z2 + 1.0f / 39916800.0f;
  p = p * z2 - 1.0f / 362880.0f;
  p = p * z2 + 1.0f / 5040.0f;
  p = p * z2 - 1.0f / 120.0f;
  p = p * z2 + 1.0f / 6.0f;
  p = p * z2 * -1.0f + 1.0f;
  return -(z * p);
}

// Gaussian noise for logical elements [first, first + n): tl.randn(seed, index).
DLCORE_MULTIVERSION void philox_randn_tile(uint64_t seed, uint64_t first, int64_t n, float* out) {
  const uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t idx = first + uint64_t(i);
    uint32_t o0, o1;
    philox_2x(uint32_t(idx), uint32_t(idx >> 32), k0, k1, o0, o1);
    float u1 = uint_to_uniform(o0);
    u1 = u1 < 1.0e-7f ? 1.0e-7f : u1;
    out[i] = std::sqrt(-2.0f * log_unit(u1)) * cos_2pi(uint_to_uniform(o1));
  }
}

struct Flags {
  bool has_uncond, has_factor, abs_only, clip, threshold;
  int64_t noise_mode, sigma_mode;
  float guidance_scale, bound;
};

struct Row {
  const char* x;
  const char* m;
  const char* u;
  const char* noise;
  const char* var;
  char* prev;
  char* x0;
};

DLCORE_MULTIVERSION void guide_tile(const float* c, const float* u, int64_t n, float s, float f,
                                    float* g) {
  for (int64_t i = 0; i < n; ++i) g[i] = (u[i] + s * (c[i] - u[i])) * f;
}

DLCORE_MULTIVERSION void x0_tile(const float* x, const float* g, int64_t n, float ax, float am,
                                 float* x0) {
  for (int64_t i = 0; i < n; ++i) x0[i] = ax * x[i] + am * g[i];
}

DLCORE_MULTIVERSION void abs_tile(float* x0, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x0[i] = std::fabs(x0[i]);
}

DLCORE_MULTIVERSION void clamp_tile(float* x0, int64_t n, float bound, float div) {
  for (int64_t i = 0; i < n; ++i) x0[i] = std::min(std::max(x0[i], -bound), bound) / div;
}

DLCORE_MULTIVERSION void prev_tile(const float* x0, const float* x, const float* g, int64_t n,
                                   float p0, float px, float pg, float* prev) {
  for (int64_t i = 0; i < n; ++i) prev[i] = p0 * x0[i] + px * x[i] + pg * g[i];
}

DLCORE_MULTIVERSION void add_noise_tile(float* prev, const float* noise, const float* var,
                                        int64_t n, int64_t sigma_mode, float sigma, float l0,
                                        float l1, float mask) {
  if (sigma_mode == kSigmaFixed) {
    const float s = sigma * mask;
    for (int64_t i = 0; i < n; ++i) prev[i] += s * noise[i];
  } else if (sigma_mode == kSigmaLearned) {
    for (int64_t i = 0; i < n; ++i) prev[i] += std::sqrt(var[i]) * noise[i] * mask;
  } else {
    for (int64_t i = 0; i < n; ++i) prev[i] += fast_expf(l0 + l1 * var[i]) * noise[i] * mask;
  }
}

// float32 inputs are read in place; other dtypes are widened into the tile buffers. Outputs go
// through the buffers and are written once per tile, after every read of that tile, so an output
// may alias an input element for element.
inline const float* input_tile(const char* src, Dt dt, int64_t n, float* buf) {
  if (dt == Dt::F32) return reinterpret_cast<const float*>(src);
  load_tile(src, dt, n, buf);
  return buf;
}

// The common step (float32, guidance or not, clip or threshold or neither, no noise or a noise
// tensor with one scale per sample) in a single loop, from the inputs straight to the outputs,
// with no tile buffers. Each element is read before it is written, so an output may alias an
// input element for element: no dependence crosses iterations, which ivdep tells GCC (else it
// would check the pointers for overlap and fall back to scalar code).
struct FusedCoeffs {
  float s, f, ax, am, bound, div, p0, px, pg, sigma;
};

template <bool kGuide, bool kClip, bool kNoise>
__attribute__((always_inline)) inline void fused_f32_body(const float* x, const float* m,
                                                          const float* u, const float* nz,
                                                          float* prev, float* x0, int64_t n,
                                                          const FusedCoeffs& k) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    float g = m[i];
    if (kGuide) g = (u[i] + k.s * (g - u[i])) * k.f;
    float x0i = k.ax * xi + k.am * g;
    if (kClip) x0i = std::min(std::max(x0i, -k.bound), k.bound) / k.div;
    float p = k.p0 * x0i + k.px * xi + k.pg * g;
    if (kNoise) p += k.sigma * nz[i];
    prev[i] = p;
    x0[i] = x0i;
  }
}

DLCORE_MULTIVERSION void fused_f32(const float* x, const float* m, const float* u,
                                   const float* nz, float* prev, float* x0, int64_t n,
                                   const FusedCoeffs& k, bool guide, bool clip, bool noise) {
  switch (int(guide) * 4 + int(clip) * 2 + int(noise)) {
    case 0: return fused_f32_body<false, false, false>(x, m, u, nz, prev, x0, n, k);
    case 1: return fused_f32_body<false, false, true>(x, m, u, nz, prev, x0, n, k);
    case 2: return fused_f32_body<false, true, false>(x, m, u, nz, prev, x0, n, k);
    case 3: return fused_f32_body<false, true, true>(x, m, u, nz, prev, x0, n, k);
    case 4: return fused_f32_body<true, false, false>(x, m, u, nz, prev, x0, n, k);
    case 5: return fused_f32_body<true, false, true>(x, m, u, nz, prev, x0, n, k);
    case 6: return fused_f32_body<true, true, false>(x, m, u, nz, prev, x0, n, k);
    default: return fused_f32_body<true, true, true>(x, m, u, nz, prev, x0, n, k);
  }
}

void step_row(const Row& r, Dt dt, int64_t esize, int64_t begin, int64_t end, uint64_t seed,
              uint64_t row_first, const Flags& f, const StepCoeffs<double>& c, float factor,
              float div, float mask) {
  if (dt == Dt::F32 && !f.abs_only && f.sigma_mode == kSigmaFixed &&
      f.noise_mode != kNoiseFused) {
    FusedCoeffs k;
    k.s = f.guidance_scale;
    k.f = factor;
    k.ax = float(c.ax);
    k.am = float(c.am);
    k.bound = f.threshold ? div : f.bound;
    k.div = div;
    k.p0 = float(c.p0);
    k.px = float(c.px);
    k.pg = float(c.pg);
    k.sigma = float(c.sigma) * mask;
    const auto at = [&](const char* p) { return reinterpret_cast<const float*>(p) + begin; };
    fused_f32(at(r.x), at(r.m), f.has_uncond ? at(r.u) : nullptr,
              f.noise_mode == kNoiseTensor ? at(r.noise) : nullptr,
              reinterpret_cast<float*>(r.prev) + begin, reinterpret_cast<float*>(r.x0) + begin,
              end - begin, k, f.has_uncond, f.clip || f.threshold, f.noise_mode == kNoiseTensor);
    return;
  }
  alignas(64) float xs[TILE], ms[TILE], gs[TILE], us[TILE], ns[TILE], vs[TILE], x0[TILE],
      prev[TILE];
  for (int64_t t = begin; t < end; t += TILE) {
    const int64_t n = std::min(TILE, end - t);
    const int64_t off = t * esize;
    const float* x = input_tile(r.x + off, dt, n, xs);
    const float* g = input_tile(r.m + off, dt, n, ms);
    if (f.has_uncond) {
      guide_tile(g, input_tile(r.u + off, dt, n, us), n, f.guidance_scale, factor, gs);
      g = gs;
    }
    x0_tile(x, g, n, float(c.ax), float(c.am), x0);
    if (f.abs_only) {
      abs_tile(x0, n);
      store_tile(x0, dt, n, r.x0 + off);
      continue;
    }
    if (f.clip || f.threshold) clamp_tile(x0, n, f.threshold ? div : f.bound, div);
    prev_tile(x0, x, g, n, float(c.p0), float(c.px), float(c.pg), prev);
    if (f.noise_mode != kNoNoise) {
      const float* noise = ns;
      if (f.noise_mode == kNoiseTensor) {
        noise = input_tile(r.noise + off, dt, n, ns);
      } else {
        philox_randn_tile(seed, row_first + uint64_t(t), n, ns);
      }
      const float* var = f.sigma_mode != kSigmaFixed ? input_tile(r.var + off, dt, n, vs) : vs;
      add_noise_tile(prev, noise, var, n, f.sigma_mode, float(c.sigma), float(c.l0), float(c.l1),
                     mask);
    }
    store_tile(prev, dt, n, r.prev + off);
    store_tile(x0, dt, n, r.x0 + off);
  }
}

Dt dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return Dt::F32;
    case at::kHalf:
      return Dt::F16;
    case at::kBFloat16:
      return Dt::BF16;
    default:
      TORCH_CHECK(false, "dlcore sampler kernels take float32, float16 or bfloat16 tensors, got ",
                  t.scalar_type());
  }
}

const char* row_ptr(const c10::optional<at::Tensor>& t, int64_t b) {
  if (!t.has_value()) return nullptr;
  return static_cast<const char*>(t->data_ptr()) + b * t->stride(0) * t->element_size();
}

// Elements per sample of a (batch, ...) tensor.
int64_t sample_numel(const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 1, "sampler kernels take (batch, ...) tensors, got a 0-d tensor");
  return t.size(0) == 0 ? 0 : t.numel() / t.size(0);
}

// B samples of N elements, each sample contiguous (any batch stride): rows (B, N) with unit
// inner stride, or the caller's (B, C, H, W) tensor itself, so the op layer makes no views.
void check_rows(const char* name, const at::Tensor& t, int64_t B, int64_t N, Dt dt) {
  TORCH_CHECK(t.dim() >= 1 && t.size(0) == B && sample_numel(t) == N, name, " must hold ", B,
              " samples of ", N, " elements, got shape ", t.sizes());
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1 && N > 1; --d) {
    TORCH_CHECK(t.size(d) == 1 || t.stride(d) == expected, name,
                " must have contiguous samples (any batch stride), got shape ", t.sizes(),
                " and strides ", t.strides());
    expected *= t.size(d);
  }
  TORCH_CHECK(dtype_of(t) == dt, name, " must have the sample's dtype");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

float per_sample(const c10::optional<at::Tensor>& t, int64_t b, float fallback) {
  if (!t.has_value()) return fallback;
  return t->data_ptr<float>()[b * t->stride(0)];
}

void sampler_step_cpu(const at::Tensor& sample, const at::Tensor& model_output,
                      const c10::optional<at::Tensor>& uncond,
                      const c10::optional<at::Tensor>& noise,
                      const c10::optional<at::Tensor>& variance_pred, const at::Tensor& alpha_t,
                      const at::Tensor& alpha_prev, const c10::optional<at::Tensor>& cfg_factor,
                      const c10::optional<at::Tensor>& threshold,
                      const c10::optional<at::Tensor>& noise_mask, int64_t method,
                      int64_t prediction_type, int64_t variance_type, int64_t clip_mode,
                      double clip_range, double eta, bool use_clipped_model_output,
                      double guidance_scale, int64_t seed, int64_t noise_mode, bool abs_x0_only,
                      at::Tensor& prev_sample, at::Tensor& pred_original_sample) {
  const int64_t B = sample.size(0), N = sample_numel(sample);
  const Dt dt = dtype_of(sample);
  check_rows("sample", sample, B, N, dt);
  check_rows("model_output", model_output, B, N, dt);
  check_rows("pred_original_sample", pred_original_sample, B, N, dt);
  if (!abs_x0_only) check_rows("prev_sample", prev_sample, B, N, dt);
  if (uncond.has_value()) check_rows("uncond", *uncond, B, N, dt);
  if (noise_mode == kNoiseTensor) {
    TORCH_CHECK(noise.has_value(), "noise_mode 1 needs a noise tensor");
    check_rows("noise", *noise, B, N, dt);
  }
  const int64_t sigma_mode = variance_type == kLearned        ? kSigmaLearned
                             : variance_type == kLearnedRange ? kSigmaLearnedRange
                                                              : kSigmaFixed;
  if (sigma_mode != kSigmaFixed && noise_mode != kNoNoise) {
    TORCH_CHECK(variance_pred.has_value(), "learned variance types need variance_pred");
    check_rows("variance_pred", *variance_pred, B, N, dt);
  }
  for (const auto* a : {&alpha_t, &alpha_prev}) {
    TORCH_CHECK(a->scalar_type() == at::kFloat && a->dim() == 1 && a->size(0) == B,
                "alphas must be float32 tensors of shape (", B, ",)");
  }
  TORCH_CHECK(!threshold.has_value() || threshold->scalar_type() == at::kFloat,
              "threshold must be float32");
  TORCH_CHECK(!cfg_factor.has_value() || cfg_factor->scalar_type() == at::kFloat,
              "cfg_factor must be float32");
  TORCH_CHECK(!noise_mask.has_value() || noise_mask->scalar_type() == at::kFloat,
              "noise_mask must be float32");
  Flags f{};
  f.has_uncond = uncond.has_value();
  f.abs_only = abs_x0_only;
  f.clip = clip_mode == 1;
  f.threshold = clip_mode == 2;
  f.noise_mode = noise_mode;
  f.sigma_mode = sigma_mode;
  f.guidance_scale = float(guidance_scale);
  f.bound = float(clip_range);
  const int64_t esize = sample.element_size();
  const int64_t chunks = (N + CHUNK - 1) / CHUNK;
  const float* at_ptr = alpha_t.data_ptr<float>();
  const float* ap_ptr = alpha_prev.data_ptr<float>();
  at::parallel_for(0, B * chunks, grain_for(std::min(N, CHUNK)), [&](int64_t lo, int64_t hi) {
    for (int64_t job = lo; job < hi; ++job) {
      const int64_t b = job / chunks, ch = job % chunks;
      const StepCoeffs<double> c =
          step_coeffs<double>(at_ptr[b * alpha_t.stride(0)], ap_ptr[b * alpha_prev.stride(0)],
                              method, prediction_type, variance_type, eta,
                              use_clipped_model_output);
      Row r{row_ptr(sample, b),
            row_ptr(model_output, b),
            row_ptr(uncond, b),
            noise_mode == kNoiseTensor ? row_ptr(noise, b) : nullptr,
            row_ptr(variance_pred, b),
            abs_x0_only ? nullptr : const_cast<char*>(row_ptr(prev_sample, b)),
            const_cast<char*>(row_ptr(pred_original_sample, b))};
      step_row(r, dt, esize, ch * CHUNK, std::min(N, (ch + 1) * CHUNK), uint64_t(seed),
               uint64_t(b) * uint64_t(N), f, c, per_sample(cfg_factor, b, 1.0f),
               per_sample(threshold, b, 1.0f), per_sample(noise_mask, b, 1.0f));
    }
  });
}

// Per (sample, chunk of STATS_CHUNK): sum and centred sum of squares of cond and of the guided
// output u + s * (c - u); dlcore/ops/sampler.py merges the chunks (Chan et al.) into the std
// ratio of rescale_noise_cfg.
DLCORE_MULTIVERSION void stats_chunk(const float* c, const float* u, int64_t n, float s,
                                     float* g, float* out) {
  double sc = 0, sg = 0;
  for (int64_t i = 0; i < n; ++i) {
    g[i] = u[i] + s * (c[i] - u[i]);
    sc += c[i];
    sg += g[i];
  }
  const double mc = sc / double(n), mg = sg / double(n);
  double qc = 0, qg = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double dc = c[i] - mc, dg = g[i] - mg;
    qc += dc * dc;
    qg += dg * dg;
  }
  out[0] = float(sc);
  out[1] = float(qc);
  out[2] = float(sg);
  out[3] = float(qg);
}

void sampler_cfg_stats_cpu(const at::Tensor& cond, const at::Tensor& uncond,
                           double guidance_scale, at::Tensor& partial) {
  const int64_t B = cond.size(0), N = sample_numel(cond);
  const Dt dt = dtype_of(cond);
  check_rows("cond", cond, B, N, dt);
  check_rows("uncond", uncond, B, N, dt);
  const int64_t P = (N + STATS_CHUNK - 1) / STATS_CHUNK;
  TORCH_CHECK(partial.scalar_type() == at::kFloat && partial.is_contiguous() &&
                  partial.dim() == 3 && partial.size(0) == B && partial.size(1) == P &&
                  partial.size(2) == 4,
              "partial must be a contiguous float32 tensor of shape (", B, ", ", P, ", 4)");
  const int64_t esize = cond.element_size();
  float* out = partial.data_ptr<float>();
  at::parallel_for(0, B * P, grain_for(std::min(N, STATS_CHUNK)), [&](int64_t lo, int64_t hi) {
    std::vector<float> c(STATS_CHUNK), u(STATS_CHUNK), g(STATS_CHUNK);
    for (int64_t job = lo; job < hi; ++job) {
      const int64_t b = job / P, p = job % P;
      const int64_t begin = p * STATS_CHUNK, n = std::min(STATS_CHUNK, N - begin);
      load_tile(row_ptr(cond, b) + begin * esize, dt, n, c.data());
      load_tile(row_ptr(uncond, b) + begin * esize, dt, n, u.data());
      stats_chunk(c.data(), u.data(), n, float(guidance_scale), g.data(), out + job * 4);
    }
  });
}

// torch.quantile(|x0|, ratio, dim=1) with linear interpolation, by selection in place (the
// scratch holds |x0| and may be permuted), clamped to [min_value, max_value].
void sampler_quantile_cpu(at::Tensor& scratch, double ratio, double min_value, double max_value,
                          at::Tensor& out) {
  const int64_t B = scratch.size(0), N = sample_numel(scratch);
  const Dt dt = dtype_of(scratch);
  check_rows("scratch", scratch, B, N, dt);
  TORCH_CHECK(N > 0, "the quantile needs at least one element per sample");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 1 && out.size(0) == B,
              "out must be float32 of shape (", B, ",)");
  const double pos = ratio * double(N - 1);
  const int64_t below = std::min<int64_t>(int64_t(pos), N - 1);
  const int64_t above = std::min<int64_t>(below + 1, N - 1);
  const float weight = float(pos - double(below));
  at::parallel_for(0, B, grain_for(N), [&](int64_t lo, int64_t hi) {
    std::vector<float> row(N);
    for (int64_t b = lo; b < hi; ++b) {
      load_tile(row_ptr(scratch, b), dt, N, row.data());
      std::nth_element(row.begin(), row.begin() + below, row.end());
      const float a = row[below];
      const float z = above == below ? a : *std::min_element(row.begin() + below + 1, row.end());
      // torch.lerp's formula, so the value matches torch.quantile to rounding.
      float q = weight < 0.5f ? a + weight * (z - a) : z - (z - a) * (1.0f - weight);
      q = std::min(std::max(q, float(min_value)), float(max_value));
      out.data_ptr<float>()[b * out.stride(0)] = q;
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dlcore, CPU, m) {
  m.impl("sampler_step_kernel", &sampler_step_cpu);
  m.impl("sampler_cfg_stats_kernel", &sampler_cfg_stats_cpu);
  m.impl("sampler_quantile_kernel", &sampler_quantile_cpu);
}
