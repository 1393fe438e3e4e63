// CUDA twins of candle-moe's CPU ops (src/ops/*). Same semantics, same buffer
// layouts; every kernel writes every output element it owns (no reads of
// uninitialised memory: outputs that may be partially skipped are allocated
// zeroed on the Rust side).
//
// Compiled to PTX by build.rs (nvcc --ptx) when the `cuda` feature is on.

#include "common.cuh"

// ------------------------------------------------------------- routing ----

__device__ __forceinline__ void warp_argmax(float &v, int &i) {
  for (int off = 16; off > 0; off >>= 1) {
    float ov = __shfl_xor_sync(0xffffffffu, v, off);
    int oi = __shfl_xor_sync(0xffffffffu, i, off);
    // larger value wins; ties go to the lower index (vLLM topk_softmax)
    if (ov > v || (ov == v && oi < i)) {
      v = ov;
      i = oi;
    }
  }
}

// One warp per token. scores: softmax or sigmoid of the logits (+ bias for
// selection); grouped top-k restricts to the best `topk_group` of
// `num_groups` groups. Writes ids [T, k].
template <typename T>
__device__ void topk_select(const T *logits, const float *bias, int has_bias, uint32_t *ids,
                            int t_count, int e, int k, int sigmoid, int num_groups,
                            int topk_group) {
  DYNAMIC_SHARED(float, smem);
  int warps = blockDim.x / 32;
  int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  int t = blockIdx.x * warps + w;
  float *sel = smem + w * (e + num_groups);
  float *gscore = sel + e;
  if (t >= t_count) return;
  const T *row = logits + (size_t)t * e;
  float mx = -INFINITY;
  for (int j = lane; j < e; j += 32) mx = fmaxf(mx, to_f(row[j]));
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  float sum = 0.f;
  for (int j = lane; j < e; j += 32) {
    float l = to_f(row[j]);
    float s = sigmoid ? 1.f / (1.f + expf(-l)) : expf(l - mx);
    sel[j] = s;
    sum += s;
  }
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  __syncwarp();
  for (int j = lane; j < e; j += 32) {
    float s = sigmoid ? sel[j] : sel[j] / sum;
    sel[j] = s + (has_bias ? bias[j] : 0.f);
  }
  __syncwarp();
  if (num_groups > 1) {
    // num_groups <= 64 (checked on the host)
    int per = e / num_groups;
    if (lane == 0) {
      for (int g = 0; g < num_groups; g++) {
        const float *c = sel + g * per;
        int a = 0;
        for (int j = 1; j < per; j++)
          if (c[j] > c[a]) a = j;
        if (has_bias) {
          // with a correction bias: the sum of the group's two best
          int b = -1;
          for (int j = 0; j < per; j++)
            if (j != a && (b < 0 || c[j] > c[b])) b = j;
          gscore[g] = c[a] + (b >= 0 ? c[b] : 0.f);
        } else {
          gscore[g] = c[a];
        }
      }
      unsigned long long chosen = 0ull;
      for (int r = 0; r < topk_group; r++) {
        int best = -1;
        for (int g = 0; g < num_groups; g++)
          if (!((chosen >> g) & 1ull) && (best < 0 || gscore[g] > gscore[best])) best = g;
        if (best >= 0) chosen |= 1ull << best;
      }
      for (int g = 0; g < num_groups; g++)
        if (!((chosen >> g) & 1ull))
          for (int j = 0; j < per; j++) sel[g * per + j] = -INFINITY;
    }
    __syncwarp();
  }
  for (int r = 0; r < k; r++) {
    float v = -INFINITY;
    int idx = 0x7fffffff;
    for (int j = lane; j < e; j += 32) {
      float s = sel[j];
      if (s > v || (s == v && j < idx)) {
        v = s;
        idx = j;
      }
    }
    warp_argmax(v, idx);
    if (idx == 0x7fffffff) idx = 0;
    if (lane == 0) {
      ids[(size_t)t * k + r] = (uint32_t)idx;
      sel[idx] = -INFINITY;
    }
    __syncwarp();
  }
}

