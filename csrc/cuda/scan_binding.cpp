// Torch binding of the selective-scan CUDA kernels (csrc/cuda/scan.cu): argument checks, dtype
// unification, stream lookup and marshalling into dlcore::scan::ScanParams. Built only where
// torch has CUDA. Schemas: csrc/dlcore.cpp; contract: dlcore/ops/scan.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <optional>

#include "cuda/scan.h"

namespace {

using at::Tensor;
using dlcore::scan::DType;
using dlcore::scan::ScanParams;
using dlcore::scan::StateUpdateParams;
using OptTensor = std::optional<Tensor>;

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "dlcore selective scan (cuda): unsupported dtype ", t.scalar_type(),
                  "; expected float32, float16 or bfloat16");
  }
}

void check_cuda(const char* name, const Tensor& t, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ",
              t.device());
}

void check_unit_stride(const char* name, const Tensor& t) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name,
              " must have unit stride in its last dimension, got strides ", t.strides());
}

void check_dense_f32(const char* name, const Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 buffer, got ", t.scalar_type(), " with strides ",
              t.strides());
}

// Parameters (A, D, delta_bias, initial states): fp32, dense.
Tensor param(const Tensor& t) { return t.to(at::kFloat).contiguous(); }
const float* param_ptr(const OptTensor& t, Tensor& keep) {
  if (!t.has_value()) return nullptr;
  keep = param(*t);
  return keep.data_ptr<float>();
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "dlcore ", what, " (cuda) failed: ", cudaGetErrorString(err));
}

// The sequence-shaped inputs share one element type in the kernel; mixed dtypes run in fp32.
struct SeqInputs {
  Tensor u, delta, z, B, C, dout;
  bool b_var, c_var, has_z;
  bool upcast = false;
};

void unify(SeqInputs& s) {
  const auto t = s.u.scalar_type();
  bool same = s.delta.scalar_type() == t && (!s.has_z || s.z.scalar_type() == t) &&
              (!s.b_var || s.B.scalar_type() == t) && (!s.c_var || s.C.scalar_type() == t) &&
              (!s.dout.defined() || s.dout.scalar_type() == t);
  if (!same) {
    s.upcast = true;
    s.u = s.u.to(at::kFloat);
    s.delta = s.delta.to(at::kFloat);
    if (s.has_z) s.z = s.z.to(at::kFloat);
    if (s.b_var) s.B = s.B.to(at::kFloat);
    if (s.c_var) s.C = s.C.to(at::kFloat);
    if (s.dout.defined()) s.dout = s.dout.to(at::kFloat);
  }
  if (!s.b_var) s.B = param(s.B);
  if (!s.c_var) s.C = param(s.C);
}

void fill_common(ScanParams& p, const SeqInputs& s, const Tensor& A, int64_t chunk_size,
                 int64_t nchunks, bool softplus) {
  p.dtype = dtype_of(s.u);
  p.batch = s.u.size(0);
  p.dim = s.u.size(1);
  p.seqlen = s.u.size(2);
  p.dstate = A.size(1);
  p.chunk_size = chunk_size;
  p.nchunks = nchunks;
  p.b_var = s.b_var;
  p.c_var = s.c_var;
  p.dpg_b = s.b_var ? p.dim / s.B.size(1) : 1;
  p.dpg_c = s.c_var ? p.dim / s.C.size(1) : 1;
  p.softplus = softplus;
  p.has_z = s.has_z;
  p.u_b = s.u.stride(0);
  p.u_d = s.u.stride(1);
  p.dt_b = s.delta.stride(0);
  p.dt_d = s.delta.stride(1);
  if (s.has_z) {
    p.z_b = s.z.stride(0);
    p.z_d = s.z.stride(1);
    p.z = s.z.data_ptr();
  }
  if (s.b_var) {
    p.B_b = s.B.stride(0);
    p.B_g = s.B.stride(1);
    p.B_n = s.B.stride(2);
  } else {
    p.B_b = 0;
    p.B_g = s.B.stride(0);
    p.B_n = s.B.stride(1);
  }
  if (s.c_var) {
    p.C_b = s.C.stride(0);
    p.C_g = s.C.stride(1);
    p.C_n = s.C.stride(2);
  } else {
    p.C_b = 0;
    p.C_g = s.C.stride(0);
    p.C_n = s.C.stride(1);
  }
  p.u = s.u.data_ptr();
  p.delta = s.delta.data_ptr();
  p.B = s.B.data_ptr();
  p.C = s.C.data_ptr();
}

