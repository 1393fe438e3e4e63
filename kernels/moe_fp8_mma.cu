// FP8 W8A8 grouped GEMM on FP8 tensor cores (mma.sync m16n8k32 e4m3, sm_89+),
// and the activation quantization that feeds it. Compiled by build.rs for
// sm_89 at least, in its own PTX module, and launched only on devices of
// compute capability >= 8.9 (src/ops/grouped_gemm.rs checks).
//
// Numerics match the CPU W8A8 path: activations quantized per token per group
// of `bk` columns (scale = amax / 448, round to nearest even e4m3), weights in
// 128x128 (bn x bk) blocks; each k-block's e4m3 products are summed exactly
// in f32 by the tensor cores, then scaled by a_scale[row] * w_scale[block].

#include "common.cuh"

// out q[r, c] = e4m3(x[r, c] / s[r, g]), s[r, g] = max(amax of the group, 1e-10) / 448
// One warp per (row, group).
template <typename T>
__device__ void fp8_group_quant_bytes(const T *x, uint8_t *q, float *scales, int rows, int cols,
                                      int group) {
  int warps = blockDim.x / 32;
  int wi = threadIdx.x / 32, lane = threadIdx.x % 32;
  int groups = (cols + group - 1) / group;
  size_t item = (size_t)blockIdx.x * warps + wi;
  if (item >= (size_t)rows * groups) return;
  size_t r = item / groups;
  int g = (int)(item % groups);
  int g0 = g * group, g1 = min(g0 + group, cols);
  const T *row = x + r * cols;
  float amax = 0.f;
  for (int c = g0 + lane; c < g1; c += 32) amax = fmaxf(amax, fabsf(to_f(row[c])));
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  float s = fmaxf(amax, 1e-10f) / 448.0f;
  for (int c = g0 + lane; c < g1; c += 32) q[r * cols + c] = f_to_e4m3(round_to_e4m3(to_f(row[c]) / s));
  if (lane == 0) scales[r * groups + g] = s;
}
#define FQB(NAME, T)                                                                          \
  extern "C" __global__ void NAME(const T *x, uint8_t *q, float *scales, int rows, int cols,   \
                                  int group) {                                                 \
    fp8_group_quant_bytes<T>(x, q, scales, rows, cols, group);                                 \
  }
FQB(moe_fp8_group_quant_bytes_f32, float)
FQB(moe_fp8_group_quant_bytes_bf16, __nv_bfloat16)
FQB(moe_fp8_group_quant_bytes_f16, __half)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define MOE_HAS_FP8_MMA 1
#endif

#define F8_BN 64
#define F8_BK 64
#define F8_LD (F8_BK + 16)