#define TOPK(NAME, T)                                                                         \
  extern "C" __global__ void NAME(const T *logits, const float *bias, int has_bias,           \
                                  uint32_t *ids, int t_count, int e, int k, int sigmoid,       \
                                  int num_groups, int topk_group) {                            \
    topk_select<T>(logits, bias, has_bias, ids, t_count, e, k, sigmoid, num_groups,            \
                   topk_group);                                                                \
  }
TOPK(moe_topk_select_f32, float)
TOPK(moe_topk_select_bf16, __nv_bfloat16)
TOPK(moe_topk_select_f16, __half)

// Router weights of the selected ids: softmax (over all experts) or sigmoid,
// optional renormalisation over the k, times `scaling`. One warp per token.
template <typename T>
__device__ void router_weights(const T *logits, const uint32_t *ids, float *w, int t_count, int e,
                               int k, int sigmoid, int renorm, float scaling) {
  int warps = blockDim.x / 32;
  int wi = threadIdx.x / 32, lane = threadIdx.x % 32;
  int t = blockIdx.x * warps + wi;
  if (t >= t_count) return;
  const T *row = logits + (size_t)t * e;
  float mx = 0.f, inv = 1.f;
  if (!sigmoid) {
    mx = -INFINITY;
    for (int j = lane; j < e; j += 32) mx = fmaxf(mx, to_f(row[j]));
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float sum = 0.f;
    for (int j = lane; j < e; j += 32) sum += expf(to_f(row[j]) - mx);
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    inv = 1.f / sum;
  }
  if (lane == 0) {
    float tot = 0.f;
    for (int r = 0; r < k; r++) {
      uint32_t id = ids[(size_t)t * k + r];
      float l = id < (uint32_t)e ? to_f(row[id]) : -INFINITY;
      float s = sigmoid ? 1.f / (1.f + expf(-l)) : expf(l - mx) * inv;
      w[(size_t)t * k + r] = s;
      tot += s;
    }
    for (int r = 0; r < k; r++) {
      float s = w[(size_t)t * k + r];
      if (renorm) s = tot > 0.f ? s / tot : 0.f;
      w[(size_t)t * k + r] = s * scaling;
    }
  }
}

#define RW(NAME, T)                                                                           \
  extern "C" __global__ void NAME(const T *logits, const uint32_t *ids, float *w, int t_count,  \
                                  int e, int k, int sigmoid, int renorm, float scaling) {       \
    router_weights<T>(logits, ids, w, t_count, e, k, sigmoid, renorm, scaling);                 \
  }
RW(moe_router_weights_f32, float)
RW(moe_router_weights_bf16, __nv_bfloat16)
RW(moe_router_weights_f16, __half)

// --------------------------------------------------------------- align ----

// One block. Buffer layout (see src/ops/align.rs): sorted [max_padded] |
// expert_ids [max_blocks] | post_pad [1] | local counts [num_local].
// Ids >= num_experts are dropped (their slots stay padding: output 0).
extern "C" __global__ void moe_align(const uint32_t *ids, const int *expert_map, int has_map,
                                     uint32_t *out,
                                     int numel, int block_size, int num_experts, int num_local,
                                     int max_padded, int max_blocks) {
  DYNAMIC_SHARED(int, sh);
  int *counts = sh;                    // [E]
  int *starts = sh + num_experts;      // [E + 1]
  int *pos = starts + num_experts + 1; // [E]
  uint32_t *sorted = out;
  uint32_t *expert_ids = out + max_padded;
  uint32_t *post_pad = expert_ids + max_blocks;
  uint32_t *local_counts = post_pad + 1;
  for (int x = threadIdx.x; x < num_experts; x += blockDim.x) counts[x] = 0;
  for (int x = threadIdx.x; x < num_local; x += blockDim.x) local_counts[x] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < numel; i += blockDim.x) {
    uint32_t id = ids[i];
    if (id < (uint32_t)num_experts) atomicAdd(&counts[id], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    starts[0] = 0;
    for (int x = 0; x < num_experts; x++)
      starts[x + 1] = starts[x] + (counts[x] + block_size - 1) / block_size * block_size;
    *post_pad = (uint32_t)starts[num_experts];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < max_padded; i += blockDim.x) sorted[i] = (uint32_t)numel;
  for (int b = threadIdx.x; b < max_blocks; b += blockDim.x) expert_ids[b] = NON_LOCAL;
  for (int x = threadIdx.x; x < num_experts; x += blockDim.x) pos[x] = starts[x];
  __syncthreads();
  for (int x = threadIdx.x; x < num_experts; x += blockDim.x) {
    int lx = has_map ? expert_map[x] : x;
    uint32_t tag = NON_LOCAL;
    if (lx >= 0 && lx < num_local) {
      local_counts[lx] = (uint32_t)counts[x];
      tag = (uint32_t)lx;
    }
    for (int b = starts[x] / block_size; b < starts[x + 1] / block_size; b++) expert_ids[b] = tag;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < numel; i += blockDim.x) {
    uint32_t id = ids[i];
    if (id < (uint32_t)num_experts) sorted[atomicAdd(&pos[id], 1)] = (uint32_t)i;
  }
}