SeqInputs check_inputs(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                       const Tensor& C, const OptTensor& z, const OptTensor& cu_seqlens) {
  TORCH_CHECK(u.dim() == 3, "u must be (batch, dim, L), got ", u.sizes());
  TORCH_CHECK(delta.sizes() == u.sizes(), "delta must match u ", u.sizes(), ", got ",
              delta.sizes());
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1) && A.size(1) >= 1 &&
                  A.size(1) <= dlcore::scan::kMaxState,
              "A must be (dim, N) with dim = ", u.size(1), " and 1 <= N <= ",
              dlcore::scan::kMaxState, ", got ", A.sizes());
  check_cuda("delta", delta, u);
  check_cuda("A", A, u);
  check_unit_stride("u", u);
  check_unit_stride("delta", delta);
  SeqInputs s{u, delta, z.has_value() ? *z : Tensor(), B, C, Tensor(), B.dim() == 4,
              C.dim() == 4, z.has_value()};
  for (auto [name, M] : {std::pair<const char*, const Tensor*>{"B", &B}, {"C", &C}}) {
    check_cuda(name, *M, u);
    if (M->dim() == 4) {
      TORCH_CHECK(M->size(0) == u.size(0) && M->size(2) == A.size(1) && M->size(3) == u.size(2) &&
                      M->size(1) >= 1 && u.size(1) % M->size(1) == 0,
                  name, " must be (batch, G, N, L) with G dividing dim, got ", M->sizes());
      check_unit_stride(name, *M);
    } else {
      TORCH_CHECK(M->dim() == 2 && M->size(0) == u.size(1) && M->size(1) == A.size(1), name,
                  " must be (dim, N) or (batch, G, N, L), got ", M->sizes());
    }
  }
  if (s.has_z) {
    TORCH_CHECK(z->sizes() == u.sizes(), "z must match u ", u.sizes(), ", got ", z->sizes());
    check_cuda("z", *z, u);
    check_unit_stride("z", *z);
  }
  if (cu_seqlens.has_value()) {
    check_cuda("cu_seqlens", *cu_seqlens, u);
    TORCH_CHECK(u.size(0) == 1 && cu_seqlens->dim() == 1 && cu_seqlens->size(0) >= 2,
                "cu_seqlens needs batch == 1 and shape (nseq + 1,), got u ", u.sizes(),
                " and cu_seqlens ", cu_seqlens->sizes());
  }
  return s;
}

void selective_scan_fwd_cuda(const Tensor& u, const Tensor& delta, const Tensor& A,
                             const Tensor& B, const Tensor& C, const OptTensor& D,
                             const OptTensor& z, const OptTensor& delta_bias,
                             const OptTensor& initial_state, const OptTensor& cu_seqlens,
                             bool delta_softplus, int64_t chunk_size, const Tensor& out,
                             const Tensor& last_state, const Tensor& chunk_states) {
  c10::cuda::CUDAGuard guard(u.device());
  SeqInputs s = check_inputs(u, delta, A, B, C, z, cu_seqlens);
  TORCH_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
  TORCH_CHECK(out.sizes() == u.sizes() && out.scalar_type() == u.scalar_type(),
              "out must be like u ", u.sizes(), " ", u.scalar_type(), ", got ", out.sizes(), " ",
              out.scalar_type());
  check_unit_stride("out", out);
  check_dense_f32("last_state", last_state);
  check_dense_f32("chunk_states", chunk_states);
  unify(s);
  const int64_t nchunks = (u.size(2) + chunk_size - 1) / chunk_size;
  TORCH_CHECK(chunk_states.dim() == 4 && chunk_states.size(2) == nchunks,
              "chunk_states must be (batch, dim, ", nchunks, ", N), got ", chunk_states.sizes());
  ScanParams p{};
  fill_common(p, s, A, chunk_size, nchunks, delta_softplus);
  Tensor A32 = param(A), D32, bias32, h032, cu32;
  p.A = A32.data_ptr<float>();
  p.D = param_ptr(D, D32);
  p.delta_bias = param_ptr(delta_bias, bias32);
  p.h0 = param_ptr(initial_state, h032);
  p.has_d = D.has_value();
  p.has_bias = delta_bias.has_value();
  p.has_h0 = initial_state.has_value();
  p.varlen = cu_seqlens.has_value();
  p.nseq = p.varlen ? cu_seqlens->size(0) - 1 : p.batch;
  TORCH_CHECK(last_state.dim() == 3 && last_state.size(0) == p.nseq,
              "last_state must be (", p.nseq, ", dim, N), got ", last_state.sizes());
  if (p.varlen) {
    cu32 = cu_seqlens->to(at::kInt).contiguous();
    p.cu_seqlens = cu32.data_ptr<int>();
  }
  Tensor out_buf = s.upcast ? at::empty(u.sizes(), u.options().dtype(at::kFloat)) : out;
  p.out = out_buf.data_ptr();
  p.out_b = out_buf.stride(0);
  p.out_d = out_buf.stride(1);
  p.last_state = last_state.data_ptr<float>();
  p.chunk_states = chunk_states.data_ptr<float>();
  check_launch(dlcore::scan::selective_scan_fwd_cuda(p, c10::cuda::getCurrentCUDAStream()),
               "selective_scan_fwd");
  if (s.upcast) out.copy_(out_buf);
}

