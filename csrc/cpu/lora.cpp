// CPU LoRA kernels: dlcore::lora_skinny_fwd_kernel and lora_multi_update_kernel (schemas in
// csrc/dlcore.cpp, contract in dlcore/ops/lora.py).
//
// lora_skinny_fwd_kernel: the whole adapted layer for a few tokens (decoding) in one pass over
// the base weight. BLAS packs the (out, in) weight before a GEMM with a handful of rows, which
// reads and writes the whole matrix once more; here each weight row is streamed once and dotted
// with every token's row (held in L1/L2) in a register-blocked micro-kernel, and bias and the
// rank-r update are added in the epilogue, so the output is written once. The rank-r
// intermediate xa = x A^T (tokens x r) is computed first (it is tiny) and is also an output:
// backward needs it for dB.
//
// lora_multi_update_kernel: out += scaling[a] * (x A[a]^T) B[a]^T row by row, each row with its
// own adapter a (-1: none). Rows are counting-sorted by adapter, so each thread walks runs of rows
// that share one adapter, whose A and B stay in cache; nothing larger than tokens x r is
// allocated and no row of x or out is copied.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu/common.h"

namespace dlcore::cpu::lora {

// 64-byte GCC vectors: one zmm register in the AVX-512 clones; `U` loads them unaligned.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef float U __attribute__((vector_size(64), aligned(4)));
  static constexpr int width = 16;
};
template <>
struct Vec<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef double U __attribute__((vector_size(64), aligned(8)));
  static constexpr int width = 8;
};

constexpr int kRowsPerTile = 4;  // token rows per micro-kernel tile
constexpr int kColsPerTile = 4;  // weight rows per tile: 16 accumulators in registers
// Rows of one adapter whose update is added per pass over a block of B.
constexpr int64_t kRunRows = 16;
// Weight rows per parallel task, and the least work (multiply-adds) worth waking the pool for.
constexpr int64_t kWeightRowsPerTask = 32;
constexpr int64_t kMinParallelMacs = int64_t(1) << 20;
// Elements ahead of the current one that the last weight tile of a block prefetches.
constexpr int64_t kPrefetchAhead = 2048;

// c[i][j] = <x_i, y_j> over K elements; rows given by pointers (unit stride). Vector
// accumulators over full vectors, scalar tail, one horizontal sum per product. pf[j] is
// prefetched alongside y[j]: the rows of the next tile (streamed weight rows arrive from memory
// a tile ahead), or further along the same row for the last tile.
template <typename T, int MB, int NB>
__attribute__((always_inline)) inline void dot_tile(int64_t K, const T* const* x,
                                                    const T* const* y, const T* const* pf, T* c,
                                                    int64_t ldc) {
  using V = typename Vec<T>::V;
  using U = typename Vec<T>::U;
  constexpr int W = Vec<T>::width;
  V acc[MB][NB];
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[i][j] = V{};
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    V yv[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      yv[j] = *reinterpret_cast<const U*>(y[j] + k);
      __builtin_prefetch(pf[j] + k, 0, 3);
    }
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      const V xv = *reinterpret_cast<const U*>(x[i] + k);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i][j] += xv * yv[j];
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      T s = T(0);
      for (int l = 0; l < W; ++l) s += acc[i][j][l];
      for (int64_t kk = k; kk < K; ++kk) s += x[i][kk] * y[j][kk];
      c[i * ldc + j] = s;
    }
}

// c (rows x cols, leading dimension ldc) = dot products of `rows` x-rows with `cols` y-rows.
template <typename T>
__attribute__((always_inline)) inline void dot_block_body(int64_t K, const T* const* x,
                                                          int64_t rows, const T* const* y,
                                                          int64_t cols, T* c, int64_t ldc) {
  for (int64_t j0 = 0; j0 < cols; j0 += kColsPerTile) {
    const int nb = static_cast<int>(std::min<int64_t>(kColsPerTile, cols - j0));
    const T* pf[kColsPerTile];
    for (int j = 0; j < nb; ++j)
      pf[j] = j0 + nb + j < cols ? y[j0 + nb + j] : y[j0 + j] + kPrefetchAhead;
    for (int64_t i0 = 0; i0 < rows; i0 += kRowsPerTile) {
      const int mb = static_cast<int>(std::min<int64_t>(kRowsPerTile, rows - i0));
      const T* const* xs = x + i0;
      const T* const* ys = y + j0;
      T* cs = c + i0 * ldc + j0;
#define DLCORE_LORA_TILE(MB_, NB_) \
  case MB_ * 8 + NB_:              \
    dot_tile<T, MB_, NB_>(K, xs, ys, pf, cs, ldc); \
    break;
      switch (mb * 8 + nb) {
        DLCORE_LORA_TILE(1, 1) DLCORE_LORA_TILE(1, 2) DLCORE_LORA_TILE(1, 3) DLCORE_LORA_TILE(1, 4)
        DLCORE_LORA_TILE(2, 1) DLCORE_LORA_TILE(2, 2) DLCORE_LORA_TILE(2, 3) DLCORE_LORA_TILE(2, 4)
        DLCORE_LORA_TILE(3, 1) DLCORE_LORA_TILE(3, 2) DLCORE_LORA_TILE(3, 3) DLCORE_LORA_TILE(3, 4)
        DLCORE_LORA_TILE(4, 1) DLCORE_LORA_TILE(4, 2) DLCORE_LORA_TILE(4, 3) DLCORE_LORA_TILE(4, 4)
        default:
          break;
      }
#undef DLCORE_LORA_TILE
    }
  }
}

