// Fused DDIM / DDPM / DDIM-inversion step (+ classifier-free guidance) on CUDA. CUDA code only:
// kernels and raw-pointer launchers taking a cudaStream_t; the torch binding is
// csrc/cuda/sampler_binding.cpp. Contract: dlcore/ops/sampler.py; coefficients and Philox:
// csrc/sampler_math.h (the same formulas as the CPU and Triton kernels).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/sampler.h"
#include "sampler_math.h"

namespace dlcore::sampler {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;  // independent elements in flight per thread
constexpr int kBlockElems = kThreads * kPerThread;
constexpr int kStatsPerThread = kStatsChunk / kThreads;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// tl.randn(seed, index): Philox4x32-10, Box-Muller on the first two words.
__device__ __forceinline__ float philox_randn(uint64_t seed, uint64_t index) {
  uint32_t o0, o1;
  philox_2x(uint32_t(index), uint32_t(index >> 32), uint32_t(seed), uint32_t(seed >> 32), o0, o1);
  const float u1 = fmaxf(uint_to_uniform(o0), 1.0e-7f);
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * uint_to_uniform(o1));
}

template <typename T, bool kHasUncond, int kNoiseMode, bool kAbsOnly>
__global__ void __launch_bounds__(kThreads)
    sampler_step_kernel(const StepParams p) {
  const int64_t b = blockIdx.y;
  const int64_t base = int64_t(blockIdx.x) * kBlockElems + threadIdx.x;
  const StepCoeffs<float> c =
      step_coeffs<float>(p.alpha_t[b * p.stride_alpha_t], p.alpha_prev[b * p.stride_alpha_prev],
                         p.method, p.prediction_type, p.variance_type, p.eta, p.use_clipped);
  const T* x_row = static_cast<const T*>(p.sample) + b * p.stride_sample;
  const T* m_row = static_cast<const T*>(p.model_output) + b * p.stride_model_output;
  const T* u_row = static_cast<const T*>(p.uncond) + b * p.stride_uncond;
  const T* n_row = static_cast<const T*>(p.noise) + b * p.stride_noise;
  const T* v_row = static_cast<const T*>(p.variance_pred) + b * p.stride_variance_pred;
  T* prev_row = static_cast<T*>(p.prev_sample) + b * p.stride_prev_sample;
  T* x0_row = static_cast<T*>(p.pred_original_sample) + b * p.stride_pred_original_sample;
  float factor = 1.0f, bound = 0.0f, div = 1.0f, keep = 1.0f;
  if (kHasUncond && p.cfg_factor != nullptr) factor = p.cfg_factor[b * p.stride_cfg_factor];
  if (p.clip_mode == 1) bound = p.clip_range;
  if (p.clip_mode == 2) bound = div = p.threshold[b * p.stride_threshold];
  if (p.noise_mask != nullptr) keep = p.noise_mask[b * p.stride_noise_mask];
  const float sigma = c.sigma * keep;
  const int64_t sigma_mode = p.variance_type == kLearned        ? kSigmaLearned
                             : p.variance_type == kLearnedRange ? kSigmaLearnedRange
                                                                : kSigmaFixed;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int64_t i = base + int64_t(k) * kThreads;
    if (i >= p.n) break;
    const float x = to_float(x_row[i]);
    float g = to_float(m_row[i]);
    if (kHasUncond) {
      const float u = to_float(u_row[i]);
      g = (u + p.guidance_scale * (g - u)) * factor;
    }
    float x0 = c.ax * x + c.am * g;
    if (kAbsOnly) {
      x0_row[i] = from_float<T>(fabsf(x0));
      continue;
    }
    if (p.clip_mode != 0) x0 = fminf(fmaxf(x0, -bound), bound) / div;
    float prev = c.p0 * x0 + c.px * x + c.pg * g;
    if (kNoiseMode != kNoNoise) {
      const float nz = kNoiseMode == kNoiseTensor
                           ? to_float(n_row[i])
                           : philox_randn(p.seed, uint64_t(b) * uint64_t(p.n) + uint64_t(i));
      float s = sigma;
      if (sigma_mode != kSigmaFixed) {
        const float v = to_float(v_row[i]);
        s = (sigma_mode == kSigmaLearned ? sqrtf(v) : expf(c.l0 + c.l1 * v)) * keep;
      }
      prev += s * nz;
    }
    prev_row[i] = from_float<T>(prev);
    x0_row[i] = from_float<T>(x0);
  }
}

template <typename T>
__device__ __forceinline__ float block_sum(float v, float* shared) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared is reused between calls
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  return total;
}