void selective_scan_bwd_cuda(const Tensor& dout, const Tensor& u, const Tensor& delta,
                             const Tensor& A, const Tensor& B, const Tensor& C, const OptTensor& D,
                             const OptTensor& z, const OptTensor& delta_bias,
                             const OptTensor& initial_state, const OptTensor& cu_seqlens,
                             bool delta_softplus, int64_t chunk_size, const Tensor& chunk_states,
                             const OptTensor& dlast_state, bool deterministic, const Tensor& du,
                             const Tensor& ddelta, const Tensor& dA, const Tensor& dB,
                             const Tensor& dC, const OptTensor& dD, const OptTensor& dz,
                             const OptTensor& ddelta_bias, const OptTensor& dinitial_state) {
  c10::cuda::CUDAGuard guard(u.device());
  SeqInputs s = check_inputs(u, delta, A, B, C, z, cu_seqlens);
  TORCH_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
  TORCH_CHECK(dout.sizes() == u.sizes(), "dout must match u ", u.sizes(), ", got ", dout.sizes());
  check_cuda("dout", dout, u);
  check_unit_stride("dout", dout);
  s.dout = dout;
  check_dense_f32("du", du);
  check_dense_f32("ddelta", ddelta);
  check_dense_f32("dA", dA);
  check_dense_f32("dB", dB);
  check_dense_f32("dC", dC);
  TORCH_CHECK(D.has_value() == dD.has_value() && z.has_value() == dz.has_value() &&
                  delta_bias.has_value() == ddelta_bias.has_value() &&
                  initial_state.has_value() == dinitial_state.has_value(),
              "dD/dz/ddelta_bias/dinitial_state must be given exactly when D/z/delta_bias/"
              "initial_state are");
  if (dz.has_value()) check_dense_f32("dz", *dz);
  if (dinitial_state.has_value()) check_dense_f32("dinitial_state", *dinitial_state);
  const Tensor states = chunk_states.to(at::kFloat).contiguous();
  const int64_t nchunks = (u.size(2) + chunk_size - 1) / chunk_size;
  TORCH_CHECK(states.dim() == 4 && states.size(2) == nchunks,
              "chunk_states must be (batch, dim, ", nchunks, ", N), got ", states.sizes());
  unify(s);

  ScanParams p{};
  fill_common(p, s, A, chunk_size, nchunks, delta_softplus);
  Tensor A32 = param(A), D32, bias32, h032, dlast32, cu32;
  p.A = A32.data_ptr<float>();
  p.D = param_ptr(D, D32);
  p.delta_bias = param_ptr(delta_bias, bias32);
  p.h0 = param_ptr(initial_state, h032);
  p.dlast = param_ptr(dlast_state, dlast32);
  p.has_d = D.has_value();
  p.has_bias = delta_bias.has_value();
  p.has_h0 = initial_state.has_value();
  p.has_dlast = dlast_state.has_value();
  p.varlen = cu_seqlens.has_value();
  p.nseq = p.varlen ? cu_seqlens->size(0) - 1 : p.batch;
  if (p.varlen) {
    cu32 = cu_seqlens->to(at::kInt).contiguous();
    p.cu_seqlens = cu32.data_ptr<int>();
  }
  p.chunk_states = const_cast<float*>(states.data_ptr<float>());
  p.dout = s.dout.data_ptr();
  p.dout_b = s.dout.stride(0);
  p.dout_d = s.dout.stride(1);
  p.du = du.data_ptr<float>();
  p.ddelta = ddelta.data_ptr<float>();
  p.dz = dz.has_value() ? dz->data_ptr<float>() : nullptr;
  p.dh0 = dinitial_state.has_value() ? dinitial_state->data_ptr<float>() : nullptr;

  // Channel runs never cross a B or a C group; runs of several channels only in deterministic
  // mode, where channels sharing a variable dB/dC slot add into per-program partials.
  const int64_t batch = p.batch, dim = p.dim, n = p.dstate, length = p.seqlen;
  const int64_t groups = std::lcm<int64_t>(p.b_var ? dim / p.dpg_b : 1,
                                           p.c_var ? dim / p.dpg_c : 1);
  const int64_t dpg = dim / groups;
  const bool shared = (p.b_var && p.dpg_b > 1) || (p.c_var && p.dpg_c > 1);
  int64_t split = dpg, chans = 1;
  if (deterministic && shared) {
    const int64_t want = std::max<int64_t>(1, 512 / (batch * groups));
    split = std::max<int64_t>(1, std::min<int64_t>({dpg, want, 32}));
    chans = (dpg + split - 1) / split;
    split = (dpg + chans - 1) / chans;
  }
  p.dpg_map = dpg;
  p.chans_per_prog = chans;
  p.progs_per_group = split;
  p.nprog = groups * split;

  const auto f32 = u.options().dtype(at::kFloat);
  Tensor dA_part = at::empty({batch, dim, n}, f32);
  Tensor dD_part = at::empty({batch, dim}, f32);
  Tensor bias_part = at::empty({batch, dim}, f32);
  Tensor dB_part, dC_part, dB_slots, dC_slots;
  auto target = [&](const Tensor& M, const Tensor& dM, bool var, Tensor& part, Tensor& slots,
                    int& mode, float*& var_ptr, float*& part_ptr, int64_t& sb, int64_t& sg) {
    if (!var) {
      part = at::empty({batch, dim, n}, f32);
      part_ptr = part.data_ptr<float>();
      mode = 0;
      return;
    }
    if (M.size(1) == dim) {
      slots = dM;
      mode = 1;
    } else if (!deterministic) {
      dM.zero_();
      slots = dM;
      mode = 2;
    } else {
      slots = at::zeros({batch, p.nprog, n, length}, f32);
      mode = 3;
    }
    var_ptr = slots.data_ptr<float>();
    sb = slots.stride(0);
    sg = slots.stride(1);
  };
  target(s.B, dB, p.b_var, dB_part, dB_slots, p.db_mode, p.dB_var, p.dB_part, p.dB_b, p.dB_g);
  target(s.C, dC, p.c_var, dC_part, dC_slots, p.dc_mode, p.dC_var, p.dC_part, p.dC_b, p.dC_g);
  p.dA_part = dA_part.data_ptr<float>();
  p.dD_part = dD_part.data_ptr<float>();
  p.dbias_part = bias_part.data_ptr<float>();
  check_launch(dlcore::scan::selective_scan_bwd_cuda(p, c10::cuda::getCurrentCUDAStream()),
               "selective_scan_bwd");

  // Fixed-order reductions over batch rows and channel runs (deterministic).
  dA.copy_(dA_part.sum(0));
  auto finish = [&](const Tensor& dM, int mode, const Tensor& part, const Tensor& slots,
                    int64_t g) {
    if (mode == 0) dM.copy_(part.sum(0));
    if (mode == 3) dM.copy_(slots.view({batch, g, p.nprog / g, n, length}).sum(2));
  };
  finish(dB, p.db_mode, dB_part, dB_slots, p.b_var ? s.B.size(1) : 1);
  finish(dC, p.dc_mode, dC_part, dC_slots, p.c_var ? s.C.size(1) : 1);
  if (dD.has_value()) dD->copy_(dD_part.sum(0));
  if (ddelta_bias.has_value()) ddelta_bias->copy_(bias_part.sum(0));
}

