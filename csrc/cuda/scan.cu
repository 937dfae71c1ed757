// Selective scan (Mamba) CUDA kernels: forward, backward, decode step. CUDA-only code (no torch
// headers); the torch binding is scan_binding.cpp and the contract is in dlcore/ops/scan.py.
//
// One block owns one (batch row, channel) and walks L in tiles of kThreads * kItems steps; each
// thread holds kItems consecutive steps (16-byte vector loads). For every state index n the
// block scans the affine maps (a, b) = (exp(delta' A_n), delta' B_n u) of the tile: each thread
// composes its own steps, a warp-shuffle + shared-memory block scan gives every thread the state
// entering its steps (carrying the state across tiles), and the thread replays its steps
// sequentially. The backward recomputes forward states per tile from the saved chunk states and
// solves the adjoint recurrence g_t = C_t dy_t + a_{t+1} g_{t+1} with the same scan run in
// reverse thread order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/scan.h"

namespace dlcore {
namespace scan {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullMask = 0xffffffffu;

struct Pair {
  float a, b;
};

// (y after x): h -> y.a (x.a h + x.b) + y.b.
__device__ __forceinline__ Pair combine(Pair x, Pair y) {
  return {x.a * y.a, fmaf(y.a, x.b, y.b)};
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <int Bytes>
struct VecType;
template <>
struct VecType<16> {
  using type = int4;
};
template <>
struct VecType<8> {
  using type = int2;
};

// K consecutive elements p[0..K) as floats (0 past n_valid), one vector load when whole and
// aligned.
template <typename T, int K>
__device__ __forceinline__ void load_items(const T* p, int n_valid, float (&out)[K]) {
  using V = typename VecType<K * sizeof(T)>::type;
  if (n_valid >= K && reinterpret_cast<uintptr_t>(p) % sizeof(V) == 0) {
    V v = *reinterpret_cast<const V*>(p);
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < K; ++i) out[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < K; ++i) out[i] = i < n_valid ? to_float(p[i]) : 0.f;
  }
}

template <typename T, int K>
__device__ __forceinline__ void store_items(T* p, int n_valid, const float (&in)[K]) {
  using V = typename VecType<K * sizeof(T)>::type;
  if (n_valid >= K && reinterpret_cast<uintptr_t>(p) % sizeof(V) == 0) {
    V v;
    T* e = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int i = 0; i < K; ++i) e[i] = from_float<T>(in[i]);
    *reinterpret_cast<V*>(p) = v;
  } else {
#pragma unroll
    for (int i = 0; i < K; ++i)
      if (i < n_valid) p[i] = from_float<T>(in[i]);
  }
}

// torch / mamba_ssm softplus (threshold 20); expf alone far below 0 keeps full precision.
__device__ __forceinline__ float softplus(float x) {
  return x > 20.f ? x : (x < -15.f ? __expf(x) : log1pf(__expf(x)));
}
__device__ __forceinline__ float softplus_grad(float x) {
  return x > 20.f ? 1.f : 1.f / (1.f + __expf(-x));
}

// Exclusive scan of one Pair per thread in thread order (kReverse: from the last thread down),
// starting from `carry`; `total` gets carry composed with every element. All threads call it.
template <int kThreads, bool kReverse>
__device__ __forceinline__ Pair block_exclusive_scan(Pair v, Pair carry, Pair* warp_totals,
                                                     Pair& total) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int llane = kReverse ? 31 - lane : lane;
  const int lwarp = kReverse ? kWarps - 1 - warp : warp;
  Pair inc = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    Pair o;
    if (kReverse) {
      o.a = __shfl_down_sync(kFullMask, inc.a, off);
      o.b = __shfl_down_sync(kFullMask, inc.b, off);
    } else {
      o.a = __shfl_up_sync(kFullMask, inc.a, off);
      o.b = __shfl_up_sync(kFullMask, inc.b, off);
    }
    if (llane >= off) inc = combine(o, inc);
  }
  Pair ex;
  if (kReverse) {
    ex.a = __shfl_down_sync(kFullMask, inc.a, 1);
    ex.b = __shfl_down_sync(kFullMask, inc.b, 1);
  } else {
    ex.a = __shfl_up_sync(kFullMask, inc.a, 1);
    ex.b = __shfl_up_sync(kFullMask, inc.b, 1);
  }
  if (llane == 31) warp_totals[lwarp] = inc;
  __syncthreads();
  Pair prefix = carry, all = carry;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const Pair t = warp_totals[w];
    if (w < lwarp) prefix = combine(prefix, t);
    all = combine(all, t);
  }
  __syncthreads();  // warp_totals is reused by the next scan
  total = all;
  return llane == 0 ? prefix : combine(prefix, ex);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// The packed sequence holding position t: the largest s < nseq with cu[s] <= t.