DLCORE_MULTIVERSION void dot_block(int64_t K, const float* const* x, int64_t rows,
                                   const float* const* y, int64_t cols, float* c, int64_t ldc) {
  dot_block_body(K, x, rows, y, cols, c, ldc);
}

DLCORE_MULTIVERSION void dot_block(int64_t K, const double* const* x, int64_t rows,
                                   const double* const* y, int64_t cols, double* c,
                                   int64_t ldc) {
  dot_block_body(K, x, rows, y, cols, c, ldc);
}

// dst[i][0:n] = (init ? init : dst[i])[0:n] + sum_r coef[i * R + r] * src[r * lds : r * lds + n]
// for `rows` rows sharing one adapter; init (the bias, or zeros) lets the update write rows that
// hold nothing yet, so the base GEMM can then accumulate into them (one pass fewer over out).
// Column blocks outer, rows inner: each block of src (R x kExpandVecs vectors) is copied into
// `pack` (contiguous: src's rows are often a power of two apart, and would share L1 sets) and
// then serves every row from L1; kExpandVecs independent accumulators keep the FMA chains over r
// from waiting on each other. One read and one write of each dst row, with the
// row's next block prefetched (rows sorted by adapter are far apart in memory).
constexpr int kExpandVecs = 8;

template <typename T>
__attribute__((always_inline)) inline void expand_rows_body(int64_t n, int64_t R, int64_t rows,
                                                            const T* coef, const T* src,
                                                            int64_t lds, T* const* dst, T* pack,
                                                            const T* init) {
  using V = typename Vec<T>::V;
  using U = typename Vec<T>::U;
  constexpr int W = Vec<T>::width;
  constexpr int BW = kExpandVecs * W;
  int64_t j = 0;
  for (; j + BW <= n; j += BW) {
    for (int64_t r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < kExpandVecs; ++v)
        *reinterpret_cast<U*>(pack + r * BW + v * W) =
            *reinterpret_cast<const U*>(src + r * lds + j + v * W);
    for (int64_t i = 0; i < rows; ++i) {
      V acc[kExpandVecs];
      const T* from = init ? init : dst[i];
#pragma GCC unroll 8
      for (int v = 0; v < kExpandVecs; ++v) {
        acc[v] = *reinterpret_cast<const U*>(from + j + v * W);
        __builtin_prefetch(dst[i] + j + BW + v * W, 1, 0);
      }
      for (int64_t r = 0; r < R; ++r) {
        const V c = V{} + coef[i * R + r];
#pragma GCC unroll 8
        for (int v = 0; v < kExpandVecs; ++v)
          acc[v] += c * *reinterpret_cast<const U*>(pack + r * BW + v * W);
      }
#pragma GCC unroll 8
      for (int v = 0; v < kExpandVecs; ++v)
        *reinterpret_cast<U*>(dst[i] + j + v * W) = acc[v];
    }
  }
  for (; j + W <= n; j += W)
    for (int64_t i = 0; i < rows; ++i) {
      V acc = *reinterpret_cast<const U*>((init ? init : dst[i]) + j);
      for (int64_t r = 0; r < R; ++r)
        acc += (V{} + coef[i * R + r]) * *reinterpret_cast<const U*>(src + r * lds + j);
      *reinterpret_cast<U*>(dst[i] + j) = acc;
    }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t jj = j; jj < n; ++jj) {
      T acc = (init ? init : dst[i])[jj];
      for (int64_t r = 0; r < R; ++r) acc += coef[i * R + r] * src[r * lds + jj];
      dst[i][jj] = acc;
    }
}