// --------------------------------------------------------- grouped GEMM ----

// out[s, n] = sum_k A[s / row_div, k] * W[e(s), n, k] (+ bias[e, n]) (* w[s]),
// for the valid rows s of every align block. CTA: one align block (BM rows,
// BM = block_size <= 64) x BN columns; K in tiles of BK through shared memory,
// f32 accumulation. Weight formats decode inside the tile load.
#define BN 64
#define BK 32
#define MAXBM 64

template <typename TW> struct WLoad;
template <> struct WLoad<float> {
  __device__ static float get(const void *w, const void *, size_t e, int n, int k, int N, int K,
                              int, int) {
    return ((const float *)w)[(e * N + n) * (size_t)K + k];
  }
};
template <> struct WLoad<__nv_bfloat16> {
  __device__ static float get(const void *w, const void *, size_t e, int n, int k, int N, int K,
                              int, int) {
    return __bfloat162float(((const __nv_bfloat16 *)w)[(e * N + n) * (size_t)K + k]);
  }
};
template <> struct WLoad<__half> {
  __device__ static float get(const void *w, const void *, size_t e, int n, int k, int N, int K,
                              int, int) {
    return __half2float(((const __half *)w)[(e * N + n) * (size_t)K + k]);
  }
};
template <> struct WLoad<WFp8> {
  // scales [E, ceil(N/bn), ceil(K/bk)]
  __device__ static float get(const void *w, const void *sc, size_t e, int n, int k, int N, int K,
                              int bn, int bk) {
    uint8_t b = ((const uint8_t *)w)[(e * N + n) * (size_t)K + k];
    int nb = (N + bn - 1) / bn, kb = (K + bk - 1) / bk;
    float s = ((const float *)sc)[(e * nb + n / bn) * (size_t)kb + k / bk];
    return e4m3_to_f(b) * s;
  }
};
template <> struct WLoad<WMx> {
  // packed [E, N, K/2], scales [E, N, K/32]
  __device__ static float get(const void *w, const void *sc, size_t e, int n, int k, int N, int K,
                              int, int) {
    size_t i = (e * N + n) * (size_t)K + k;
    uint8_t b = ((const uint8_t *)w)[i / 2];
    uint8_t nib = (k & 1) ? (b >> 4) : (b & 0xf);
    return E2M1[nib] * e8m0_to_f(((const uint8_t *)sc)[i / 32]);
  }
};