__device__ __forceinline__ int seq_of(const int* cu, int nseq, int64_t t) {
  int lo = 0, hi = nseq;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (cu[mid] <= t)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// Per-thread view of its K steps of a tile: positions, discretised delta, u, sequence data.
template <int K>
struct Steps {
  int64_t t0;  // first step of this thread
  int n_valid;
  float u[K], dt[K], x[K];  // x: delta + bias before softplus
  int seq[K];
  unsigned starts, ends;  // bit i: step i starts / ends its packed sequence
};

template <typename T, int K>
__device__ __forceinline__ void load_steps(const ScanParams& p, const T* u_row, const T* dt_row,
                                           int64_t t0, int64_t t_end, float bias, Steps<K>& s) {
  s.t0 = t0;
  const int64_t left = t_end - t0;
  s.n_valid = left <= 0 ? 0 : (left >= K ? K : static_cast<int>(left));
  load_items<T, K>(u_row + t0, s.n_valid, s.u);
  load_items<T, K>(dt_row + t0, s.n_valid, s.x);
#pragma unroll
  for (int i = 0; i < K; ++i) {
    s.x[i] += bias;
    const float d = p.softplus ? softplus(s.x[i]) : s.x[i];
    s.dt[i] = i < s.n_valid ? d : 0.f;  // padded steps are identities: a = 1, b = 0
  }
  s.starts = s.ends = 0;
  if (p.varlen && s.n_valid > 0) {
    int q = seq_of(p.cu_seqlens, p.nseq, t0);
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int64_t t = t0 + i;
      while (q + 1 < p.nseq && p.cu_seqlens[q + 1] <= t) ++q;
      s.seq[i] = q;
      if (i < s.n_valid) {
        if (p.cu_seqlens[q] == t) s.starts |= 1u << i;
        if (p.cu_seqlens[q + 1] == t + 1) s.ends |= 1u << i;
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < K; ++i) s.seq[i] = 0;
  }
}

// B or C of state n for the thread's steps (variable), or the constant value.
template <typename T, int K>
__device__ __forceinline__ void load_bc(const void* M, bool var, int64_t base_var, int64_t s_n,
                                        int64_t const_off, int n, int64_t t0, int n_valid,
                                        float (&out)[K]) {
  if (var) {
    load_items<T, K>(static_cast<const T*>(M) + base_var + n * s_n + t0, n_valid, out);
  } else {
    const float c = static_cast<const float*>(M)[const_off + n * s_n];
#pragma unroll
    for (int i = 0; i < K; ++i) out[i] = c;
  }
}

__device__ __forceinline__ float initial_state(const ScanParams& p, int seq, int d, int n) {
  return p.has_h0 ? p.h0[(static_cast<int64_t>(seq) * p.dim + d) * p.dstate + n] : 0.f;
}

// The step maps of state n: a (raw exp), b with a sequence start's initial state folded in
// (its a then cut to 0 in the returned composition), and the thread's composition.
template <int K>
__device__ __forceinline__ Pair step_maps(const ScanParams& p, const Steps<K>& s, float A2,
                                          const float (&Bv)[K], int d, int n, float (&a)[K],
                                          float (&b)[K]) {
  Pair loc = {1.f, 0.f};
#pragma unroll
  for (int i = 0; i < K; ++i) {
    a[i] = exp2f(s.dt[i] * A2);
    b[i] = s.dt[i] * Bv[i] * s.u[i];
    float ai = a[i], bi = b[i];
    if (s.starts >> i & 1u) {
      bi = fmaf(ai, initial_state(p, s.seq[i], d, n), bi);
      ai = 0.f;
    }
    loc = combine(loc, Pair{ai, bi});
  }
  return loc;
}

template <typename T, int kThreads, int kItems>
__global__ void __launch_bounds__(kThreads) selective_scan_fwd_kernel(const ScanParams p) {
  constexpr int kTile = kThreads * kItems;
  __shared__ Pair warp_totals[kThreads / 32];
  __shared__ float running[kMaxState];  // state entering the tile, per n
  const int d = blockIdx.x;
  const int bb = blockIdx.y;
  const int N = p.dstate;
  const int64_t row = static_cast<int64_t>(bb) * p.dim + d;
  const T* u_row = static_cast<const T*>(p.u) + bb * p.u_b + d * p.u_d;
  const T* dt_row = static_cast<const T*>(p.delta) + bb * p.dt_b + d * p.dt_d;
  const T* z_row = p.has_z ? static_cast<const T*>(p.z) + bb * p.z_b + d * p.z_d : nullptr;
  T* out_row = static_cast<T*>(p.out) + bb * p.out_b + d * p.out_d;
  const float Dd = p.has_d ? p.D[d] : 0.f;
  const float bias = p.has_bias ? p.delta_bias[d] : 0.f;
  const int64_t b_base = p.b_var ? bb * p.B_b + static_cast<int64_t>(d / p.dpg_b) * p.B_g : 0;
  const int64_t c_base = p.c_var ? bb * p.C_b + static_cast<int64_t>(d / p.dpg_c) * p.C_g : 0;
  for (int n = threadIdx.x; n < N; n += kThreads) running[n] = p.has_h0 ? p.h0[row * N + n] : 0.f;
  __syncthreads();

  for (int64_t tile = 0; tile < p.seqlen; tile += kTile) {
    Steps<kItems> s;
    load_steps<T, kItems>(p, u_row, dt_row, tile + threadIdx.x * kItems, p.seqlen, bias, s);
    float y[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) y[i] = 0.f;
    for (int n = 0; n < N; ++n) {
      const float A2 = p.A[static_cast<int64_t>(d) * N + n] * kLog2e;
      float Bv[kItems], Cv[kItems], a[kItems], b[kItems];
      load_bc<T, kItems>(p.B, p.b_var, b_base, p.B_n, d * p.B_g, n, s.t0, s.n_valid, Bv);
      load_bc<T, kItems>(p.C, p.c_var, c_base, p.C_n, d * p.C_g, n, s.t0, s.n_valid, Cv);
      const Pair loc = step_maps<kItems>(p, s, A2, Bv, d, n, a, b);
      Pair total;
      const Pair ex = block_exclusive_scan<kThreads, false>(loc, Pair{1.f, running[n]},
                                                            warp_totals, total);
      float h = ex.b;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if (i >= s.n_valid) break;
        const int64_t t = s.t0 + i;
        const bool start = s.starts >> i & 1u;
        const float before = start ? initial_state(p, s.seq[i], d, n) : h;
        if (t % p.chunk_size == 0)
          p.chunk_states[(row * p.nchunks + t / p.chunk_size) * N + n] = before;
        h = fmaf(a[i], before, b[i]);
        y[i] = fmaf(Cv[i], h, y[i]);
        if (s.ends >> i & 1u)
          p.last_state[(static_cast<int64_t>(s.seq[i]) * p.dim + d) * N + n] = h;
      }
      if (threadIdx.x == 0) running[n] = total.b;  // read again only after later barriers
    }
    float zz[kItems];
    if (p.has_z) load_items<T, kItems>(z_row + s.t0, s.n_valid, zz);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      y[i] = fmaf(Dd, s.u[i], y[i]);
      if (p.has_z) y[i] *= zz[i] / (1.f + __expf(-zz[i]));
    }
    store_items<T, kItems>(out_row + s.t0, s.n_valid, y);
  }
  __syncthreads();
  if (!p.varlen)
    for (int n = threadIdx.x; n < N; n += kThreads) p.last_state[row * N + n] = running[n];
}