DLCORE_MULTIVERSION void expand_rows(int64_t n, int64_t R, int64_t rows, const float* coef,
                                     const float* src, int64_t lds, float* const* dst,
                                     float* pack, const float* init) {
  expand_rows_body(n, R, rows, coef, src, lds, dst, pack, init);
}

DLCORE_MULTIVERSION void expand_rows(int64_t n, int64_t R, int64_t rows, const double* coef,
                                     const double* src, int64_t lds, double* const* dst,
                                     double* pack, const double* init) {
  expand_rows_body(n, R, rows, coef, src, lds, dst, pack, init);
}

// Shared argument checks of both kernels: they read through raw pointers, so every shape and
// stride they rely on is verified here.
struct Adapters {
  int64_t M, K, n, R;
  std::vector<int32_t> index;  // per row, -1 = no adapter
  std::vector<double> scaling;  // per adapter
};

Adapters check_adapters(const at::Tensor& x, const at::Tensor& A, const at::Tensor& scalings,
                        const std::optional<at::Tensor>& indices, const at::Tensor& xa) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "lora kernel: x must be (tokens, in) with unit "
              "inner stride, got shape ", x.sizes(), " strides ", x.strides());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "lora kernel: x must be float32 or float64, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(A.dim() == 3 && A.size(2) == K && A.stride(2) == 1 && A.size(0) >= 1 &&
                  A.size(1) >= 1 && A.scalar_type() == x.scalar_type(),
              "lora kernel: lora_A must be (n_adapters, r, ", K, ") of x's dtype with unit inner "
              "stride, got shape ", A.sizes(), " strides ", A.strides(), " dtype ",
              A.scalar_type());
  const int64_t n = A.size(0), R = A.size(1);
  TORCH_CHECK(scalings.dim() == 1 && scalings.size(0) == n &&
                  (scalings.scalar_type() == at::kFloat ||
                   scalings.scalar_type() == at::kDouble) && scalings.device().is_cpu(),
              "lora kernel: scalings must be float32 or float64 (", n, "), got shape ",
              scalings.sizes(), " dtype ", scalings.scalar_type());
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == M && xa.size(1) == R &&
                  xa.scalar_type() == at::kFloat && xa.is_contiguous(),
              "lora kernel: xa must be contiguous float32 (", M, ", ", R, "), got shape ",
              xa.sizes(), " dtype ", xa.scalar_type());
  Adapters ad{M, K, n, R, std::vector<int32_t>(M, 0), std::vector<double>(n)};
  const at::Tensor scal = scalings.to(at::kDouble).contiguous();
  std::copy_n(scal.data_ptr<double>(), n, ad.scaling.begin());
  if (indices.has_value()) {
    const at::Tensor& idx = *indices;
    TORCH_CHECK(idx.dim() == 1 && idx.size(0) == M && idx.scalar_type() == at::kInt &&
                    idx.is_contiguous(),
                "lora kernel: indices must be contiguous int32 (", M, "), got shape ", idx.sizes(),
                " dtype ", idx.scalar_type());
    const int32_t* p = idx.data_ptr<int32_t>();
    for (int64_t m = 0; m < M; ++m) {
      TORCH_CHECK(p[m] >= -1 && p[m] < n, "lora kernel: adapter index ", p[m], " of row ", m,
                  " is out of range [-1, ", n - 1, "]");
      ad.index[m] = p[m];
    }
  } else {
    TORCH_CHECK(n == 1, "lora kernel: indices are required with ", n, " adapters");
  }
  TORCH_CHECK(x.device().is_cpu() && A.device().is_cpu(), "lora kernel: CPU tensors expected");
  return ad;
}

void check_out(const at::Tensor& out, const at::Tensor& x, int64_t N) {
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == N &&
                  out.stride(1) == 1 && out.scalar_type() == x.scalar_type(),
              "lora kernel: out must be (", x.size(0), ", ", N, ") of x's dtype with unit inner "
              "stride, got shape ", out.sizes(), " strides ", out.strides(), " dtype ",
              out.scalar_type());
}