template <typename TA, typename TW>
__device__ void grouped_gemm(const TA *a, const void *w, const void *scales,
                             const uint32_t *routing, const float *bias, int has_bias,
                             const float *topk_w, int has_w, float *out, int N, int K, int row_div, int numel, int block_size,
                             int max_padded, int max_blocks, int num_local, int bn, int bk) {
  __shared__ float as[MAXBM][BK + 1];
  __shared__ float ws[BN][BK + 1];
  __shared__ int rows[MAXBM];
  const uint32_t *sorted = routing;
  const int blk = blockIdx.x;
  const int ex_local = block_expert(routing, blk, block_size, max_padded, max_blocks, num_local);
  if (ex_local < 0) return;
  const uint32_t ex = (uint32_t)ex_local;
  int n0 = blockIdx.y * BN;
  for (int r = threadIdx.x; r < block_size; r += blockDim.x) {
    uint32_t s = sorted[blk * block_size + r];
    rows[r] = s < (uint32_t)numel ? (int)s : -1;
  }
  __syncthreads();
  // thread layout: 256 threads = 16 (rows) x 16 (column groups of 4)
  int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
  float acc[4][4];
  for (int i = 0; i < 4; i++)
    for (int j = 0; j < 4; j++) acc[i][j] = 0.f;
  for (int k0 = 0; k0 < K; k0 += BK) {
    for (int idx = threadIdx.x; idx < block_size * BK; idx += blockDim.x) {
      int r = idx / BK, kk = idx % BK;
      int s = rows[r];
      as[r][kk] = (s >= 0 && k0 + kk < K) ? to_f(a[(size_t)(s / row_div) * K + k0 + kk]) : 0.f;
    }
    for (int idx = threadIdx.x; idx < BN * BK; idx += blockDim.x) {
      int c = idx / BK, kk = idx % BK;
      int n = n0 + c;
      ws[c][kk] = (n < N && k0 + kk < K) ? WLoad<TW>::get(w, scales, ex, n, k0 + kk, N, K, bn, bk)
                                         : 0.f;
    }
    __syncthreads();
    for (int kk = 0; kk < BK; kk++) {
      float wv[4];
      for (int j = 0; j < 4; j++) wv[j] = ws[tc * 4 + j][kk];
      for (int i = 0; i < 4; i++) {
        int r = tr + 16 * i;
        if (r < block_size) {
          float av = as[r][kk];
          for (int j = 0; j < 4; j++) acc[i][j] += av * wv[j];
        }
      }
    }
    __syncthreads();
  }
  for (int i = 0; i < 4; i++) {
    int r = tr + 16 * i;
    if (r >= block_size) continue;
    int s = rows[r];
    if (s < 0) continue;
    for (int j = 0; j < 4; j++) {
      int n = n0 + tc * 4 + j;
      if (n >= N) continue;
      float v = acc[i][j];
      if (has_bias) v += bias[(size_t)ex * N + n];
      if (has_w) v *= topk_w[s];
      out[(size_t)s * N + n] = v;
    }
  }
}

#define GG(NAME, TA, TW)                                                                      \
  extern "C" __global__ void NAME(const TA *a, const void *w, const void *scales,              \
                                  const uint32_t *routing, const float *bias, int has_bias,    \
                                  const float *topk_w, int has_w, float *out, int N, int K,    \
                                  int row_div, int numel, int block_size, int max_padded,      \
                                  int max_blocks, int num_local, int bn, int bk) {             \
    grouped_gemm<TA, TW>(a, w, scales, routing, bias, has_bias, topk_w, has_w, out, N, K,      \
                         row_div, numel, block_size, max_padded, max_blocks, num_local, bn,    \
                         bk);                                                                  \
  }
GG(moe_gemm_f32_f32, float, float)
GG(moe_gemm_f32_bf16, float, __nv_bfloat16)
GG(moe_gemm_f32_f16, float, __half)
GG(moe_gemm_f32_fp8, float, WFp8)
GG(moe_gemm_f32_mxfp4, float, WMx)
GG(moe_gemm_bf16_f32, __nv_bfloat16, float)
GG(moe_gemm_bf16_bf16, __nv_bfloat16, __nv_bfloat16)
GG(moe_gemm_bf16_f16, __nv_bfloat16, __half)
GG(moe_gemm_bf16_fp8, __nv_bfloat16, WFp8)
GG(moe_gemm_bf16_mxfp4, __nv_bfloat16, WMx)
GG(moe_gemm_f16_f32, __half, float)
GG(moe_gemm_f16_bf16, __half, __nv_bfloat16)
GG(moe_gemm_f16_f16, __half, __half)
GG(moe_gemm_f16_fp8, __half, WFp8)
GG(moe_gemm_f16_mxfp4, __half, WMx)

