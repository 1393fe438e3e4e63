// Helpers shared by the kernel files: element conversions and the FP8 / MXFP4
// codecs, bit-identical to the CPU ones (src/quant/*_codec.rs).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define NON_LOCAL 0xffffffffu

// Tags of the packed weight formats: FP8 e4m3 with block scales, MXFP4.
struct WFp8 {};
struct WMx {};

// The local expert of align block `blk` (blocks of `bs` rows) in a routing
// buffer (src/ops/align.rs layout), or -1 when the block lies past
// num_tokens_post_padded or belongs to a non-local expert: nothing to do.
__device__ __forceinline__ int block_expert(const uint32_t *routing, int blk, int bs,
                                            int max_padded, int max_blocks, int num_local) {
  uint32_t post_pad = routing[max_padded + max_blocks];
  if ((uint32_t)(blk * bs) >= post_pad) return -1;
  uint32_t ex = routing[max_padded + blk];
  return (ex == NON_LOCAL || ex >= (uint32_t)num_local) ? -1 : (int)ex;
}

// Dynamically sized shared memory (the launch sets its size).
#ifdef MOE_EMU
#define DYNAMIC_SHARED(T, name) T *name = (T *)emu_dynamic_smem()
#else
#define DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

// ---------------------------------------------------------------- loads ----

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// e4m3 byte -> float: the 7 low bits shifted into f16 place give value / 256.
__device__ __forceinline__ float e4m3_to_f(uint8_t b) {
  unsigned short h = (unsigned short)(((b & 0x80u) << 8) | ((b & 0x7fu) << 7));
  return __half2float(__ushort_as_half(h)) * 256.0f;
}

// nearest e4m3 value (ties to even, saturating at 448), as on the CPU
__device__ __forceinline__ float round_to_e4m3(float x) {
  float a = fminf(fabsf(x), 448.0f);
  float r;
  if (a < 0.015625f) {
    r = __fsub_rn(__fadd_rn(a, 16384.0f), 16384.0f);
  } else {
    unsigned int b = __float_as_uint(a);
    r = __uint_as_float((b + 0x7ffffu + ((b >> 20) & 1u)) & 0xfff00000u);
  }
  return copysignf(r, x);
}

__constant__ float E2M1[16] = {0.0f, 0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

__device__ __forceinline__ float e8m0_to_f(uint8_t e) {
  // 2^(e-127); e = 0 is the subnormal 2^-127
  return e == 0 ? __uint_as_float(0x00400000u) : __uint_as_float((unsigned int)e << 23);
}

// The byte of an e4m3 value (already rounded: |r| <= 448, on the e4m3 grid).
__device__ __forceinline__ uint8_t f_to_e4m3(float r) {
  unsigned int sign = (__float_as_uint(r) >> 24) & 0x80u;
  float a = fabsf(r);
  if (a < 0.015625f) return (uint8_t)(sign | (unsigned int)(a * 512.0f)); // m * 2^-9
  unsigned int b = __float_as_uint(a);
  unsigned int e = ((b >> 23) & 0xffu) - 120u; // rebias 127 -> 7
  return (uint8_t)(sign | (e << 3) | ((b >> 20) & 7u));
}