// xa[m] = x[m] A[a_m]^T for every row with an adapter (0 for the others), computed in T.
template <typename T>
void shrink_rows(const Adapters& ad, const T* x, int64_t ldx, const at::Tensor& A,
                 const int64_t* order, int64_t begin, int64_t end, T* xa) {
  const T* a_ptr = A.data_ptr<T>();
  const int64_t sa0 = A.stride(0), sa1 = A.stride(1);
  std::vector<const T*> xr(kRowsPerTile), ar(ad.R);
  std::vector<T> tile(kRowsPerTile * ad.R);
  int64_t i = begin;
  while (i < end) {
    const int32_t a = ad.index[order[i]];
    int64_t run = 1;
    while (run < kRowsPerTile && i + run < end && ad.index[order[i + run]] == a) ++run;
    if (a < 0) {
      for (int64_t t = 0; t < run; ++t) std::fill_n(xa + order[i + t] * ad.R, ad.R, T(0));
    } else {
      for (int64_t t = 0; t < run; ++t) xr[t] = x + order[i + t] * ldx;
      for (int64_t r = 0; r < ad.R; ++r) ar[r] = a_ptr + a * sa0 + r * sa1;
      dot_block(ad.K, xr.data(), run, ar.data(), ad.R, tile.data(), ad.R);
      for (int64_t t = 0; t < run; ++t)
        std::copy_n(tile.data() + t * ad.R, ad.R, xa + order[i + t] * ad.R);
    }
    i += run;
  }
}

template <typename T>
void skinny_fwd(const at::Tensor& x, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                const Adapters& ad, at::Tensor& out, at::Tensor& xa_out) {
  const int64_t M = ad.M, K = ad.K, R = ad.R, N = weight.size(0);
  const T* xp = x.data_ptr<T>();
  const int64_t ldx = x.stride(0);
  std::vector<int64_t> order(M);
  for (int64_t m = 0; m < M; ++m) order[m] = m;
  std::vector<T> xa(M * R);
  const int64_t shrink_grain =
      M * R * K < kMinParallelMacs ? M : std::max<int64_t>(1, kMinParallelMacs / (R * K));
  at::parallel_for(0, M, shrink_grain, [&](int64_t begin, int64_t end) {
    shrink_rows<T>(ad, xp, ldx, A, order.data(), begin, end, xa.data());
  });
  // Fold each row's scaling into its copy of xa: the epilogue is then a plain r-term sum.
  float* xa_f = xa_out.data_ptr<float>();
  std::vector<T> xs(M * R);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < R; ++r) {
      xa_f[m * R + r] = static_cast<float>(xa[m * R + r]);
      xs[m * R + r] = ad.index[m] < 0 ? T(0) : xa[m * R + r] * T(ad.scaling[ad.index[m]]);
    }
  const T* w = weight.data_ptr<T>();
  const int64_t ldw = weight.stride(0);
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  const int64_t sb = bias.has_value() ? bias->stride(0) : 0;
  const T* b = B.data_ptr<T>();
  const int64_t sB0 = B.stride(0), sB1 = B.stride(1), sB2 = B.stride(2);
  // B[a] read as rows over the outputs (Bt[r][n]): in place when B is an (n, r, out) storage's
  // view (LoRALinear's stacks), else a block at a time transposed into a buffer (peft's (out, r)).
  const bool bt_in_place = sB1 == 1;
  T* o = out.data_ptr<T>();
  const int64_t ldo = out.stride(0);
  std::vector<const T*> xr(M);
  for (int64_t m = 0; m < M; ++m) xr[m] = xp + m * ldx;
  // Blocks of weight rows are handed out dynamically: a thread that starts late (the pool shares
  // the cores with other work) leaves its share to the others instead of holding up the call.
  const int64_t blocks = (N + kWeightRowsPerTask - 1) / kWeightRowsPerTask;
  const int64_t workers =
      M * N * K < kMinParallelMacs ? 1 : std::min<int64_t>(at::get_num_threads(), blocks);
  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    constexpr int64_t ldc = kWeightRowsPerTask;
    std::vector<const T*> wr(kWeightRowsPerTask);
    // expand_pack: expand_rows' block buffer, untouched here (a weight block never fills one).
    std::vector<T> c(M * ldc), bt_block(R * ldc), expand_pack(R * kExpandVecs * Vec<T>::width);
    for (int64_t blk; (blk = next_block.fetch_add(1)) < blocks;) {
      const int64_t n0 = blk * kWeightRowsPerTask;
      const int64_t nb = std::min(kWeightRowsPerTask, N - n0);
      for (int64_t j = 0; j < nb; ++j) wr[j] = w + (n0 + j) * ldw;
      dot_block(K, xr.data(), M, wr.data(), nb, c.data(), ldc);
      int32_t packed = -1;
      for (int64_t m = 0; m < M; ++m) {
        const int32_t a = ad.index[m];
        T* cm = c.data() + m * ldc;
        if (a >= 0) {
          const T* bt = b + a * sB0 + n0 * sB1;
          int64_t ldbt = sB2;
          if (!bt_in_place) {
            if (packed != a) {
              for (int64_t j = 0; j < nb; ++j)
                for (int64_t r = 0; r < R; ++r) bt_block[r * ldc + j] = bt[j * sB1 + r * sB2];
              packed = a;
            }
            bt = bt_block.data();
            ldbt = ldc;
          }
          expand_rows(nb, R, 1, xs.data() + m * R, bt, ldbt, &cm, expand_pack.data(), nullptr);
        }
        T* om = o + m * ldo + n0;
        if (bp)
          for (int64_t j = 0; j < nb; ++j) om[j] = cm[j] + bp[(n0 + j) * sb];
        else
          std::copy_n(cm, nb, om);
      }
    }
  });
}