// Per (chunk of kStatsChunk, sample): sum and centred sum of squares of cond and of the guided
// output; values stay in registers between the two passes.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sampler_cfg_stats_kernel(const void* cond, const void* uncond, float* partial, int64_t n,
                             int64_t stride_cond, int64_t stride_uncond, float guidance_scale,
                             int64_t num_chunks) {
  __shared__ float shared[kThreads / 32];
  const int64_t b = blockIdx.y, chunk = blockIdx.x;
  const int64_t start = chunk * kStatsChunk;
  const T* c_row = static_cast<const T*>(cond) + b * stride_cond;
  const T* u_row = static_cast<const T*>(uncond) + b * stride_uncond;
  float cv[kStatsPerThread], gv[kStatsPerThread];
  float sc = 0.0f, sg = 0.0f;
#pragma unroll
  for (int k = 0; k < kStatsPerThread; ++k) {
    const int64_t i = start + threadIdx.x + int64_t(k) * kThreads;
    const bool in = i < n;
    const float c = in ? to_float(c_row[i]) : 0.0f;
    const float u = in ? to_float(u_row[i]) : 0.0f;
    cv[k] = c;
    gv[k] = in ? u + guidance_scale * (c - u) : 0.0f;
    sc += cv[k];
    sg += gv[k];
  }
  const int64_t remaining = n - start;
  const float count = float(remaining < kStatsChunk ? remaining : kStatsChunk);
  sc = block_sum<T>(sc, shared);
  sg = block_sum<T>(sg, shared);
  const float mc = sc / count, mg = sg / count;
  float qc = 0.0f, qg = 0.0f;
#pragma unroll
  for (int k = 0; k < kStatsPerThread; ++k) {
    const int64_t i = start + threadIdx.x + int64_t(k) * kThreads;
    if (i < n) {
      qc += (cv[k] - mc) * (cv[k] - mc);
      qg += (gv[k] - mg) * (gv[k] - mg);
    }
  }
  qc = block_sum<T>(qc, shared);
  qg = block_sum<T>(qg, shared);
  if (threadIdx.x == 0) {
    float* out = partial + (b * num_chunks + chunk) * 4;
    out[0] = sc;
    out[1] = qc;
    out[2] = sg;
    out[3] = qg;
  }
}

template <typename T, bool kHasUncond>
cudaError_t launch_step_typed(const StepParams& p, int64_t noise_mode, bool abs_only,
                              cudaStream_t stream) {
  const dim3 grid{unsigned((p.n + kBlockElems - 1) / kBlockElems), unsigned(p.batch), 1u};
  if (abs_only) {
    sampler_step_kernel<T, kHasUncond, kNoNoise, true><<<grid, kThreads, 0, stream>>>(p);
  } else if (noise_mode == kNoiseTensor) {
    sampler_step_kernel<T, kHasUncond, kNoiseTensor, false><<<grid, kThreads, 0, stream>>>(p);
  } else if (noise_mode == kNoiseFused) {
    sampler_step_kernel<T, kHasUncond, kNoiseFused, false><<<grid, kThreads, 0, stream>>>(p);
  } else {
    sampler_step_kernel<T, kHasUncond, kNoNoise, false><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_step_dtype(const StepParams& p, int64_t noise_mode, bool abs_only,
                              cudaStream_t stream) {
  return p.uncond != nullptr ? launch_step_typed<T, true>(p, noise_mode, abs_only, stream)
                             : launch_step_typed<T, false>(p, noise_mode, abs_only, stream);
}

}  // namespace

cudaError_t launch_sampler_step(const StepParams& p, DType dtype, int64_t noise_mode,
                                bool abs_only, cudaStream_t stream) {
  if (p.batch == 0 || p.n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat16:
      return launch_step_dtype<__half>(p, noise_mode, abs_only, stream);
    case DType::kBFloat16:
      return launch_step_dtype<__nv_bfloat16>(p, noise_mode, abs_only, stream);
    default:
      return launch_step_dtype<float>(p, noise_mode, abs_only, stream);
  }
}

cudaError_t launch_sampler_cfg_stats(const void* cond, const void* uncond, float* partial,
                                     int64_t batch, int64_t n, int64_t stride_cond,
                                     int64_t stride_uncond, float guidance_scale,
                                     int64_t num_chunks, DType dtype, cudaStream_t stream) {
  if (batch == 0 || n == 0) return cudaSuccess;
  const dim3 grid{unsigned(num_chunks), unsigned(batch), 1u};
  switch (dtype) {
    case DType::kFloat16:
      sampler_cfg_stats_kernel<__half><<<grid, kThreads, 0, stream>>>(
          cond, uncond, partial, n, stride_cond, stride_uncond, guidance_scale, num_chunks);
      break;
    case DType::kBFloat16:
      sampler_cfg_stats_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          cond, uncond, partial, n, stride_cond, stride_uncond, guidance_scale, num_chunks);
      break;
    default:
      sampler_cfg_stats_kernel<float><<<grid, kThreads, 0, stream>>>(
          cond, uncond, partial, n, stride_cond, stride_uncond, guidance_scale, num_chunks);
  }
  return cudaGetLastError();
}

}  // namespace dlcore::sampler