// ---------------------------------------------------- elementwise ops ----

// out[r, j] = act(x[r, j]) * x[r, I + j]; act 0 silu, 1 gelu (erf), 2 gelu tanh
template <typename T>
__device__ void act_and_mul(const T *x, float *out, int rows, int inter, int act) {
  size_t total = (size_t)rows * inter;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x) {
    size_t r = i / inter, j = i % inter;
    float g = to_f(x[r * 2 * inter + j]);
    float u = to_f(x[r * 2 * inter + inter + j]);
    float a;
    if (act == 0) {
      a = g / (1.f + expf(-g));
    } else if (act == 1) {
      a = 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
    } else {
      a = 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    }
    out[i] = a * u;
  }
}
#define AM(NAME, T)                                                                           \
  extern "C" __global__ void NAME(const T *x, float *out, int rows, int inter, int act) {      \
    act_and_mul<T>(x, out, rows, inter, act);                                                  \
  }
AM(moe_act_and_mul_f32, float)
AM(moe_act_and_mul_bf16, __nv_bfloat16)
AM(moe_act_and_mul_f16, __half)

// out[t, h] = sum_j w[t, j] * y[t*k + j, h]  (w may be null: plain sum)
template <typename TO>
__device__ void weighted_sum(const float *y, const float *w, int has_w, TO *out, int tokens, int k,
                             int h) {
  size_t total = (size_t)tokens * h;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x) {
    size_t t = i / h, c = i % h;
    float acc = 0.f;
    for (int j = 0; j < k; j++) {
      size_t r = t * k + j;
      acc += (has_w ? w[r] : 1.f) * y[r * h + c];
    }
    out[i] = from_f<TO>(acc);
  }
}
#define WS(NAME, TO)                                                                          \
  extern "C" __global__ void NAME(const float *y, const float *w, int has_w, TO *out,          \
                                  int tokens, int k, int h) {                                  \
    weighted_sum<TO>(y, w, has_w, out, tokens, k, h);                                          \
  }
WS(moe_weighted_sum_f32, float)
WS(moe_weighted_sum_bf16, __nv_bfloat16)
WS(moe_weighted_sum_f16, __half)

// Per-token-group FP8 quantize-dequantize; one warp per (row, group).
template <typename T>
__device__ void fp8_group_quant(const T *x, float *out, int rows, int cols, int group) {
  int warps = blockDim.x / 32;
  int wi = threadIdx.x / 32, lane = threadIdx.x % 32;
  int groups = (cols + group - 1) / group;
  size_t item = (size_t)blockIdx.x * warps + wi;
  if (item >= (size_t)rows * groups) return;
  size_t r = item / groups;
  int g0 = (int)(item % groups) * group;
  int g1 = min(g0 + group, cols);
  const T *row = x + r * cols;
  float amax = 0.f;
  for (int c = g0 + lane; c < g1; c += 32) amax = fmaxf(amax, fabsf(to_f(row[c])));
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  float s = fmaxf(amax, 1e-10f) / 448.0f;
  for (int c = g0 + lane; c < g1; c += 32) out[r * cols + c] = round_to_e4m3(to_f(row[c]) / s) * s;
}
#define FQ(NAME, T)                                                                           \
  extern "C" __global__ void NAME(const T *x, float *out, int rows, int cols, int group) {     \
    fp8_group_quant<T>(x, out, rows, cols, group);                                             \
  }
FQ(moe_fp8_group_quant_f32, float)
FQ(moe_fp8_group_quant_bf16, __nv_bfloat16)
FQ(moe_fp8_group_quant_f16, __half)

// ------------------------------------------- tensor-core grouped GEMM ----

