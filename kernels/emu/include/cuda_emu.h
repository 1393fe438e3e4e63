// A host emulation of the CUDA subset the kernels use, so that their index
// math, tiling, epilogues and fragment layouts run (slowly) on a CPU: each CTA
// runs as blockDim real threads with barriers for __syncthreads /
// __syncwarp / shuffles. Warp-collective WMMA is emulated with a full tile per
// lane (its layout is opaque to the kernels); mma.sync m16n8k32 e4m3 is
// emulated with the register layout of the PTX ISA, exchanged through the warp.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define MOE_EMU 1
#define __CUDA_ARCH__ 900
#define __global__
#define __device__ inline
#define __host__
#define __forceinline__
#define __constant__
#define __shared__ static
#define __launch_bounds__(x)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

struct uint4 {
  unsigned int x, y, z, w;
};
struct uint2 {
  unsigned int x, y;
};
struct float4 {
  float x, y, z, w;
};
struct float2 {
  float x, y;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
template <typename T> inline T __ldg(const T *p) { return *p; }

inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }

// ------------------------------------------------------- 16-bit floats ----
struct __half {
  uint16_t x;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  uint16_t x;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __half2float(__half h) {
  unsigned int s = (h.x >> 15) & 1u, e = (h.x >> 10) & 0x1fu, m = h.x & 0x3ffu;
  float v;
  if (e == 0)
    v = std::ldexp((float)m, -24);
  else if (e == 31)
    v = m ? NAN : INFINITY;
  else
    v = std::ldexp((float)(m | 0x400u), (int)e - 25);
  return s ? -v : v;
}
inline __half __float2half(float f) {
  // round to nearest even through the value grid
  float a = std::fabs(f);
  uint16_t s = std::signbit(f) ? 0x8000 : 0;
  uint16_t bits;
  if (std::isnan(f)) {
    bits = 0x7e00;
  } else if (a >= 65520.f) {
    bits = 0x7c00;
  } else if (a < std::ldexp(1.f, -14)) {
    bits = (uint16_t)std::nearbyint(std::ldexp(a, 24)); // subnormal, ties to even
  } else {
    int ex;
    std::frexp(a, &ex); // a = f * 2^ex, f in [0.5, 1)
    float q = std::nearbyint(std::ldexp(a, 11 - ex)); // 11 significant bits
    if (q >= 2048.f) {
      q /= 2;
      ex++;
    }
    bits = (uint16_t)(((ex - 1 + 15) << 10) | ((unsigned)q & 0x3ffu));
  }
  return __half{(uint16_t)(s | bits)};
}
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half(a), __float2half(b)}; }

inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((unsigned)b.x << 16); }
inline __nv_bfloat16 __float2bfloat16(float f) {
  unsigned int u = __float_as_uint(f);
  if (std::isnan(f)) return {0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {(uint16_t)(u >> 16)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__float2bfloat16(a), __float2bfloat16(b)};
}

// ------------------------------------------------------------ threads ----
struct EmuCta {
  std::unique_ptr<std::barrier<>> cta;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> xchg; // one 8-byte slot per thread
  std::vector<uint64_t> dyn_smem;
};
inline thread_local EmuCta *emu_cta = nullptr;

inline void *emu_dynamic_smem() { return emu_cta->dyn_smem.data(); }
inline int atomicAdd(int *p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline void __syncthreads() { emu_cta->cta->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  emu_cta->warps[threadIdx.x / 32]->arrive_and_wait();
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int off) {
  static_assert(sizeof(T) <= 8, "shuffle of a large type");
  uint64_t slot = 0;
  std::memcpy(&slot, &v, sizeof(T));
  emu_cta->xchg[threadIdx.x] = slot;
  __syncwarp();
  unsigned lane = threadIdx.x % 32, base = threadIdx.x - lane;
  uint64_t o = emu_cta->xchg[base + (lane ^ (unsigned)off)];
  __syncwarp();
  T r;
  std::memcpy(&r, &o, sizeof(T));
  return r;
}

/// Runs `kernel` over the grid: CTAs one after another, each as real threads.
inline void emu_launch(dim3 grid, dim3 block, const std::function<void()> &kernel,
                       size_t shared_bytes = 0) {
  gridDim = grid;
  blockDim = block;
  unsigned nt = block.x;
  for (unsigned by = 0; by < grid.y; by++)
    for (unsigned bx = 0; bx < grid.x; bx++) {
      EmuCta c;
      c.cta = std::make_unique<std::barrier<>>(nt);
      for (unsigned w = 0; w < (nt + 31) / 32; w++) c.warps.push_back(std::make_unique<std::barrier<>>(32));
      c.xchg.assign(nt, 0);
      c.dyn_smem.assign(shared_bytes / 8 + 1, 0);
      std::vector<std::thread> ts;
      for (unsigned t = 0; t < nt; t++)
        ts.emplace_back([&, t] {
          emu_cta = &c;
          threadIdx = dim3{t, 0, 0};
          blockIdx = dim3{bx, by, 0};
          kernel();
        });
      for (auto &t : ts) t.join();
    }
}

// ---------------------------------------------- mma.sync m16n8k32 e4m3 ----
inline float emu_e4m3(uint8_t b) {
  unsigned e = (b >> 3) & 15u, m = b & 7u;
  float v = e == 0 ? std::ldexp((float)m, -9) : std::ldexp(1.f + m / 8.f, (int)e - 7);
  return (b & 0x80u) ? -v : v;
}
// PTX ISA, mma.m16n8k32 with .e4m3: lane = 4 * groupID + threadID_in_group;
// A: a0 (row g, k 4t..4t+3), a1 (row g+8), a2 (row g, k +16), a3 (row g+8, k +16);
// B: b0 (k 4t..4t+3, column g), b1 (k +16); C/D: c0,c1 (row g, cols 2t, 2t+1), c2,c3 (row g+8).
inline void emu_mma_e4m3(float *d, const unsigned int *a, const unsigned int *b) {
  static thread_local unsigned int mine[6];
  for (int i = 0; i < 4; i++) mine[i] = a[i];
  mine[4] = b[0];
  mine[5] = b[1];
  // publish this lane's registers through per-thread slots (3 rounds of 8 bytes)
  unsigned lane = threadIdx.x % 32, base = threadIdx.x - lane;
  unsigned int regs[32][6];
  for (int round = 0; round < 3; round++) {
    uint64_t v = (uint64_t)mine[2 * round] | ((uint64_t)mine[2 * round + 1] << 32);
    emu_cta->xchg[threadIdx.x] = v;
    __syncwarp();
    for (int l = 0; l < 32; l++) {
      uint64_t o = emu_cta->xchg[base + l];
      regs[l][2 * round] = (unsigned)o;
      regs[l][2 * round + 1] = (unsigned)(o >> 32);
    }
    __syncwarp();
  }
  auto A = [&](int r, int k) {
    int l = (r % 8) * 4 + (k % 16) / 4, reg = (r >= 8 ? 1 : 0) + (k >= 16 ? 2 : 0);
    return emu_e4m3((uint8_t)(regs[l][reg] >> (8 * (k % 4))));
  };
  auto B = [&](int k, int n) {
    int l = n * 4 + (k % 16) / 4, reg = 4 + (k >= 16 ? 1 : 0);
    return emu_e4m3((uint8_t)(regs[l][reg] >> (8 * (k % 4))));
  };
  int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; i++) {
    int r = g + (i >= 2 ? 8 : 0), n = 2 * t + (i % 2);
    float s = 0.f;
    for (int k = 0; k < 32; k++) s += A(r, k) * B(k, n);
    d[i] += s;
  }
}