void lora_skinny_fwd_kernel(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, const at::Tensor& scalings,
                            const std::optional<at::Tensor>& indices, at::Tensor& out,
                            at::Tensor& xa) {
  const Adapters ad = check_adapters(x, lora_A, scalings, indices, xa);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == ad.K && weight.stride(1) == 1 &&
                  weight.scalar_type() == x.scalar_type(),
              "lora_skinny_fwd_kernel: weight must be (out, ", ad.K, ") of x's dtype with unit "
              "inner stride, got shape ", weight.sizes(), " strides ", weight.strides());
  const int64_t N = weight.size(0);
  TORCH_CHECK(lora_B.dim() == 3 && lora_B.size(0) == ad.n && lora_B.size(1) == N &&
                  lora_B.size(2) == ad.R && lora_B.scalar_type() == x.scalar_type(),
              "lora_skinny_fwd_kernel: lora_B must be (", ad.n, ", ", N, ", ", ad.R,
              ") of x's dtype, got shape ", lora_B.sizes());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == x.scalar_type(),
                "lora_skinny_fwd_kernel: bias must be (", N, ") of x's dtype, got shape ",
                bias->sizes());
  check_out(out, x, N);
  if (x.scalar_type() == at::kFloat)
    skinny_fwd<float>(x, weight, bias, lora_A, lora_B, ad, out, xa);
  else
    skinny_fwd<double>(x, weight, bias, lora_A, lora_B, ad, out, xa);
}

template <typename T>
void multi_update(const at::Tensor& x, const at::Tensor& A, const at::Tensor& Bt,
                  const Adapters& ad, at::Tensor& out, at::Tensor& xa_out,
                  const std::optional<at::Tensor>& bias, bool overwrite) {
  const int64_t M = ad.M, K = ad.K, R = ad.R, N = Bt.size(2);
  // Overwrite mode starts every row from the bias (or zero) instead of out's contents.
  std::vector<T> zeros(overwrite && !bias.has_value() ? N : 0);
  const T* init = !overwrite ? nullptr : bias.has_value() ? bias->data_ptr<T>() : zeros.data();
  // Counting sort of the rows by adapter (stable; rows without an adapter first).
  std::vector<int64_t> start(ad.n + 2, 0), order(M);
  for (int64_t m = 0; m < M; ++m) ++start[ad.index[m] + 2];
  for (int64_t a = 0; a <= ad.n; ++a) start[a + 1] += start[a];
  for (int64_t m = 0; m < M; ++m) order[start[ad.index[m] + 1]++] = m;
  const T* xp = x.data_ptr<T>();
  const int64_t ldx = x.stride(0);
  const T* bt = Bt.data_ptr<T>();
  const int64_t sb0 = Bt.stride(0), sb1 = Bt.stride(1);
  T* o = out.data_ptr<T>();
  const int64_t ldo = out.stride(0);
  float* xa_f = xa_out.data_ptr<float>();
  std::vector<T> xa(M * R);
  const int64_t grain = std::max<int64_t>(
      kRunRows, M * R * (K + N) < kMinParallelMacs ? M : kMinParallelMacs / (R * (K + N)));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    shrink_rows<T>(ad, xp, ldx, A, order.data(), begin, end, xa.data());
    std::vector<T> coef(kRunRows * R);
    std::vector<T*> dst(kRunRows);
    std::vector<T> pack(R * kExpandVecs * Vec<T>::width);
    int64_t i = begin;
    while (i < end) {
      const int32_t a = ad.index[order[i]];
      int64_t run = 1;
      while (run < kRunRows && i + run < end && ad.index[order[i + run]] == a) ++run;
      for (int64_t t = 0; t < run; ++t) {
        const int64_t m = order[i + t];
        for (int64_t r = 0; r < R; ++r) {
          xa_f[m * R + r] = static_cast<float>(xa[m * R + r]);
          if (a >= 0) coef[t * R + r] = xa[m * R + r] * T(ad.scaling[a]);
        }
        dst[t] = o + m * ldo;
      }
      if (a >= 0)
        expand_rows(N, R, run, coef.data(), bt + a * sb0, sb1, dst.data(), pack.data(), init);
      else if (init)
        for (int64_t t = 0; t < run; ++t) std::copy_n(init, N, dst[t]);
      i += run;
    }
  });
}