// Forward states entering [from, to) of one channel, from the state at `from` (per n in
// `state`, updated in place). Used by the backward to reach a tile inside a long chunk.
template <typename T, int kThreads, int kItems>
__device__ void replay(const ScanParams& p, const T* u_row, const T* dt_row, int d, float bias,
                       int64_t b_base, int64_t from, int64_t to, float* state,
                       Pair* warp_totals) {
  constexpr int kTile = kThreads * kItems;
  for (int64_t tile = from; tile < to; tile += kTile) {
    Steps<kItems> s;
    load_steps<T, kItems>(p, u_row, dt_row, tile + threadIdx.x * kItems, to, bias, s);
    for (int n = 0; n < p.dstate; ++n) {
      const float A2 = p.A[static_cast<int64_t>(d) * p.dstate + n] * kLog2e;
      float Bv[kItems], a[kItems], b[kItems];
      load_bc<T, kItems>(p.B, p.b_var, b_base, p.B_n, d * p.B_g, n, s.t0, s.n_valid, Bv);
      const Pair loc = step_maps<kItems>(p, s, A2, Bv, d, n, a, b);
      Pair total;
      block_exclusive_scan<kThreads, false>(loc, Pair{1.f, state[n]}, warp_totals, total);
      if (threadIdx.x == 0) state[n] = total.b;
    }
  }
  __syncthreads();
}

