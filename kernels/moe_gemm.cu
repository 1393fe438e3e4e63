// The grouped GEMMs picked by problem size (src/ops/grouped_gemm.rs chooses):
//  - moe_gemv_*: decode (align blocks of <= 16 rows, few valid rows each).
//    One warp per 2 output columns streams each weight row once in 16-byte
//    chunks and applies it to every valid row of the block, so a step reads
//    each routed expert's weights exactly once, in their packed form.
//  - moe_gemm_tc64_*: prefill (align blocks of 64 rows) on tensor cores, a
//    64 x 128 CTA tile, 8 warps of 32 x 32, weights of any format decoded to
//    bf16/f16 in shared memory (FP8 block scales applied per k-block in f32).
// Both take the same arguments as the SIMT kernel of moe_ops.cu and write
// out[s, n] = (A[s / row_div] . W[e(s), n] + bias[e, n]) * w[s] for the valid
// sorted rows s of every local block; other rows are never touched (the output
// is allocated zeroed). Grid x = number of align blocks that can be non-empty.

#include "common.cuh"
#include <mma.h>

// e2m1 nibble -> f16 bits: the 3 magnitude bits placed at the f16 exponent /
// mantissa boundary give value * 2^-14 (normal and subnormal alike).
__device__ __forceinline__ unsigned int e2m1_f16_bits(unsigned int nib) {
  return ((nib & 7u) << 9) | ((nib & 8u) << 12);
}
#define E2M1_F16_UNIT 16384.0f

// ------------------------------------------------------ 16-byte chunks ----

// One 16-byte chunk of a weight row decoded to EPC floats (times `scale`).
template <typename TW> struct Chunk;
template <> struct Chunk<float> {
  static constexpr int EPC = 4;
  __device__ static float scale(const void *, size_t, int, int, int, int, int, int) { return 1.f; }
  __device__ static void decode(uint4 v, float, float *o) {
    o[0] = __uint_as_float(v.x);
    o[1] = __uint_as_float(v.y);
    o[2] = __uint_as_float(v.z);
    o[3] = __uint_as_float(v.w);
  }
};
__device__ __forceinline__ void bf16x2(unsigned int u, float *o) {
  o[0] = __uint_as_float(u << 16);
  o[1] = __uint_as_float(u & 0xffff0000u);
}
__device__ __forceinline__ void f16x2(unsigned int u, float *o) {
  float2 f = __half22float2(*reinterpret_cast<__half2 *>(&u));
  o[0] = f.x;
  o[1] = f.y;
}
template <> struct Chunk<__nv_bfloat16> {
  static constexpr int EPC = 8;
  __device__ static float scale(const void *, size_t, int, int, int, int, int, int) { return 1.f; }
  __device__ static void decode(uint4 v, float, float *o) {
    bf16x2(v.x, o);
    bf16x2(v.y, o + 2);
    bf16x2(v.z, o + 4);
    bf16x2(v.w, o + 6);
  }
};
template <> struct Chunk<__half> {
  static constexpr int EPC = 8;
  __device__ static float scale(const void *, size_t, int, int, int, int, int, int) { return 1.f; }
  __device__ static void decode(uint4 v, float, float *o) {
    f16x2(v.x, o);
    f16x2(v.y, o + 2);
    f16x2(v.z, o + 4);
    f16x2(v.w, o + 6);
  }
};
template <> struct Chunk<WFp8> {
  static constexpr int EPC = 16;
  // scales [E, ceil(N/bn), ceil(K/bk)]; a chunk never straddles a k-block (bk % 16 == 0)
  __device__ static float scale(const void *sc, size_t e, int n, int k, int N, int K, int bn,
                                int bk) {
    int nb = (N + bn - 1) / bn, kb = (K + bk - 1) / bk;
    return ((const float *)sc)[(e * nb + n / bn) * (size_t)kb + k / bk];
  }
  __device__ static void decode(uint4 v, float s, float *o) {
    unsigned int u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
#pragma unroll
      for (int j = 0; j < 4; j++) o[4 * i + j] = e4m3_to_f((uint8_t)(u[i] >> (8 * j))) * s;
    }
  }
};
template <> struct Chunk<WMx> {
  static constexpr int EPC = 32;
  // scales [E, N, K/32]: exactly one e8m0 per chunk
  __device__ static float scale(const void *sc, size_t e, int n, int k, int N, int K, int, int) {
    return e8m0_to_f(((const uint8_t *)sc)[(e * N + n) * (size_t)(K / 32) + k / 32]);
  }
  __device__ static void decode(uint4 v, float s, float *o) {
    unsigned int u[4] = {v.x, v.y, v.z, v.w};
    float su = s * E2M1_F16_UNIT;
#pragma unroll
    for (int i = 0; i < 4; i++) {
#pragma unroll
      for (int j = 0; j < 4; j++) {
        unsigned int b = (u[i] >> (8 * j)) & 0xffu;
        // low nibble first
        unsigned int h2 = e2m1_f16_bits(b & 0xfu) | (e2m1_f16_bits(b >> 4) << 16);
        float2 f = __half22float2(*reinterpret_cast<__half2 *>(&h2));
        o[8 * i + 2 * j] = f.x * su;
        o[8 * i + 2 * j + 1] = f.y * su;
      }
    }
  }
};

