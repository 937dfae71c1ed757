// Launch interface between the CUDA sampler kernels (csrc/cuda/sampler.cu) and their torch
// binding (csrc/cuda/sampler_binding.cpp): plain pointers, strides and scalars.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace dlcore::sampler {

constexpr int64_t kStatsChunk = 4096;  // dlcore/ops/sampler.py STATS_CHUNK

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Rows (batch, n) with unit inner stride; strides in elements. Optional pointers may be null.
struct StepParams {
  const void* sample;
  const void* model_output;
  const void* uncond;
  const void* noise;
  const void* variance_pred;
  const float* alpha_t;
  const float* alpha_prev;
  const float* cfg_factor;
  const float* threshold;
  const float* noise_mask;
  void* prev_sample;
  void* pred_original_sample;
  int64_t batch, n;
  int64_t stride_sample, stride_model_output, stride_uncond, stride_noise, stride_variance_pred;
  int64_t stride_alpha_t, stride_alpha_prev, stride_cfg_factor, stride_threshold,
      stride_noise_mask;
  int64_t stride_prev_sample, stride_pred_original_sample;
  int64_t method, prediction_type, variance_type, clip_mode;
  float clip_range, eta, guidance_scale;
  bool use_clipped;
  uint64_t seed;
};

cudaError_t launch_sampler_step(const StepParams& p, DType dtype, int64_t noise_mode,
                                bool abs_only, cudaStream_t stream);

cudaError_t launch_sampler_cfg_stats(const void* cond, const void* uncond, float* partial,
                                     int64_t batch, int64_t n, int64_t stride_cond,
                                     int64_t stride_uncond, float guidance_scale,
                                     int64_t num_chunks, DType dtype, cudaStream_t stream);

}  // namespace dlcore::sampler