// d += a (16x32, row) * b (32x8, col), e4m3 inputs, f32 accumulators.
__device__ __forceinline__ void mma_e4m3(float *d, const unsigned int *a, const unsigned int *b) {
#if defined(MOE_EMU)
  emu_mma_e4m3(d, a, b);
#elif defined(MOE_HAS_FP8_MMA)
  asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// CTA: one align block of MT*16 rows (block_size 16 or 64) x 64 columns,
// 4 warps; warp w owns columns 16w..16w+15 (two n8 tiles) of every row.
// aq: e4m3 activations [rows_a, K], as: their scales [rows_a, ceil(K/bk)];
// w: e4m3 [E, N, K], ws: [E, ceil(N/bn), ceil(K/bk)].
// Needs K % 16 == 0, 16-byte aligned operands, bk % 64 == 0 (host checks).
template <int MT>
__device__ void gemm_fp8_mma(const uint8_t *aq, const float *as, const uint8_t *w,
                             const float *ws, const uint32_t *routing, const float *bias,
                             int has_bias, const float *topk_w, int has_w, float *out, int N,
                             int K, int row_div, int numel, int max_padded, int max_blocks,
                             int num_local, int bn, int bk) {
#ifdef MOE_HAS_FP8_MMA
  constexpr int BM = MT * 16;
  __shared__ __align__(16) uint8_t a_s[BM][F8_LD];
  __shared__ __align__(16) uint8_t w_s[F8_BN][F8_LD];
  __shared__ int rows[BM];
  const uint32_t *sorted = routing;
  const int blk = blockIdx.x;
  const int ex_local = block_expert(routing, blk, BM, max_padded, max_blocks, num_local);
  if (ex_local < 0) return;
  const uint32_t ex = (uint32_t)ex_local;
  const int n0 = blockIdx.y * F8_BN;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  for (int r = tid; r < BM; r += blockDim.x) {
    uint32_t s = sorted[blk * BM + r];
    rows[r] = s < (uint32_t)numel ? (int)s : -1;
  }
  __syncthreads();
  const int kb_count = (K + bk - 1) / bk, nb_count = (N + bn - 1) / bn;
  float acc[MT][2][4], part[MT][2][4];
#pragma unroll
  for (int m = 0; m < MT; m++)
#pragma unroll
    for (int j = 0; j < 2; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) acc[m][j][e] = part[m][j][e] = 0.f;
  for (int k0 = 0; k0 < K; k0 += F8_BK) {
    // A tile: BM rows x 64 bytes (4 chunks of 16 per row)
    for (int i = tid; i < BM * 4; i += blockDim.x) {
      const int r = i / 4, kc = (i % 4) * 16, k = k0 + kc;
      const int s = rows[r];
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (s >= 0 && k < K) v = __ldg((const uint4 *)(aq + (size_t)(s / row_div) * K + k));
      *(uint4 *)&a_s[r][kc] = v;
    }
    // W tile: 64 rows x 64 bytes
    for (int i = tid; i < F8_BN * 4; i += blockDim.x) {
      const int c = i / 4, kc = (i % 4) * 16, k = k0 + kc, n = n0 + c;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (n < N && k < K) v = __ldg((const uint4 *)(w + ((size_t)ex * N + n) * K + k));
      *(uint4 *)&w_s[c][kc] = v;
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < F8_BK; ks += 32) {
      unsigned int bfr[2][2];
#pragma unroll
      for (int j = 0; j < 2; j++) {
        const int c = warp * 16 + j * 8 + g;
        bfr[j][0] = *(const unsigned int *)&w_s[c][ks + t * 4];
        bfr[j][1] = *(const unsigned int *)&w_s[c][ks + 16 + t * 4];
      }
#pragma unroll
      for (int m = 0; m < MT; m++) {
        unsigned int afr[4];
        afr[0] = *(const unsigned int *)&a_s[m * 16 + g][ks + t * 4];
        afr[1] = *(const unsigned int *)&a_s[m * 16 + g + 8][ks + t * 4];
        afr[2] = *(const unsigned int *)&a_s[m * 16 + g][ks + 16 + t * 4];
        afr[3] = *(const unsigned int *)&a_s[m * 16 + g + 8][ks + 16 + t * 4];
#pragma unroll
        for (int j = 0; j < 2; j++) mma_e4m3(part[m][j], afr, bfr[j]);
      }
    }
    __syncthreads();
    if ((k0 + F8_BK) % bk == 0 || k0 + F8_BK >= K) {
      // end of a k-block: acc += part * a_scale[row] * w_scale[column block]
      const int kb = k0 / bk;
      float wsc[2][2];
#pragma unroll
      for (int j = 0; j < 2; j++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
          const int n = min(n0 + warp * 16 + j * 8 + t * 2 + e, N - 1);
          wsc[j][e] = ws[((size_t)ex * nb_count + n / bn) * kb_count + kb];
        }
#pragma unroll
      for (int m = 0; m < MT; m++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
          const int s = rows[m * 16 + g + 8 * h];
          const float sa = s >= 0 ? as[(size_t)(s / row_div) * kb_count + kb] : 0.f;
#pragma unroll
          for (int j = 0; j < 2; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
              acc[m][j][2 * h + e] += part[m][j][2 * h + e] * sa * wsc[j][e];
              part[m][j][2 * h + e] = 0.f;
            }
        }
      }
    }
  }
  // c0, c1: row g, columns 2t, 2t+1 of the n8 tile; c2, c3: row g + 8
#pragma unroll
  for (int m = 0; m < MT; m++)
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int s = rows[m * 16 + g + 8 * h];
      if (s < 0) continue;
#pragma unroll
      for (int j = 0; j < 2; j++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
          const int n = n0 + warp * 16 + j * 8 + t * 2 + e;
          if (n >= N) continue;
          float v = acc[m][j][2 * h + e];
          if (has_bias) v += bias[(size_t)ex * N + n];
          if (has_w) v *= topk_w[s];
          out[(size_t)s * N + n] = v;
        }
    }
#endif
}

#define F8(NAME, MT)                                                                          \
  extern "C" __global__ void __launch_bounds__(128)                                            \
      NAME(const uint8_t *aq, const float *as, const uint8_t *w, const float *ws,              \
           const uint32_t *routing, const float *bias, int has_bias, const float *topk_w,      \
           int has_w, float *out, int N, int K, int row_div, int numel, int max_padded,        \
           int max_blocks, int num_local, int bn, int bk) {                                    \
    gemm_fp8_mma<MT>(aq, as, w, ws, routing, bias, has_bias, topk_w, has_w, out, N, K,         \
                     row_div, numel, max_padded, max_blocks, num_local, bn, bk);               \
  }
F8(moe_gemm_fp8_mma_m16, 1)
F8(moe_gemm_fp8_mma_m64, 4)