// Bytes of one weight row of K elements.
template <typename TW> __device__ __forceinline__ size_t row_bytes(int K) {
  return (size_t)K * 16 / Chunk<TW>::EPC;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// ---------------------------------------------------------------- GEMV ----

#define GV_WARPS 8
#define GV_COLS 2
#define GV_MAXR 16

// Needs K % EPC == 0, 16-byte aligned weights and activations (host checks).
template <typename TW>
__device__ void gemv_grouped(const float *a, const uint8_t *w, const void *scales,
                             const uint32_t *routing, const float *bias, int has_bias,
                             const float *topk_w, int has_w, float *out, int N, int K,
                             int row_div, int numel, int block_size, int max_padded,
                             int max_blocks, int num_local, int bn, int bk) {
  using C = Chunk<TW>;
  __shared__ int rows[GV_MAXR];
  __shared__ int nrows_s;
  const uint32_t *sorted = routing;
  const int blk = blockIdx.x;
  const int ex_local = block_expert(routing, blk, block_size, max_padded, max_blocks, num_local);
  if (ex_local < 0) return;
  const uint32_t ex = (uint32_t)ex_local;
  if (threadIdx.x == 0) {
    int c = 0;
    for (int r = 0; r < block_size && r < GV_MAXR; r++) {
      uint32_t s = sorted[blk * block_size + r];
      if (s < (uint32_t)numel) rows[c++] = (int)s;
    }
    nrows_s = c;
  }
  __syncthreads();
  const int nrows = nrows_s;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n_base = (blockIdx.y * GV_WARPS + warp) * GV_COLS;
  if (n_base >= N) return;
  const int chunks = K / C::EPC;
  const size_t rb = row_bytes<TW>(K);
  float acc[GV_MAXR][GV_COLS];
#pragma unroll
  for (int r = 0; r < GV_MAXR; r++)
#pragma unroll
    for (int j = 0; j < GV_COLS; j++) acc[r][j] = 0.f;
  for (int c = lane; c < chunks; c += 32) {
    const int k = c * C::EPC;
    float wv[GV_COLS][C::EPC];
#pragma unroll
    for (int j = 0; j < GV_COLS; j++) {
      const int n = n_base + j;
      if (n < N) {
        const uint4 *p = (const uint4 *)(w + ((size_t)ex * N + n) * rb) + c;
        C::decode(__ldg(p), C::scale(scales, ex, n, k, N, K, bn, bk), wv[j]);
      } else {
#pragma unroll
        for (int i = 0; i < C::EPC; i++) wv[j][i] = 0.f;
      }
    }
#pragma unroll
    for (int r = 0; r < GV_MAXR; r++) {
      if (r < nrows) {
        const float4 *ap = (const float4 *)(a + (size_t)(rows[r] / row_div) * K + k);
#pragma unroll
        for (int q = 0; q < C::EPC / 4; q++) {
          float4 x = ap[q];
#pragma unroll
          for (int j = 0; j < GV_COLS; j++)
            acc[r][j] += x.x * wv[j][4 * q] + x.y * wv[j][4 * q + 1] + x.z * wv[j][4 * q + 2] +
                         x.w * wv[j][4 * q + 3];
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < GV_MAXR; r++) {
    if (r < nrows) {
#pragma unroll
      for (int j = 0; j < GV_COLS; j++) {
        float v = warp_sum(acc[r][j]);
        const int n = n_base + j;
        if (lane == 0 && n < N) {
          const int s = rows[r];
          if (has_bias) v += bias[(size_t)ex * N + n];
          if (has_w) v *= topk_w[s];
          out[(size_t)s * N + n] = v;
        }
      }
    }
  }
}

#define GV(NAME, TW)                                                                          \
  extern "C" __global__ void __launch_bounds__(GV_WARPS * 32)                                  \
      NAME(const float *a, const uint8_t *w, const void *scales, const uint32_t *routing,      \
           const float *bias, int has_bias, const float *topk_w, int has_w, float *out, int N, \
           int K, int row_div, int numel, int block_size, int max_padded, int max_blocks,      \
           int num_local, int bn, int bk) {                                                    \
    gemv_grouped<TW>(a, w, scales, routing, bias, has_bias, topk_w, has_w, out, N, K, row_div, \
                     numel, block_size, max_padded, max_blocks, num_local, bn, bk);            \
  }
GV(moe_gemv_f32, float)
GV(moe_gemv_bf16, __nv_bfloat16)
GV(moe_gemv_f16, __half)
GV(moe_gemv_fp8, WFp8)
GV(moe_gemv_mxfp4, WMx)

// ------------------------------------------------- tensor cores, 64 rows ----

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MOE_HAS_WMMA 1
#endif

#define TC_BM 64
#define TC_BN 128
#define TC_BK 32
#define TC_LD (TC_BK + 8)
#define TC_CLD 20

// 8 consecutive k-elements (k % 8 == 0) of weight row n, as 8 CT values
// packed in a uint4. FP8 is decoded unscaled (exact in bf16): its block
// scale is applied to the f32 partial sums of each k-block.
template <typename TW, typename CT> struct TcLoad;
template <> struct TcLoad<__nv_bfloat16, __nv_bfloat16> {
  __device__ static uint4 get(const uint8_t *w, const void *, size_t e, int n, int k, int N,
                              int K) {
    return __ldg((const uint4 *)(w + (((size_t)e * N + n) * K + k) * 2));
  }
};
template <> struct TcLoad<__half, __half> {
  __device__ static uint4 get(const uint8_t *w, const void *, size_t e, int n, int k, int N,
                              int K) {
    return __ldg((const uint4 *)(w + (((size_t)e * N + n) * K + k) * 2));
  }
};
__device__ __forceinline__ unsigned int pack_bf16(float lo, float hi) {
  __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned int *>(&p);
}
template <> struct TcLoad<WFp8, __nv_bfloat16> {
  __device__ static uint4 get(const uint8_t *w, const void *, size_t e, int n, int k, int N,
                              int K) {
    uint2 v = __ldg((const uint2 *)(w + ((size_t)e * N + n) * K + k));
    unsigned int u[2] = {v.x, v.y};
    unsigned int o[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
      unsigned int x = u[i / 2] >> (16 * (i % 2));
      o[i] = pack_bf16(e4m3_to_f((uint8_t)x), e4m3_to_f((uint8_t)(x >> 8)));
    }
    return make_uint4(o[0], o[1], o[2], o[3]);
  }
};
template <> struct TcLoad<WMx, __nv_bfloat16> {
  __device__ static uint4 get(const uint8_t *w, const void *sc, size_t e, int n, int k, int N,
                              int K) {
    size_t i = ((size_t)e * N + n) * K + k;
    unsigned int u = __ldg((const unsigned int *)(w + i / 2));
    float s = e8m0_to_f(((const uint8_t *)sc)[i / 32]) * E2M1_F16_UNIT;
    unsigned int o[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
      unsigned int b = (u >> (8 * j)) & 0xffu;
      unsigned int h2 = e2m1_f16_bits(b & 0xfu) | (e2m1_f16_bits(b >> 4) << 16);
      float2 f = __half22float2(*reinterpret_cast<__half2 *>(&h2));
      o[j] = pack_bf16(f.x * s, f.y * s);
    }
    return make_uint4(o[0], o[1], o[2], o[3]);
  }
};

template <typename CT> __device__ __forceinline__ uint4 pack8(const float4 x, const float4 y);
template <> __device__ __forceinline__ uint4 pack8<__nv_bfloat16>(const float4 x, const float4 y) {
  return make_uint4(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w), pack_bf16(y.x, y.y),
                    pack_bf16(y.z, y.w));
}
template <> __device__ __forceinline__ uint4 pack8<__half>(const float4 x, const float4 y) {
  __half2 p[4] = {__floats2half2_rn(x.x, x.y), __floats2half2_rn(x.z, x.w),
                  __floats2half2_rn(y.x, y.y), __floats2half2_rn(y.z, y.w)};
  return *reinterpret_cast<uint4 *>(p);
}

// Needs K % 8 == 0 and 16-byte aligned operands; for FP8, bk % 32 == 0 and
// bn % 32 == 0 (a warp's 32 columns share one scale per k-block).
template <typename TW, typename CT, bool SCALED>
__device__ void gemm_tc64(const float *a, const uint8_t *w, const void *scales,
                          const uint32_t *routing, const float *bias, int has_bias,
                          const float *topk_w, int has_w, float *out, int N, int K, int row_div,
                          int numel, int max_padded, int max_blocks, int num_local, int bn,
                          int bk) {
#ifdef MOE_HAS_WMMA
  using namespace nvcuda;
  __shared__ __align__(32) CT as[TC_BM][TC_LD];
  __shared__ __align__(32) CT ws[TC_BN][TC_LD];
  __shared__ __align__(32) float cs[8][16][TC_CLD];
  __shared__ int rows[TC_BM];
  const uint32_t *sorted = routing;
  const int blk = blockIdx.x;
  const int ex_local = block_expert(routing, blk, TC_BM, max_padded, max_blocks, num_local);
  if (ex_local < 0) return;
  const uint32_t ex = (uint32_t)ex_local;
  const int n0 = blockIdx.y * TC_BN;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / 4, wn = warp % 4;
  if (tid < TC_BM) {
    uint32_t s = sorted[blk * TC_BM + tid];
    rows[tid] = s < (uint32_t)numel ? (int)s : -1;
  }
  __syncthreads();
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2], part[2][2];
#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int j = 0; j < 2; j++) {
      wmma::fill_fragment(acc[i][j], 0.0f);
      wmma::fill_fragment(part[i][j], 0.0f);
    }
  for (int k0 = 0; k0 < K; k0 += TC_BK) {
    {
      // A: 64 rows x 32 k = 256 chunks of 8, one per thread
      const int r = tid / 4, kc = (tid % 4) * 8, k = k0 + kc;
      const int s = rows[r];
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (s >= 0 && k < K) {
        const float4 *p = (const float4 *)(a + (size_t)(s / row_div) * K + k);
        v = pack8<CT>(p[0], p[1]);
      }
      *(uint4 *)&as[r][kc] = v;
    }
    // W: 128 rows x 32 k = 512 chunks, two per thread
#pragma unroll
    for (int i = tid; i < TC_BN * TC_BK / 8; i += 256) {
      const int c = i / 4, kc = (i % 4) * 8, k = k0 + kc, n = n0 + c;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (n < N && k < K) v = TcLoad<TW, CT>::get(w, scales, ex, n, k, N, K);
      *(uint4 *)&ws[c][kc] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < TC_BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, CT, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, CT, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; i++) wmma::load_matrix_sync(fa[i], &as[wm * 32 + i * 16][kk], TC_LD);
      // B = W^T: element (k, n) is ws[n][k], column-major with ld TC_LD
#pragma unroll
      for (int j = 0; j < 2; j++) wmma::load_matrix_sync(fb[j], &ws[wn * 32 + j * 16][kk], TC_LD);
#pragma unroll
      for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) {
          if (SCALED)
            wmma::mma_sync(part[i][j], fa[i], fb[j], part[i][j]);
          else
            wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
    }
    __syncthreads();
    if (SCALED && ((k0 + TC_BK) % bk == 0 || k0 + TC_BK >= K)) {
      // end of a k-block: acc += part * scale of (this warp's columns, k-block)
      const int nb = (N + bn - 1) / bn, kb = (K + bk - 1) / bk;
      const int nblk = min((n0 + wn * 32) / bn, nb - 1);
      const float s = ((const float *)scales)[((size_t)ex * nb + nblk) * kb + k0 / bk];
#pragma unroll
      for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) {
#pragma unroll
          for (int t = 0; t < acc[i][j].num_elements; t++) acc[i][j].x[t] += part[i][j].x[t] * s;
          wmma::fill_fragment(part[i][j], 0.0f);
        }
    }
  }
