// WMMA emulation (see cuda_emu.h): every lane holds the whole 16x16 tile, so
// loads, stores and mma are per lane; elementwise fragment ops stay valid.
#pragma once
#include "cuda_emu.h"
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
  static constexpr int num_elements = 256;
  float x[256]; // row-major 16x16
};
inline float emu_to_f(float v) { return v; }
inline float emu_to_f(__half v) { return __half2float(v); }
inline float emu_to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename Use, typename T, typename L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L> &f, const T *p, unsigned ldm) {
  for (int r = 0; r < 16; r++)
    for (int c = 0; c < 16; c++)
      f.x[r * 16 + c] = std::is_same<L, row_major>::value ? emu_to_f(p[r * ldm + c])
                                                          : emu_to_f(p[c * ldm + r]);
}
template <typename T>
inline void fill_fragment(fragment<accumulator, 16, 16, 16, T> &f, T v) {
  for (float &x : f.x) x = v;
}
template <typename TA, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float> &d,
                     const fragment<matrix_a, 16, 16, 16, TA, LA> &a,
                     const fragment<matrix_b, 16, 16, 16, TA, LB> &b,
                     const fragment<accumulator, 16, 16, 16, float> &c) {
  float o[256];
  for (int r = 0; r < 16; r++)
    for (int n = 0; n < 16; n++) {
      float s = c.x[r * 16 + n];
      for (int k = 0; k < 16; k++) s += a.x[r * 16 + k] * b.x[k * 16 + n];
      o[r * 16 + n] = s;
    }
  std::memcpy(d.x, o, sizeof o);
}
inline void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, float> &f,
                              unsigned ldm, layout_t l) {
  for (int r = 0; r < 16; r++)
    for (int c = 0; c < 16; c++)
      (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * 16 + c];
}
} // namespace wmma
} // namespace nvcuda