template <typename T, int kThreads, int kItems>
__global__ void __launch_bounds__(kThreads) selective_scan_bwd_kernel(const ScanParams p) {
  constexpr int kTile = kThreads * kItems;
  constexpr int kWarps = kThreads / 32;
  __shared__ Pair warp_totals[kWarps];
  __shared__ float h_start[kMaxState];  // forward state entering the tile
  __shared__ float g_next[kMaxState];   // adjoint g at the first step after the tile
  // Per-warp partial sums over L (fixed-order final sum keeps the backward deterministic).
  __shared__ float red_dA[kWarps][kMaxState], red_dB[kWarps][kMaxState],
      red_dC[kWarps][kMaxState];
  __shared__ float red_dD[kWarps], red_bias[kWarps];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int bb = blockIdx.y;
  const int prog = blockIdx.x;
  const int N = p.dstate;
  const int map_group = prog / p.progs_per_group;
  const int d_first = map_group * p.dpg_map + (prog % p.progs_per_group) * p.chans_per_prog;
  const int d_stop = min(d_first + p.chans_per_prog, (map_group + 1) * p.dpg_map);
  // Chunk-aligned spans: whole chunks per tile when they fit, else one chunk in several tiles.
  const int64_t span = p.chunk_size <= kTile ? static_cast<int64_t>(p.chunk_size) *
                                                   (kTile / p.chunk_size)
                                             : p.chunk_size;
  const int64_t nspans = (p.seqlen + span - 1) / span;

  for (int d = d_first; d < d_stop; ++d) {
    const int64_t row = static_cast<int64_t>(bb) * p.dim + d;
    const T* u_row = static_cast<const T*>(p.u) + bb * p.u_b + d * p.u_d;
    const T* dt_row = static_cast<const T*>(p.delta) + bb * p.dt_b + d * p.dt_d;
    const T* z_row = p.has_z ? static_cast<const T*>(p.z) + bb * p.z_b + d * p.z_d : nullptr;
    const T* do_row = static_cast<const T*>(p.dout) + bb * p.dout_b + d * p.dout_d;
    const float Dd = p.has_d ? p.D[d] : 0.f;
    const float bias = p.has_bias ? p.delta_bias[d] : 0.f;
    const int gb = p.b_var ? d / p.dpg_b : 0;
    const int gc = p.c_var ? d / p.dpg_c : 0;
    const int64_t b_base = p.b_var ? bb * p.B_b + gb * p.B_g : 0;
    const int64_t c_base = p.c_var ? bb * p.C_b + gc * p.C_g : 0;
    const int db_slot = p.db_mode == 1 ? d : (p.db_mode == 2 ? gb : prog);
    const int dc_slot = p.dc_mode == 1 ? d : (p.dc_mode == 2 ? gc : prog);
    for (int n = threadIdx.x; n < N; n += kThreads) {
      g_next[n] = (p.has_dlast && !p.varlen) ? p.dlast[row * N + n] : 0.f;
      for (int w = 0; w < kWarps; ++w) red_dA[w][n] = red_dB[w][n] = red_dC[w][n] = 0.f;
    }
    if (threadIdx.x < kWarps) red_dD[threadIdx.x] = red_bias[threadIdx.x] = 0.f;
    __syncthreads();

    for (int64_t sp = nspans - 1; sp >= 0; --sp) {
      const int64_t s0 = sp * span;
      const int64_t s1 = min(s0 + span, static_cast<int64_t>(p.seqlen));
      const int64_t ntiles = (s1 - s0 + kTile - 1) / kTile;
      for (int64_t k = ntiles - 1; k >= 0; --k) {
        const int64_t t_lo = s0 + k * kTile;
        const int64_t t_hi = min(t_lo + kTile, s1);
        for (int n = threadIdx.x; n < N; n += kThreads)
          h_start[n] = p.chunk_states[(row * p.nchunks + s0 / p.chunk_size) * N + n];
        __syncthreads();
        if (k > 0)
          replay<T, kThreads, kItems>(p, u_row, dt_row, d, bias, b_base, s0, t_lo, h_start,
                                      warp_totals);
        Steps<kItems> s;
        load_steps<T, kItems>(p, u_row, dt_row, t_lo + threadIdx.x * kItems, t_hi, bias, s);
        float dy[kItems], zz[kItems], y[kItems], ddt[kItems], du[kItems], a_next[kItems];
        load_items<T, kItems>(do_row + s.t0, s.n_valid, dy);
        if (p.has_z) {
          load_items<T, kItems>(z_row + s.t0, s.n_valid, zz);
#pragma unroll
          for (int i = 0; i < kItems; ++i) dy[i] *= zz[i] / (1.f + __expf(-zz[i]));
        }
        // delta' one step ahead (the last step's successor may be in the next tile): a_{t+1}.
        float dt_next[kItems];
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          const int64_t t1 = s.t0 + i + 1;
          float v = 0.f;
          if (i + 1 < s.n_valid) {
            v = s.dt[i + 1];
          } else if (i < s.n_valid && t1 < p.seqlen) {
            const float x1 = to_float(dt_row[t1]) + bias;
            v = p.softplus ? softplus(x1) : x1;
          }
          dt_next[i] = v;
          y[i] = ddt[i] = du[i] = 0.f;
        }
        for (int n = 0; n < N; ++n) {
          const float An = p.A[static_cast<int64_t>(d) * N + n];
          const float A2 = An * kLog2e;
          float Bv[kItems], Cv[kItems], a[kItems], b[kItems], hprev[kItems];
          load_bc<T, kItems>(p.B, p.b_var, b_base, p.B_n, d * p.B_g, n, s.t0, s.n_valid, Bv);
          load_bc<T, kItems>(p.C, p.c_var, c_base, p.C_n, d * p.C_g, n, s.t0, s.n_valid, Cv);
          const Pair loc = step_maps<kItems>(p, s, A2, Bv, d, n, a, b);
          Pair total;
          const Pair ex = block_exclusive_scan<kThreads, false>(loc, Pair{1.f, h_start[n]},
                                                                warp_totals, total);
          // Forward states: hprev[i] = h_{t-1} (a sequence start's initial state), h_t.
          float h = ex.b;
          float hcur[kItems];
#pragma unroll
          for (int i = 0; i < kItems; ++i) {
            hprev[i] = (s.starts >> i & 1u) ? initial_state(p, s.seq[i], d, n) : h;
            h = i < s.n_valid ? fmaf(a[i], hprev[i], b[i]) : h;
            hcur[i] = h;
            y[i] = fmaf(Cv[i], h, y[i]);
            a_next[i] = exp2f(dt_next[i] * A2);
          }
          // Adjoint maps g_t = alpha_t g_{t+1} + beta_t in reverse step order.
          float alpha[kItems], beta[kItems];
          Pair rloc = {1.f, 0.f};
#pragma unroll
          for (int i = kItems - 1; i >= 0; --i) {
            const bool valid = i < s.n_valid;
            const bool end = s.ends >> i & 1u;
            alpha[i] = valid ? (end ? 0.f : a_next[i]) : 1.f;
            beta[i] = valid ? Cv[i] * dy[i] : 0.f;
            if (end && p.has_dlast)
              beta[i] += p.dlast[(static_cast<int64_t>(s.seq[i]) * p.dim + d) * N + n];
            rloc = combine(rloc, Pair{alpha[i], beta[i]});
          }
          Pair rtotal;
          const Pair rex = block_exclusive_scan<kThreads, true>(rloc, Pair{1.f, g_next[n]},
                                                                warp_totals, rtotal);
          float g = rex.b;
          float dA_acc = 0.f, dB_acc = 0.f, dC_acc = 0.f;
#pragma unroll
          for (int i = kItems - 1; i >= 0; --i) {
            if (i >= s.n_valid) continue;
            const int64_t t = s.t0 + i;
            g = fmaf(alpha[i], g, beta[i]);
            const float gah = g * a[i] * hprev[i];
            ddt[i] = fmaf(g * Bv[i], s.u[i], fmaf(gah, An, ddt[i]));
            du[i] = fmaf(g * s.dt[i], Bv[i], du[i]);
            dA_acc = fmaf(gah, s.dt[i], dA_acc);
            const float dBv = g * s.dt[i] * s.u[i];
            const float dCv = dy[i] * hcur[i];
            if (p.db_mode == 0) {
              dB_acc += dBv;
            } else {
              float* q = p.dB_var + bb * p.dB_b + db_slot * p.dB_g + n * p.seqlen + t;
              if (p.db_mode == 2)
                atomicAdd(q, dBv);
              else
                *q = (p.db_mode == 3 && p.chans_per_prog > 1) ? *q + dBv : dBv;
            }
            if (p.dc_mode == 0) {
              dC_acc += dCv;
            } else {
              float* q = p.dC_var + bb * p.dC_b + dc_slot * p.dC_g + n * p.seqlen + t;
              if (p.dc_mode == 2)
                atomicAdd(q, dCv);
              else
                *q = (p.dc_mode == 3 && p.chans_per_prog > 1) ? *q + dCv : dCv;
            }
            if (p.has_h0) {
              if (p.varlen && (s.starts >> i & 1u))
                p.dh0[(static_cast<int64_t>(s.seq[i]) * p.dim + d) * N + n] = a[i] * g;
              else if (!p.varlen && t == 0)
                p.dh0[row * N + n] = a[i] * g;
            }
          }
          dA_acc = warp_sum(dA_acc);
          dB_acc = warp_sum(dB_acc);
          dC_acc = warp_sum(dC_acc);
          if (lane == 0) {  // each warp owns its row: no race, fixed order
            red_dA[warp][n] += dA_acc;
            red_dB[warp][n] += dB_acc;
            red_dC[warp][n] += dC_acc;
          }
          if (threadIdx.x == 0) g_next[n] = rtotal.b;  // read again only after later barriers
        }
        float dD_acc = 0.f, bias_acc = 0.f, dz[kItems], ddelta[kItems];
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          const float dout_i = i < s.n_valid ? to_float(do_row[s.t0 + i]) : 0.f;
          du[i] = fmaf(Dd, dy[i], du[i]);
          ddelta[i] = i < s.n_valid ? (p.softplus ? ddt[i] * softplus_grad(s.x[i]) : ddt[i]) : 0.f;
          dD_acc = fmaf(dy[i], s.u[i], dD_acc);
          bias_acc += ddelta[i];
          if (p.has_z) {
            const float sg = 1.f / (1.f + __expf(-zz[i]));
            const float yy = fmaf(Dd, s.u[i], y[i]);
            dz[i] = dout_i * yy * sg * (1.f + zz[i] * (1.f - sg));
          }
        }
        const int64_t off = row * p.seqlen + s.t0;
        store_items<float, kItems>(p.du + off, s.n_valid, du);
        store_items<float, kItems>(p.ddelta + off, s.n_valid, ddelta);
        if (p.has_z) store_items<float, kItems>(p.dz + off, s.n_valid, dz);
        dD_acc = warp_sum(dD_acc);
        bias_acc = warp_sum(bias_acc);
        if (lane == 0) {
          red_dD[warp] += dD_acc;
          red_bias[warp] += bias_acc;
        }
        __syncthreads();
      }
    }
    for (int n = threadIdx.x; n < N; n += kThreads) {
      float sa = 0.f, sb = 0.f, sc = 0.f;
      for (int w = 0; w < kWarps; ++w) {
        sa += red_dA[w][n];
        sb += red_dB[w][n];
        sc += red_dC[w][n];
      }
      p.dA_part[row * N + n] = sa;
      if (p.db_mode == 0) p.dB_part[row * N + n] = sb;
      if (p.dc_mode == 0) p.dC_part[row * N + n] = sc;
    }
    if (threadIdx.x == 0) {
      float sd = 0.f, sbias = 0.f;
      for (int w = 0; w < kWarps; ++w) {
        sd += red_dD[w];
        sbias += red_bias[w];
      }
      p.dD_part[row] = sd;
      p.dbias_part[row] = sbias;
    }
    __syncthreads();
  }
}