#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int j = 0; j < 2; j++) {
      wmma::store_matrix_sync(&cs[warp][0][0], acc[i][j], TC_CLD, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int r = e / 16, c = e % 16;
        const int s = rows[wm * 32 + i * 16 + r];
        const int n = n0 + wn * 32 + j * 16 + c;
        if (s >= 0 && n < N) {
          float v = cs[warp][r][c];
          if (has_bias) v += bias[(size_t)ex * N + n];
          if (has_w) v *= topk_w[s];
          out[(size_t)s * N + n] = v;
        }
      }
      __syncwarp();
    }
#endif
}

// Same arguments as the GEMV and SIMT kernels; block_size must be 64.
#define TC(NAME, TW, CT, SCALED)                                                              \
  extern "C" __global__ void __launch_bounds__(256)                                            \
      NAME(const float *a, const uint8_t *w, const void *scales, const uint32_t *routing,      \
           const float *bias, int has_bias, const float *topk_w, int has_w, float *out, int N, \
           int K, int row_div, int numel, int block_size, int max_padded, int max_blocks,      \
           int num_local, int bn, int bk) {                                                    \
    (void)block_size;                                                                          \
    gemm_tc64<TW, CT, SCALED>(a, w, scales, routing, bias, has_bias, topk_w, has_w, out, N, K, \
                              row_div, numel, max_padded, max_blocks, num_local, bn, bk);      \
  }
TC(moe_gemm_tc64_bf16, __nv_bfloat16, __nv_bfloat16, false)
TC(moe_gemm_tc64_f16, __half, __half, false)
TC(moe_gemm_tc64_fp8, WFp8, __nv_bfloat16, true)
TC(moe_gemm_tc64_mxfp4, WMx, __nv_bfloat16, false)