void selective_state_update_cuda(const Tensor& state, const Tensor& x, const Tensor& dt,
                                 const Tensor& A, const Tensor& B, const Tensor& C,
                                 const OptTensor& D, const OptTensor& z, const OptTensor& dt_bias,
                                 bool dt_softplus, const Tensor& out) {
  c10::cuda::CUDAGuard guard(state.device());
  TORCH_CHECK(state.dim() == 3 && state.scalar_type() == at::kFloat,
              "state must be (batch, dim, N) float32, got ", state.sizes(), " ",
              state.scalar_type());
  check_unit_stride("state", state);
  const int64_t batch = state.size(0), dim = state.size(1), n = state.size(2);
  TORCH_CHECK(n >= 1 && n <= dlcore::scan::kMaxState, "N must be in [1, ",
              dlcore::scan::kMaxState, "], got ", n);
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"x", &x}, {"dt", &dt},
                         {"out", &out}}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == batch && t->size(1) == dim, name,
                " must be (batch, dim) = (", batch, ", ", dim, "), got ", t->sizes());
    check_cuda(name, *t, state);
  }
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim && A.size(1) == n, "A must be (", dim, ", ", n,
              "), got ", A.sizes());
  for (auto [name, M] : {std::pair<const char*, const Tensor*>{"B", &B}, {"C", &C}}) {
    TORCH_CHECK(M->dim() == 3 && M->size(0) == batch && M->size(2) == n && M->size(1) >= 1 &&
                    dim % M->size(1) == 0,
                name, " must be (batch, G, N) with G dividing dim, got ", M->sizes());
    check_cuda(name, *M, state);
  }
  const auto t = x.scalar_type();
  const bool same = dt.scalar_type() == t && B.scalar_type() == t && C.scalar_type() == t &&
                    (!z.has_value() || z->scalar_type() == t);
  auto conv = [&](const Tensor& v) {
    Tensor r = same ? v : v.to(at::kFloat);
    return r.size(-1) <= 1 || r.stride(-1) == 1 ? r : r.contiguous();
  };
  Tensor xx = conv(x), dtt = conv(dt), BB = conv(B), CC = conv(C);
  Tensor zz = z.has_value() ? conv(*z) : Tensor();
  if (z.has_value())
    TORCH_CHECK(z->dim() == 2 && z->size(0) == batch && z->size(1) == dim,
                "z must be (batch, dim), got ", z->sizes());
  Tensor out_buf = same ? out : at::empty({batch, dim}, out.options().dtype(at::kFloat));
  Tensor A32 = param(A), D32, bias32;
  StateUpdateParams p{};
  p.dtype = dtype_of(xx);
  p.batch = batch;
  p.dim = dim;
  p.dstate = n;
  p.dpg_b = dim / B.size(1);
  p.dpg_c = dim / C.size(1);
  p.softplus = dt_softplus;
  p.has_d = D.has_value();
  p.has_z = z.has_value();
  p.has_bias = dt_bias.has_value();
  p.st_b = state.stride(0);
  p.st_d = state.stride(1);
  p.x_b = xx.stride(0);
  p.x_d = xx.stride(1);
  p.dt_b = dtt.stride(0);
  p.dt_d = dtt.stride(1);
  if (p.has_z) {
    p.z_b = zz.stride(0);
    p.z_d = zz.stride(1);
    p.z = zz.data_ptr();
  }
  p.out_b = out_buf.stride(0);
  p.out_d = out_buf.stride(1);
  p.B_b = BB.stride(0);
  p.B_g = BB.stride(1);
  p.C_b = CC.stride(0);
  p.C_g = CC.stride(1);
  p.state = state.data_ptr<float>();
  p.x = xx.data_ptr();
  p.dt = dtt.data_ptr();
  p.B = BB.data_ptr();
  p.C = CC.data_ptr();
  p.A = A32.data_ptr<float>();
  p.D = param_ptr(D, D32);
  p.dt_bias = param_ptr(dt_bias, bias32);
  p.out = out_buf.data_ptr();
  check_launch(dlcore::scan::selective_state_update_cuda(p, c10::cuda::getCurrentCUDAStream()),
               "selective_state_update");
  if (!same) out.copy_(out_buf);
}

}  // namespace

TORCH_LIBRARY_IMPL(dlcore, CUDA, m) {
  m.impl("selective_scan_fwd_kernel", &selective_scan_fwd_cuda);
  m.impl("selective_scan_bwd_kernel", &selective_scan_bwd_cuda);
  m.impl("selective_state_update_kernel", &selective_state_update_cuda);
}