// Decode step: one warp per channel, lanes over the state index.
template <typename T>
__global__ void __launch_bounds__(128) selective_state_update_kernel(const StateUpdateParams p) {
  const int lane = threadIdx.x & 31;
  const int d = blockIdx.x * 4 + (threadIdx.x >> 5);
  const int bb = blockIdx.y;
  if (d >= p.dim) return;  // whole warps exit together
  const T* x = static_cast<const T*>(p.x);
  const T* dtp = static_cast<const T*>(p.dt);
  const float xv = to_float(x[bb * p.x_b + d * p.x_d]);
  float dt = to_float(dtp[bb * p.dt_b + d * p.dt_d]) + (p.has_bias ? p.dt_bias[d] : 0.f);
  if (p.softplus) dt = softplus(dt);
  const T* Bp = static_cast<const T*>(p.B) + bb * p.B_b + (d / p.dpg_b) * p.B_g;
  const T* Cp = static_cast<const T*>(p.C) + bb * p.C_b + (d / p.dpg_c) * p.C_g;
  float* st = p.state + bb * p.st_b + d * p.st_d;
  float y = 0.f;
  for (int n = lane; n < p.dstate; n += 32) {
    const float a = exp2f(dt * p.A[static_cast<int64_t>(d) * p.dstate + n] * kLog2e);
    const float h = fmaf(a, st[n], dt * to_float(Bp[n]) * xv);
    st[n] = h;
    y = fmaf(to_float(Cp[n]), h, y);
  }
  y = warp_sum(y);
  if (lane == 0) {
    if (p.has_d) y = fmaf(p.D[d], xv, y);
    if (p.has_z) {
      const float zz = to_float(static_cast<const T*>(p.z)[bb * p.z_b + d * p.z_d]);
      y *= zz / (1.f + __expf(-zz));
    }
    static_cast<T*>(p.out)[bb * p.out_b + d * p.out_d] = from_float<T>(y);
  }
}

