// The one schema file: every C++/CUDA kernel op of dlcore is declared here. Kernels register
// their implementations next to their code with TORCH_LIBRARY_IMPL(dlcore, CPU|CUDA, m).
// These are kernel-layer ops (contiguous tensors, plain scalars, outputs written in place);
// the user-facing ops with validation, fake impls and autograd live in dlcore/ops/.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dlcore, m) {
  // ---- sampler (csrc/cpu/sampler.cpp, csrc/cuda/sampler.cu) ----
  // Rows: every tensor is (batch, n) with unit inner stride (any batch stride; the CPU kernels also
  // take (batch, ...) with contiguous samples); alphas, cfg_factor, threshold and noise_mask are
  // float32 (batch,). See dlcore/ops/sampler.py for the contract.
  m.def(
      "sampler_step_kernel(Tensor sample, Tensor model_output, Tensor? uncond, Tensor? noise, "
      "Tensor? variance_pred, Tensor alpha_t, Tensor alpha_prev, Tensor? cfg_factor, "
      "Tensor? threshold, Tensor? noise_mask, int method, int prediction_type, int variance_type, "
      "int clip_mode, float clip_range, float eta, bool use_clipped_model_output, "
      "float guidance_scale, int seed, int noise_mode, bool abs_x0_only, "
      "Tensor(a!) prev_sample, Tensor(b!) pred_original_sample) -> ()");
  m.def(
      "sampler_cfg_stats_kernel(Tensor cond, Tensor uncond, float guidance_scale, "
      "Tensor(a!) partial) -> ()");
  m.def(
      "sampler_quantile_kernel(Tensor(a!) scratch, float ratio, float min_value, "
      "float max_value, Tensor(b!) out) -> ()");

  // ---- attention (csrc/cpu/attention.cpp) ----
  // q (B,Hq,Lq,D), k/v (B,Hk,Lk,D), unit stride in the last dim; see dlcore/ops/attention.py.
  m.def(
      "attention_fwd_kernel(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? alibi_slopes, "
      "float scale, int diag_offset, int window_left, int window_right, float softcap, "
      "float dropout_p, int seed, Tensor(a!) out, Tensor(b!) lse) -> ()");
  m.def(
      "attention_bwd_kernel(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? bias, Tensor? alibi_slopes, float scale, int diag_offset, int window_left, "
      "int window_right, float softcap, float dropout_p, int seed, bool deterministic, "
      "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv) -> ()");

  // ---- selective scan (csrc/cpu/scan.cpp, csrc/cuda/scan.cu) ----
  // u/delta/z/out (batch,dim,L); see dlcore/ops/scan.py for the full contract.
  m.def(
      "selective_scan_fwd_kernel(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, Tensor? initial_state, Tensor? cu_seqlens, "
      "bool delta_softplus, int chunk_size, Tensor(a!) out, Tensor(b!) last_state, "
      "Tensor(c!) chunk_states) -> ()");
  m.def(
      "selective_scan_bwd_kernel(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, Tensor? initial_state, "
      "Tensor? cu_seqlens, bool delta_softplus, int chunk_size, Tensor chunk_states, "
      "Tensor? dlast_state, bool deterministic, Tensor(a!) du, Tensor(b!) ddelta, "
      "Tensor(c!) dA, Tensor(d!) dB, Tensor(e!) dC, Tensor(f!)? dD, Tensor(g!)? dz, "
      "Tensor(h!)? ddelta_bias, Tensor(i!)? dinitial_state) -> ()");
  m.def(
      "selective_state_update_kernel(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, bool dt_softplus, Tensor(b!) out) -> ()");

  // ---- lora (csrc/cpu/lora.cpp) ----
  // x (tokens, in) and the stacks' last dims unit-stride; lora_A (n, r, in); scalings float32/64
  // (n,); indices int32 (tokens,), -1 = no adapter (None: one adapter); xa float32 (tokens, r).
  // See dlcore/ops/lora.py for the contract.
  m.def(
      "lora_skinny_fwd_kernel(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, "
      "Tensor lora_B, Tensor scalings, Tensor? indices, Tensor(a!) out, Tensor(b!) xa) -> ()");
  m.def(
      "lora_multi_update_kernel(Tensor x, Tensor lora_A, Tensor lora_B_t, Tensor scalings, "
      "Tensor? indices, Tensor(a!) out, Tensor(b!) xa, Tensor? bias=None, "
      "bool overwrite=False) -> ()");
  // g = s dy lora_B, dA = g^T x, dB = s dy^T xa; lora_B (out, r), r <= 64 (float32) / 32.
  m.def(
      "lora_factor_grads_kernel(Tensor dy, Tensor x, Tensor lora_B, Tensor xa, float scaling, "
      "Tensor(a!) g, Tensor(b!) dA, Tensor(c!) dB) -> ()");
}

// `import dlcore._C` loads this library and so runs the registrations above; it exposes no
// Python functions.
static struct PyModuleDef dlcore_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dlcore_c_module); }
