// Torch binding of the CUDA sampler kernels (csrc/cuda/sampler.cu): argument checks, stream,
// and the TORCH_LIBRARY_IMPL(dlcore, CUDA) registrations. Built only where torch has CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/sampler.h"

namespace {

using dlcore::sampler::DType;
using dlcore::sampler::StepParams;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "dlcore sampler kernels take float32, float16 or bfloat16 tensors, got ",
                  t.scalar_type());
  }
}

void check_rows(const char* name, const at::Tensor& t, int64_t B, int64_t N,
                at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == N, name, " must have shape (", B,
              ", ", N, "), got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1 || N <= 1, name, " must have unit stride in its last dimension");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have the sample's dtype");
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
}

void check_per_sample(const char* name, const at::Tensor& t, int64_t B,
                      const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == B, name,
              " must be a float32 tensor of shape (", B, ",)");
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
}

const float* per_sample_ptr(const c10::optional<at::Tensor>& t, const char* name, int64_t B,
                            const at::Device& device, int64_t& stride) {
  stride = 0;
  if (!t.has_value()) return nullptr;
  check_per_sample(name, *t, B, device);
  stride = t->stride(0);
  return t->data_ptr<float>();
}

void sampler_step_cuda(const at::Tensor& sample, const at::Tensor& model_output,
                       const c10::optional<at::Tensor>& uncond,
                       const c10::optional<at::Tensor>& noise,
                       const c10::optional<at::Tensor>& variance_pred, const at::Tensor& alpha_t,
                       const at::Tensor& alpha_prev,
                       const c10::optional<at::Tensor>& cfg_factor,
                       const c10::optional<at::Tensor>& threshold,
                       const c10::optional<at::Tensor>& noise_mask, int64_t method,
                       int64_t prediction_type, int64_t variance_type, int64_t clip_mode,
                       double clip_range, double eta, bool use_clipped_model_output,
                       double guidance_scale, int64_t seed, int64_t noise_mode,
                       bool abs_x0_only, at::Tensor& prev_sample,
                       at::Tensor& pred_original_sample) {
  const int64_t B = sample.size(0), N = sample.size(1);
  const auto dtype = sample.scalar_type();
  const auto device = sample.device();
  TORCH_CHECK(device.is_cuda(), "sample must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(device);
  check_rows("sample", sample, B, N, dtype, device);
  check_rows("model_output", model_output, B, N, dtype, device);
  check_rows("pred_original_sample", pred_original_sample, B, N, dtype, device);
  if (!abs_x0_only) check_rows("prev_sample", prev_sample, B, N, dtype, device);
  if (uncond.has_value()) check_rows("uncond", *uncond, B, N, dtype, device);
  TORCH_CHECK(noise_mode >= 0 && noise_mode <= 2, "noise_mode must be 0, 1 or 2");
  if (noise_mode == 1) {
    TORCH_CHECK(noise.has_value(), "noise_mode 1 needs a noise tensor");
    check_rows("noise", *noise, B, N, dtype, device);
  }
  const bool learned = variance_type == 4 || variance_type == 5;
  if (learned && noise_mode != 0 && !abs_x0_only) {
    TORCH_CHECK(variance_pred.has_value(), "learned variance types need variance_pred");
    check_rows("variance_pred", *variance_pred, B, N, dtype, device);
  }
  TORCH_CHECK(clip_mode != 2 || threshold.has_value(), "clip_mode 2 needs threshold");
  check_per_sample("alpha_t", alpha_t, B, device);
  check_per_sample("alpha_prev", alpha_prev, B, device);

  StepParams p{};
  p.sample = sample.data_ptr();
  p.model_output = model_output.data_ptr();
  p.uncond = uncond.has_value() ? uncond->data_ptr() : nullptr;
  p.noise = noise_mode == 1 ? noise->data_ptr() : nullptr;
  p.variance_pred = variance_pred.has_value() ? variance_pred->data_ptr() : nullptr;
  p.alpha_t = alpha_t.data_ptr<float>();
  p.alpha_prev = alpha_prev.data_ptr<float>();
  p.cfg_factor = per_sample_ptr(cfg_factor, "cfg_factor", B, device, p.stride_cfg_factor);
  p.threshold = per_sample_ptr(threshold, "threshold", B, device, p.stride_threshold);
  p.noise_mask = per_sample_ptr(noise_mask, "noise_mask", B, device, p.stride_noise_mask);
  p.prev_sample = abs_x0_only ? nullptr : prev_sample.data_ptr();
  p.pred_original_sample = pred_original_sample.data_ptr();
  p.batch = B;
  p.n = N;
  p.stride_sample = sample.stride(0);
  p.stride_model_output = model_output.stride(0);
  p.stride_uncond = uncond.has_value() ? uncond->stride(0) : 0;
  p.stride_noise = noise_mode == 1 ? noise->stride(0) : 0;
  p.stride_variance_pred = variance_pred.has_value() ? variance_pred->stride(0) : 0;
  p.stride_alpha_t = alpha_t.stride(0);
  p.stride_alpha_prev = alpha_prev.stride(0);
  p.stride_prev_sample = abs_x0_only ? 0 : prev_sample.stride(0);
  p.stride_pred_original_sample = pred_original_sample.stride(0);
  p.method = method;
  p.prediction_type = prediction_type;
  p.variance_type = variance_type;
  p.clip_mode = clip_mode;
  p.clip_range = float(clip_range);
  p.eta = float(eta);
  p.guidance_scale = float(guidance_scale);
  p.use_clipped = use_clipped_model_output;
  p.seed = uint64_t(seed);
  const cudaError_t err = dlcore::sampler::launch_sampler_step(
      p, dtype_of(sample), noise_mode, abs_x0_only,
      c10::cuda::getCurrentCUDAStream(device.index()).stream());
  TORCH_CHECK(err == cudaSuccess, "sampler_step_kernel launch failed: ", cudaGetErrorString(err));
}

void sampler_cfg_stats_cuda(const at::Tensor& cond, const at::Tensor& uncond,
                            double guidance_scale, at::Tensor& partial) {
  const int64_t B = cond.size(0), N = cond.size(1);
  const auto device = cond.device();
  TORCH_CHECK(device.is_cuda(), "cond must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(device);
  check_rows("cond", cond, B, N, cond.scalar_type(), device);
  check_rows("uncond", uncond, B, N, cond.scalar_type(), device);
  const int64_t P = (N + dlcore::sampler::kStatsChunk - 1) / dlcore::sampler::kStatsChunk;
  TORCH_CHECK(partial.scalar_type() == at::kFloat && partial.is_contiguous() &&
                  partial.dim() == 3 && partial.size(0) == B && partial.size(1) == P &&
                  partial.size(2) == 4 && partial.device() == device,
              "partial must be a contiguous float32 tensor of shape (", B, ", ", P,
              ", 4) on ", device);
  const cudaError_t err = dlcore::sampler::launch_sampler_cfg_stats(
      cond.data_ptr(), uncond.data_ptr(), partial.data_ptr<float>(), B, N, cond.stride(0),
      uncond.stride(0), float(guidance_scale), P, dtype_of(cond),
      c10::cuda::getCurrentCUDAStream(device.index()).stream());
  TORCH_CHECK(err == cudaSuccess, "sampler_cfg_stats_kernel launch failed: ",
              cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(dlcore, CUDA, m) {
  m.impl("sampler_step_kernel", &sampler_step_cuda);
  m.impl("sampler_cfg_stats_kernel", &sampler_cfg_stats_cuda);
}