void lora_multi_update_kernel(const at::Tensor& x, const at::Tensor& lora_A,
                              const at::Tensor& lora_B_t, const at::Tensor& scalings,
                              const std::optional<at::Tensor>& indices, at::Tensor& out,
                              at::Tensor& xa, const std::optional<at::Tensor>& bias,
                              bool overwrite) {
  const Adapters ad = check_adapters(x, lora_A, scalings, indices, xa);
  TORCH_CHECK(lora_B_t.dim() == 3 && lora_B_t.size(0) == ad.n && lora_B_t.size(1) == ad.R &&
                  lora_B_t.stride(2) == 1 && lora_B_t.scalar_type() == x.scalar_type(),
              "lora_multi_update_kernel: lora_B_t must be (", ad.n, ", ", ad.R,
              ", out) of x's dtype with unit inner stride, got shape ", lora_B_t.sizes(),
              " strides ", lora_B_t.strides());
  const int64_t N = lora_B_t.size(2);
  check_out(out, x, N);
  if (bias.has_value())
    TORCH_CHECK(overwrite && bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type() && bias->device().is_cpu(),
                "lora_multi_update_kernel: bias must be contiguous (", N, ") of x's dtype and "
                "comes with overwrite=True, got shape ", bias->sizes(), " dtype ",
                bias->scalar_type());
  if (x.scalar_type() == at::kFloat)
    multi_update<float>(x, lora_A, lora_B_t, ad, out, xa, bias, overwrite);
  else
    multi_update<double>(x, lora_A, lora_B_t, ad, out, xa, bias, overwrite);
}

// ---- lora_factor_grads_kernel: the adapter's backward in one pass over dy and x ----
//
// g = s dy B (tokens x r, also needed for dx), dA = g^T x, dB = s dy^T xa. As three BLAS calls
// these read dy twice and x once, each a skinny GEMM BLAS runs at half its peak. Here a block of
// factor_rows(r / vector width) token rows is swept once along dy (g accumulates in registers,
// dB's per-thread copy in L2 takes the block's contribution per output feature) and then once
// along x (dA's per-thread copy takes g_block^T x_block). r lives in the vector lanes: up to 4
// vectors (r <= 64 in float32, 32 in float64); larger ranks take the BLAS path. A tail block
// points its missing rows at zero rows, so the micro-kernels have fixed shapes.
constexpr int kFactorMaxVecs = 4;
constexpr int64_t kFactorChunk = 64;

template <typename T, int RV, int MB>
__attribute__((always_inline)) inline void factor_block_body(
    int64_t N, int64_t K, int64_t R, const T* const* dy, const T* const* x, const T* bs,
    const T* xs, T* g, T* dB_acc, T* dA_acc, int64_t lda) {
  using V = typename Vec<T>::V;
  using U = typename Vec<T>::U;
  constexpr int W = Vec<T>::width;
  constexpr int RP = RV * W;  // padded rank: the row length of bs, xs, g and dB_acc
  V xv[MB][RV], gacc[MB][RV];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < RV; ++v) {
      xv[m][v] = *reinterpret_cast<const U*>(xs + m * RP + v * W);
      *reinterpret_cast<U*>(g + m * RP + v * W) = V{};
    }
  // g sums kFactorChunk products in registers, then adds them to g: two-level summation keeps
  // its rounding near a blocked BLAS dot product's instead of growing with the whole length.
  for (int64_t n0 = 0; n0 < N; n0 += kFactorChunk) {
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
      for (int v = 0; v < RV; ++v) gacc[m][v] = V{};
    const int64_t n1 = std::min(N, n0 + kFactorChunk);
    for (int64_t n = n0; n < n1; ++n) {
      V b[RV], db[RV];
#pragma GCC unroll 4
      for (int v = 0; v < RV; ++v) {
        b[v] = *reinterpret_cast<const U*>(bs + n * RP + v * W);
        db[v] = V{};
      }
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        const V d = V{} + dy[m][n];
#pragma GCC unroll 4
        for (int v = 0; v < RV; ++v) {
          gacc[m][v] += d * b[v];
          db[v] += d * xv[m][v];
        }
      }
#pragma GCC unroll 4
      for (int v = 0; v < RV; ++v) *reinterpret_cast<U*>(dB_acc + n * RP + v * W) += db[v];
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
      for (int v = 0; v < RV; ++v) *reinterpret_cast<U*>(g + m * RP + v * W) += gacc[m][v];
  }
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    V xk[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) xk[m] = *reinterpret_cast<const U*>(x[m] + k);
    for (int64_t r = 0; r < R; ++r) {
      V acc = *reinterpret_cast<const U*>(dA_acc + r * lda + k);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc += (V{} + g[m * RP + r]) * xk[m];
      *reinterpret_cast<U*>(dA_acc + r * lda + k) = acc;
    }
  }
  for (; k < K; ++k)
    for (int64_t r = 0; r < R; ++r) {
      T acc = dA_acc[r * lda + k];
      for (int m = 0; m < MB; ++m) acc += g[m * RP + r] * x[m][k];
      dA_acc[r * lda + k] = acc;
    }
}