// The grouped GEMM on tensor cores (sm_80+, WMMA m16n16k16, f32 accumulate)
// for bf16 / f16 weights: one CTA per (align block of 16 rows, 64 columns),
// 4 warps, each owning a 16x16 output tile. Activations (f32) are rounded to
// the weights' type when staged in shared memory, as vLLM's fused_moe
// computes with bf16/f16 activations. Same arguments and epilogue as the SIMT
// kernel above.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MOE_HAS_WMMA 1
#endif
#include <mma.h>

template <typename TW>
__device__ void grouped_gemm_wmma(const float *a, const TW *w, const uint32_t *routing,
                                  const float *bias, int has_bias, const float *topk_w, int has_w,
                                  float *out, int N, int K, int row_div, int numel,
                                  int max_padded, int max_blocks, int num_local) {
#ifdef MOE_HAS_WMMA
  using namespace nvcuda;
  constexpr int TM = 16, TN = 64, TK = 32;
  __shared__ __align__(32) TW as[TM][TK];
  __shared__ __align__(32) TW ws[TN][TK];
  __shared__ __align__(32) float cs[TM][TN];
  __shared__ int rows[TM];
  const uint32_t *sorted = routing;
  const int blk = blockIdx.x;
  const int ex_local = block_expert(routing, blk, TM, max_padded, max_blocks, num_local);
  if (ex_local < 0) return;
  const uint32_t ex = (uint32_t)ex_local;
  int n0 = blockIdx.y * TN;
  int warp = threadIdx.x / 32;
  if (threadIdx.x < TM) {
    uint32_t s = sorted[blk * TM + threadIdx.x];
    rows[threadIdx.x] = s < (uint32_t)numel ? (int)s : -1;
  }
  __syncthreads();
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  const TW *we = w + (size_t)ex * N * K;
  for (int k0 = 0; k0 < K; k0 += TK) {
    for (int idx = threadIdx.x; idx < TM * TK; idx += blockDim.x) {
      int r = idx / TK, kk = idx % TK;
      int s = rows[r];
      float v = (s >= 0 && k0 + kk < K) ? a[(size_t)(s / row_div) * K + k0 + kk] : 0.f;
      as[r][kk] = from_f<TW>(v);
    }
    for (int idx = threadIdx.x; idx < TN * TK; idx += blockDim.x) {
      int c = idx / TK, kk = idx % TK;
      int n = n0 + c;
      ws[c][kk] = (n < N && k0 + kk < K) ? we[(size_t)n * K + k0 + kk] : from_f<TW>(0.f);
    }
    __syncthreads();
    for (int kk = 0; kk < TK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, TW, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, TW, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, &as[0][kk], TK);
      // B = W^T: element (k, n) is ws[n][k], i.e. column-major with ld TK
      wmma::load_matrix_sync(fb, &ws[warp * 16][kk], TK);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    __syncthreads();
  }
  wmma::store_matrix_sync(&cs[0][warp * 16], acc, TN, wmma::mem_row_major);
  __syncthreads();
  for (int idx = threadIdx.x; idx < TM * TN; idx += blockDim.x) {
    int r = idx / TN, c = idx % TN;
    int s = rows[r], n = n0 + c;
    if (s < 0 || n >= N) continue;
    float v = cs[r][c];
    if (has_bias) v += bias[(size_t)ex * N + n];
    if (has_w) v *= topk_w[s];
    out[(size_t)s * N + n] = v;
  }
#endif
}

#define GGW(NAME, TW)                                                                         \
  extern "C" __global__ void NAME(const float *a, const TW *w, const uint32_t *routing,        \
                                  const float *bias, int has_bias, const float *topk_w,        \
                                  int has_w, float *out, int N, int K, int row_div, int numel, \
                                  int max_padded, int max_blocks, int num_local) {             \
    grouped_gemm_wmma<TW>(a, w, routing, bias, has_bias, topk_w, has_w, out, N, K, row_div,    \
                          numel, max_padded, max_blocks, num_local);                           \
  }
GGW(moe_gemm_wmma_bf16, __nv_bfloat16)
GGW(moe_gemm_wmma_f16, __half)