constexpr int kFwdThreads = 128;
constexpr int kBwdThreads = 128;
constexpr int kBwdItems = 4;

template <typename T>
cudaError_t launch_fwd(const ScanParams& p, cudaStream_t stream) {
  constexpr int kItems = 16 / sizeof(T);
  const dim3 grid(p.dim, p.batch);
  selective_scan_fwd_kernel<T, kFwdThreads, kItems><<<grid, kFwdThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const ScanParams& p, cudaStream_t stream) {
  const dim3 grid(p.nprog, p.batch);
  selective_scan_bwd_kernel<T, kBwdThreads, kBwdItems><<<grid, kBwdThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_update(const StateUpdateParams& p, cudaStream_t stream) {
  const dim3 grid((p.dim + 3) / 4, p.batch);
  selective_state_update_kernel<T><<<grid, 128, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t selective_scan_fwd_cuda(const ScanParams& p, cudaStream_t stream) {
  if (p.varlen) {
    // Empty sequences take no step: their last state is their initial state.
    const size_t bytes = sizeof(float) * p.nseq * p.dim * p.dstate;
    cudaError_t err = p.has_h0 ? cudaMemcpyAsync(p.last_state, p.h0, bytes,
                                                 cudaMemcpyDeviceToDevice, stream)
                               : cudaMemsetAsync(p.last_state, 0, bytes, stream);
    if (err != cudaSuccess) return err;
  }
  switch (p.dtype) {
    case DType::kFloat16:
      return launch_fwd<__half>(p, stream);
    case DType::kBFloat16:
      return launch_fwd<__nv_bfloat16>(p, stream);
    default:
      return launch_fwd<float>(p, stream);
  }
}

cudaError_t selective_scan_bwd_cuda(const ScanParams& p, cudaStream_t stream) {
  if (p.varlen && p.has_h0) {
    // An empty sequence's initial state is its last state.
    const size_t bytes = sizeof(float) * p.nseq * p.dim * p.dstate;
    cudaError_t err = p.has_dlast ? cudaMemcpyAsync(p.dh0, p.dlast, bytes,
                                                    cudaMemcpyDeviceToDevice, stream)
                                  : cudaMemsetAsync(p.dh0, 0, bytes, stream);
    if (err != cudaSuccess) return err;
  }
  switch (p.dtype) {
    case DType::kFloat16:
      return launch_bwd<__half>(p, stream);
    case DType::kBFloat16:
      return launch_bwd<__nv_bfloat16>(p, stream);
    default:
      return launch_bwd<float>(p, stream);
  }
}

cudaError_t selective_state_update_cuda(const StateUpdateParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat16:
      return launch_update<__half>(p, stream);
    case DType::kBFloat16:
      return launch_update<__nv_bfloat16>(p, stream);
    default:
      return launch_update<float>(p, stream);
  }
}

}  // namespace scan
}  // namespace dlcore