// Rows per block: as many as keep g's and xa's vectors in registers next to B's.
constexpr int factor_rows(int rank_vectors) {
  return rank_vectors == 1 ? 8 : rank_vectors == 2 ? 4 : 2;
}

#define DLCORE_FACTOR_BLOCK(TYPE, RV)                                                       \
  DLCORE_MULTIVERSION void factor_block_##RV(int64_t N, int64_t K, int64_t R,               \
                                              const TYPE* const* dy, const TYPE* const* x,  \
                                              const TYPE* bs, const TYPE* xs, TYPE* g,      \
                                              TYPE* dB_acc, TYPE* dA_acc, int64_t lda) {    \
    factor_block_body<TYPE, RV, factor_rows(RV)>(N, K, R, dy, x, bs, xs, g, dB_acc, dA_acc, \
                                                 lda);                                      \
  }
DLCORE_FACTOR_BLOCK(float, 1)
DLCORE_FACTOR_BLOCK(float, 2)
DLCORE_FACTOR_BLOCK(float, 3)
DLCORE_FACTOR_BLOCK(float, 4)
DLCORE_FACTOR_BLOCK(double, 1)
DLCORE_FACTOR_BLOCK(double, 2)
DLCORE_FACTOR_BLOCK(double, 3)
DLCORE_FACTOR_BLOCK(double, 4)
#undef DLCORE_FACTOR_BLOCK

template <typename T>
void factor_grads(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& B,
                  const at::Tensor& xa, double scaling, at::Tensor& g_out, at::Tensor& dA,
                  at::Tensor& dB) {
  constexpr int W = Vec<T>::width;
  const int64_t M = x.size(0), K = x.size(1), N = dy.size(1), R = B.size(1);
  const int RV = static_cast<int>((R + W - 1) / W);
  const int64_t RP = RV * W;
  const int MB = factor_rows(RV);
  // s folded into B's copy (so g and dA carry it) and into xa's (so dB does); rank padded.
  std::vector<T> bs(N * RP, T(0)), xs((M + MB) * RP, T(0));
  const T* bp = B.data_ptr<T>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t r = 0; r < R; ++r)
      bs[n * RP + r] = bp[n * B.stride(0) + r * B.stride(1)] * T(scaling);
  const float* xap = xa.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < R; ++r) xs[m * RP + r] = T(xap[m * R + r]) * T(scaling);
  const std::vector<T> zero_row(std::max(N, K), T(0));
  const T* dyp = dy.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  T* gp = g_out.data_ptr<T>();
  const int64_t blocks = (M + MB - 1) / MB;
  const int64_t workers =
      M * R * (N + K) < kMinParallelMacs ? 1 : std::min<int64_t>(at::get_num_threads(), blocks);
  // lda padded by one cache line: rows K apart (often a power of two) would share L1 sets.
  const int64_t lda = K + 64 / static_cast<int64_t>(sizeof(T));
  std::vector<std::vector<T>> dB_acc(workers), dA_acc(workers);
  using Block = void (*)(int64_t, int64_t, int64_t, const T* const*, const T* const*, const T*,
                         const T*, T*, T*, T*, int64_t);
  const Block by_vectors[] = {factor_block_1, factor_block_2, factor_block_3, factor_block_4};
  const Block block = by_vectors[RV - 1];
  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, workers, 1, [&](int64_t wb, int64_t we) {
    for (int64_t w = wb; w < we; ++w) {
      dB_acc[w].assign(N * RP, T(0));
      dA_acc[w].assign(R * lda, T(0));
      std::vector<const T*> dyr(MB), xr(MB);
      std::vector<T> g(MB * RP);
      for (int64_t blk; (blk = next_block.fetch_add(1)) < blocks;) {
        const int64_t m0 = blk * MB;
        for (int m = 0; m < MB; ++m) {
          const bool real = m0 + m < M;
          dyr[m] = real ? dyp + (m0 + m) * dy.stride(0) : zero_row.data();
          xr[m] = real ? xp + (m0 + m) * x.stride(0) : zero_row.data();
        }
        block(N, K, R, dyr.data(), xr.data(), bs.data(), xs.data() + m0 * RP, g.data(),
              dB_acc[w].data(), dA_acc[w].data(), lda);
        for (int64_t m = 0; m < MB && m0 + m < M; ++m)
          std::copy_n(g.data() + m * RP, R, gp + (m0 + m) * R);
      }
    }
  });
  // Sum the per-thread copies into the outputs (r x in and out x r: small next to dy and x):
  // dst[i][j] = sum_w copies[w][i * ld + j] over a (rows x cols) output.
  auto sum_copies = [&](const std::vector<std::vector<T>>& copies, int64_t ld, int64_t rows,
                        int64_t cols, T* dst) {
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / cols), [&](int64_t ib, int64_t ie) {
      for (int64_t i = ib; i < ie; ++i)
        for (int64_t j = 0; j < cols; ++j) {
          T s = T(0);
          for (int64_t w = 0; w < workers; ++w) s += copies[w][i * ld + j];
          dst[i * cols + j] = s;
        }
    });
  };
  sum_copies(dA_acc, lda, R, K, dA.data_ptr<T>());
  sum_copies(dB_acc, RP, N, R, dB.data_ptr<T>());
}

