// Selective scan: the parameter blocks shared by the CUDA kernels (scan.cu, CUDA-only code) and
// their torch binding (scan_binding.cpp). Plain C types only: this header is compiled by nvcc
// without torch headers. The contract is in dlcore/ops/scan.py.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dlcore {
namespace scan {

// Element type of u, delta, z, out, dout and of a variable B/C (all share it; the binding casts
// mixed inputs to fp32). Constant B/C and every parameter/state are fp32.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kMaxState = 256;

struct ScanParams {
  DType dtype;
  int batch, dim, seqlen, dstate;
  int chunk_size, nchunks, nseq;  // nseq: packed sequences (cu_seqlens), else batch
  bool b_var, c_var;              // (batch, G, N, L) when true, else (dim, N) fp32
  int dpg_b, dpg_c;               // channels per group of a variable B / C
  bool softplus, has_d, has_z, has_bias, has_h0, varlen, has_dlast;

  // Strides in elements; the L stride of u/delta/z/out/dout and of variable B/C is 1.
  int64_t u_b, u_d, dt_b, dt_d, z_b, z_d, out_b, out_d, dout_b, dout_d;
  int64_t B_b, B_g, B_n, C_b, C_g, C_n;  // constant: B_g is the channel stride

  const void *u, *delta, *z, *B, *C, *dout;
  const float *A, *D, *delta_bias, *h0, *dlast;  // A (dim, N), h0/dlast (nseq, dim, N), dense
  const int* cu_seqlens;                          // (nseq + 1,) when varlen
  void* out;
  float* last_state;    // (nseq, dim, N) dense
  float* chunk_states;  // (batch, dim, nchunks, N) dense; read by the backward

  // Backward. du/ddelta/dz: dense (batch, dim, L) fp32; dh0 like h0.
  float *du, *ddelta, *dz, *dh0;
  // Per (batch row, channel) partial sums, reduced over rows by the binding: dA (N), dD, dbias,
  // and dB/dC when constant (N).
  float *dA_part, *dD_part, *dbias_part, *dB_part, *dC_part;
  // Variable dB/dC target (dense, L innermost, N stride L): mode 1 one channel per group (slot
  // = channel); 2 atomic add into slot = group; 3 slot = program (deterministic partials, summed
  // by the binding). Mode 0: constant (dB_part/dC_part).
  float *dB_var, *dC_var;
  int db_mode, dc_mode;
  int64_t dB_b, dB_g, dC_b, dC_g;
  // Programs: blockIdx.x over (group of the channel map) x split; each loops over its run of
  // chans_per_prog channels inside one map group of dpg_map channels.
  int dpg_map, chans_per_prog, progs_per_group, nprog;
};

struct StateUpdateParams {
  DType dtype;  // x, dt, z, out and B/C
  int batch, dim, dstate, dpg_b, dpg_c;  // channels per B / C group
  bool softplus, has_d, has_z, has_bias;
  int64_t st_b, st_d, x_b, x_d, dt_b, dt_d, z_b, z_d, out_b, out_d, B_b, B_g, C_b, C_g;
  float* state;  // N stride 1
  const void *x, *dt, *z, *B, *C;
  const float *A, *D, *dt_bias;
  void* out;
};

cudaError_t selective_scan_fwd_cuda(const ScanParams& p, cudaStream_t stream);
cudaError_t selective_scan_bwd_cuda(const ScanParams& p, cudaStream_t stream);
cudaError_t selective_state_update_cuda(const StateUpdateParams& p, cudaStream_t stream);

}  // namespace scan
}  // namespace dlcore