void lora_factor_grads_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& lora_B,
                              const at::Tensor& xa, double scaling, at::Tensor& g,
                              at::Tensor& dA, at::Tensor& dB) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && dy.dim() == 2 && dy.stride(1) == 1 &&
                  dy.size(0) == x.size(0) && dy.scalar_type() == x.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
                  x.device().is_cpu() && dy.device().is_cpu(),
              "lora_factor_grads_kernel: dy (tokens, out) and x (tokens, in) must be float32 or "
              "float64 CPU tensors of one dtype with unit inner stride, got shapes ", dy.sizes(),
              " / ", x.sizes(), " dtypes ", dy.scalar_type(), " / ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = dy.size(1);
  constexpr int64_t kMaxVecs = kFactorMaxVecs;
  const int64_t max_r = kMaxVecs * (x.scalar_type() == at::kFloat ? Vec<float>::width
                                                                 : Vec<double>::width);
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == N && lora_B.size(1) >= 1 &&
                  lora_B.size(1) <= max_r && lora_B.scalar_type() == x.scalar_type(),
              "lora_factor_grads_kernel: lora_B must be (", N, ", r) of x's dtype with r <= ",
              max_r, ", got shape ", lora_B.sizes(), " dtype ", lora_B.scalar_type());
  const int64_t R = lora_B.size(1);
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == M && xa.size(1) == R &&
                  xa.scalar_type() == at::kFloat && xa.is_contiguous(),
              "lora_factor_grads_kernel: xa must be contiguous float32 (", M, ", ", R,
              "), got shape ", xa.sizes(), " dtype ", xa.scalar_type());
  auto check = [&](const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.is_contiguous() &&
                    t.scalar_type() == x.scalar_type(),
                "lora_factor_grads_kernel: ", name, " must be contiguous (", rows, ", ", cols,
                ") of x's dtype, got shape ", t.sizes(), " dtype ", t.scalar_type());
  };
  check(g, "g", M, R);
  check(dA, "dA", R, K);
  check(dB, "dB", N, R);
  if (x.scalar_type() == at::kFloat)
    factor_grads<float>(dy, x, lora_B, xa, scaling, g, dA, dB);
  else
    factor_grads<double>(dy, x, lora_B, xa, scaling, g, dA, dB);
}

}  // namespace dlcore::cpu::lora

TORCH_LIBRARY_IMPL(dlcore, CPU, m) {
  m.impl("lora_skinny_fwd_kernel", &dlcore::cpu::lora::lora_skinny_fwd_kernel);
  m.impl("lora_multi_update_kernel", &dlcore::cpu::lora::lora_multi_update_kernel);
  m.impl("lora_factor_grads_kernel", &dlcore::cpu::lora::lora_factor_grads_kernel);
}
