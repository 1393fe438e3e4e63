// Runs the kernels of moe_ops.cu, moe_gemm.cu and moe_fp8_mma.cu under the
// host emulation (include/cuda_emu.h) against plain double-precision
// references on small problems that hit their edges: partial row / column /
// k tiles, several blocks per expert, non-local experts (-1 blocks), bias
// and routing weights, FP8 block scales across n- and k-blocks, MXFP4 scales.
// This proves the kernels' indexing on a machine without a GPU; their speed
// and the real hardware's behaviour are for examples/gpu_check.rs.
//
//     bash kernels/emu/run.sh   (tests/cuda_kernels_emulated.rs runs it too)
#include "cuda_emu.h"

#include "../moe_fp8_mma.cu"
#include "../moe_gemm.cu"
#include "../moe_ops.cu"

#include <algorithm>

#include <cstdio>
#include <string>

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t next_u64() {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return rng_state;
}
static float uni(float scale) { return ((next_u64() >> 40) / 16777216.0f - 0.5f) * 2.f * scale; }

static int failures = 0;
static void report(const std::string &what, double err, double tol) {
  bool ok = err <= tol && std::isfinite(err);
  if (!ok) failures++;
  std::printf("%-4s %-44s max rel err %.3e (tol %.0e)\n", ok ? "ok" : "FAIL", what.c_str(), err, tol);
}
static double max_rel(const std::vector<float> &got, const std::vector<double> &want) {
  double mag = 1e-30, err = 0;
  for (double w : want) mag = std::max(mag, std::fabs(w));
  for (size_t i = 0; i < got.size(); i++) err = std::max(err, std::fabs(got[i] - want[i]));
  return err / mag;
}

// moe_align_block_size on the host (src/ops/align.rs layout).
struct Routing {
  std::vector<uint32_t> buf;
  int numel, bs, max_padded, max_blocks, num_local;
};
static Routing align(const std::vector<uint32_t> &ids, int bs, int E, const std::vector<int> &map) {
  Routing r;
  r.numel = (int)ids.size();
  r.bs = bs;
  r.max_padded = r.numel + E * (bs - 1);
  if (r.numel < E) r.max_padded = std::min(r.max_padded, r.numel * bs);
  r.max_blocks = (r.max_padded + bs - 1) / bs;
  r.num_local = 0;
  for (int m : map) r.num_local += m >= 0;
  r.buf.assign(r.max_padded + r.max_blocks + 1 + r.num_local, 0);
  std::vector<int> counts(E, 0), starts(E + 1, 0);
  for (uint32_t id : ids) counts[id]++;
  for (int x = 0; x < E; x++) starts[x + 1] = starts[x] + (counts[x] + bs - 1) / bs * bs;
  for (int i = 0; i < r.max_padded; i++) r.buf[i] = (uint32_t)r.numel;
  for (int b = 0; b < r.max_blocks; b++) r.buf[r.max_padded + b] = NON_LOCAL;
  std::vector<int> pos(starts.begin(), starts.end() - 1);
  for (int i = 0; i < r.numel; i++) r.buf[pos[ids[i]]++] = (uint32_t)i;
  for (int x = 0; x < E; x++)
    for (int b = starts[x] / bs; b < starts[x + 1] / bs; b++)
      r.buf[r.max_padded + b] = map[x] >= 0 ? (uint32_t)map[x] : NON_LOCAL;
  r.buf[r.max_padded + r.max_blocks] = (uint32_t)starts[E];
  for (int x = 0; x < E; x++)
    if (map[x] >= 0) r.buf[r.max_padded + r.max_blocks + 1 + map[x]] = (uint32_t)counts[x];
  return r;
}

// A problem: activations [rows_a, K], routed ids [T, top_k], local weights
// decoded to double [E_local, N, K], bias, routing weights, expert map.
struct Problem {
  int T, top_k, E, N, K;
  std::vector<int> map;
  std::vector<uint32_t> ids;
  std::vector<float> a, bias, topk_w;
  int local() const {
    int l = 0;
    for (int m : map) l += m >= 0;
    return l;
  }
};
static Problem problem(int T, int top_k, int E, int N, int K, bool skew) {
  Problem p{T, top_k, E, N, K, {}, {}, {}, {}, {}};
  int l = 0;
  for (int x = 0; x < E; x++) p.map.push_back(x % 3 == 1 ? -1 : l++); // every third non-local
  for (int i = 0; i < T * top_k; i++)
    p.ids.push_back(skew && i % 2 == 0 ? 0u : (uint32_t)(next_u64() % E));
  for (int i = 0; i < T * K; i++) p.a.push_back(uni(1.f));
  for (int i = 0; i < l * N; i++) p.bias.push_back(uni(0.5f));
  for (int i = 0; i < T * top_k; i++) p.topk_w.push_back(uni(1.f));
  return p;
}

// out[s, n] for rows of local experts: (a[s / top_k] . w[e, n] + bias) * topk_w
static std::vector<double> reference(const Problem &p, const std::vector<double> &w,
                                     const std::vector<float> &a) {
  std::vector<double> out((size_t)p.T * p.top_k * p.N, 0.0);
  for (int s = 0; s < p.T * p.top_k; s++) {
    int e = p.map[p.ids[s]];
    if (e < 0) continue;
    for (int n = 0; n < p.N; n++) {
      double acc = 0;
      for (int k = 0; k < p.K; k++)
        acc += (double)a[(size_t)(s / p.top_k) * p.K + k] * w[((size_t)e * p.N + n) * p.K + k];
      out[(size_t)s * p.N + n] = (acc + p.bias[(size_t)e * p.N + n]) * p.topk_w[s];
    }
  }
  return out;
}

// Weights of each format: raw storage + scales + decoded values.
struct Weights {
  std::vector<uint8_t> raw;
  std::vector<float> fscales;
  std::vector<uint8_t> bscales;
  std::vector<double> dec;
  int bn = 1, bk = 1;
};
static Weights make_weights(const std::string &fmt, int E, int N, int K, int bn, int bk) {
  Weights w;
  size_t cnt = (size_t)E * N * K;
  w.dec.resize(cnt);
  if (fmt == "f32" || fmt == "bf16" || fmt == "f16") {
    size_t es = fmt == "f32" ? 4 : 2;
    w.raw.resize(cnt * es);
    for (size_t i = 0; i < cnt; i++) {
      float v = uni(0.1f);
      if (fmt == "f32") {
        std::memcpy(&w.raw[i * 4], &v, 4);
        w.dec[i] = v;
      } else if (fmt == "bf16") {
        __nv_bfloat16 b = __float2bfloat16(v);
        std::memcpy(&w.raw[i * 2], &b, 2);
        w.dec[i] = __bfloat162float(b);
      } else {
        __half h = __float2half(v);
        std::memcpy(&w.raw[i * 2], &h, 2);
        w.dec[i] = __half2float(h);
      }
    }
  } else if (fmt == "fp8") {
    w.bn = bn;
    w.bk = bk;
    int nb = (N + bn - 1) / bn, kb = (K + bk - 1) / bk;
    for (int i = 0; i < E * nb * kb; i++) w.fscales.push_back(0.001f + std::fabs(uni(0.01f)));
    w.raw.resize(cnt);
    for (size_t i = 0; i < cnt; i++) {
      uint8_t b;
      do b = (uint8_t)next_u64(); while ((b & 0x7f) == 0x7f); // no NaN
      w.raw[i] = b;
      size_t e = i / ((size_t)N * K);
      int n = (int)(i / K % N), k = (int)(i % K);
      w.dec[i] = emu_e4m3(b) * (double)w.fscales[(e * nb + n / bn) * kb + k / bk];
    }
  } else { // mxfp4
    w.raw.resize(cnt / 2);
    for (auto &b : w.raw) b = (uint8_t)next_u64();
    for (size_t i = 0; i < cnt / 32; i++) w.bscales.push_back((uint8_t)(118 + next_u64() % 8));
    static const float e2m1[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
    for (size_t i = 0; i < cnt; i++) {
      uint8_t nib = (i % 2) ? (w.raw[i / 2] >> 4) : (w.raw[i / 2] & 15);
      double v = e2m1[nib & 7] * std::ldexp(1.0, (int)w.bscales[i / 32] - 127);
      w.dec[i] = (nib & 8) ? -v : v;
    }
  }
  return w;
}

// local-expert slice of the weights (experts are generated for local ids)
static const void *scales_of(const Weights &w) {
  return w.fscales.empty() ? (const void *)w.bscales.data() : (const void *)w.fscales.data();
}

static void check_gemv(const std::string &fmt) {
  Problem p = problem(12, 3, 6, 40, 320, true); // full 16-row blocks too
  int L = p.local();
  Weights w = make_weights(fmt, L, p.N, p.K, 32, 64);
  Routing r = align(p.ids, 16, p.E, p.map);
  std::vector<float> out((size_t)r.numel * p.N, 0.f);
  int blocks = std::min(r.max_blocks, r.numel);
  emu_launch(dim3{(unsigned)blocks, (unsigned)((p.N + 15) / 16), 1}, dim3{256, 1, 1}, [&] {
    auto f = fmt == "f32"    ? moe_gemv_f32
             : fmt == "bf16" ? moe_gemv_bf16
             : fmt == "f16"  ? moe_gemv_f16
             : fmt == "fp8"  ? moe_gemv_fp8
                             : moe_gemv_mxfp4;
    f(p.a.data(), w.raw.data(), scales_of(w), r.buf.data(), p.bias.data(), 1, p.topk_w.data(),
      1, out.data(), p.N, p.K, p.top_k, r.numel, 16, r.max_padded, r.max_blocks, L, w.bn, w.bk);
  });
  report("gemv " + fmt, max_rel(out, reference(p, w.dec, p.a)), 1e-5);
}

static void check_tc64(const std::string &fmt) {
  Problem p = problem(60, 2, 6, 160, 320, true); // expert 0 gets > 64 rows
  int L = p.local();
  Weights w = make_weights(fmt, L, p.N, p.K, 32, 64);
  Routing r = align(p.ids, 64, p.E, p.map);
  std::vector<float> out((size_t)r.numel * p.N, 0.f);
  int blocks = std::min(r.max_blocks, r.numel);
  emu_launch(dim3{(unsigned)blocks, (unsigned)((p.N + 127) / 128), 1}, dim3{256, 1, 1}, [&] {
    auto f = fmt == "bf16"  ? moe_gemm_tc64_bf16
             : fmt == "f16" ? moe_gemm_tc64_f16
             : fmt == "fp8" ? moe_gemm_tc64_fp8
                            : moe_gemm_tc64_mxfp4;
    f(p.a.data(), w.raw.data(), scales_of(w), r.buf.data(), p.bias.data(), 1, p.topk_w.data(),
      1, out.data(), p.N, p.K, p.top_k, r.numel, 64, r.max_padded, r.max_blocks, L, w.bn, w.bk);
  });
  // the kernel computes with activations rounded to 16 bits
  std::vector<float> ar(p.a);
  for (float &v : ar)
    v = fmt == "f16" ? __half2float(__float2half(v)) : __bfloat162float(__float2bfloat16(v));
  report("tc64 " + fmt, max_rel(out, reference(p, w.dec, ar)), 1e-5);
}

static void check_fp8_mma(int bs) {
  Problem p = problem(bs == 16 ? 20 : 60, 2, 6, 96, 320, true);
  int L = p.local(), K = p.K, group = 64;
  Weights w = make_weights("fp8", L, p.N, K, 32, group);
  int groups = (K + group - 1) / group;
  std::vector<uint8_t> q((size_t)p.T * K);
  std::vector<float> qs((size_t)p.T * groups);
  int items = p.T * groups;
  emu_launch(dim3{(unsigned)((items + 7) / 8), 1, 1}, dim3{256, 1, 1}, [&] {
    moe_fp8_group_quant_bytes_f32(p.a.data(), q.data(), qs.data(), p.T, K, group);
  });
  // the quantization itself, against its definition
  double qerr = 0;
  for (int t = 0; t < p.T; t++)
    for (int g = 0; g < groups; g++) {
      float amax = 0;
      for (int k = g * group; k < std::min(K, (g + 1) * group); k++)
        amax = std::max(amax, std::fabs(p.a[(size_t)t * K + k]));
      float s = std::max(amax, 1e-10f) / 448.f;
      qerr = std::max(qerr, (double)std::fabs(qs[(size_t)t * groups + g] - s));
      for (int k = g * group; k < std::min(K, (g + 1) * group); k++) {
        float x = p.a[(size_t)t * K + k] / s;
        float got = emu_e4m3(q[(size_t)t * K + k]);
        // nearest on the e4m3 grid (ties to even mantissa)
        float best = 0;
        for (int b = 0; b < 256; b++) {
          if ((b & 0x7f) == 0x7f) continue;
          float v = emu_e4m3((uint8_t)b), d = std::fabs(v - x), bd = std::fabs(best - x);
          if (d < bd || (d == bd && (b & 1) == 0)) best = v;
        }
        qerr = std::max(qerr, (double)std::fabs(got - best));
      }
    }
  report("fp8 group quant bytes (exact)", qerr, 0.0);
  // the GEMM over the quantized activations: exact products, f32 sums
  std::vector<float> adq((size_t)p.T * K);
  for (size_t i = 0; i < adq.size(); i++)
    adq[i] = emu_e4m3(q[i]) * qs[(i / K) * groups + (i % K) / group];
  Routing r = align(p.ids, bs, p.E, p.map);
  std::vector<float> out((size_t)r.numel * p.N, 0.f);
  int blocks = std::min(r.max_blocks, r.numel);
  emu_launch(dim3{(unsigned)blocks, (unsigned)((p.N + 63) / 64), 1}, dim3{128, 1, 1}, [&] {
    auto f = bs == 16 ? moe_gemm_fp8_mma_m16 : moe_gemm_fp8_mma_m64;
    f(q.data(), qs.data(), w.raw.data(), w.fscales.data(), r.buf.data(), p.bias.data(), 1,
      p.topk_w.data(), 1, out.data(), p.N, K, p.top_k, r.numel, r.max_padded, r.max_blocks, L,
      w.bn, w.bk);
  });
  report("fp8 mma block " + std::to_string(bs), max_rel(out, reference(p, w.dec, adq)), 1e-5);
}

// ------------------------------------------------------------ moe_ops.cu ----

static void check_topk(bool sigmoid) {
  const int T = 9, E = 64, K = 6, G = sigmoid ? 8 : 1, TG = sigmoid ? 3 : 1;
  std::vector<float> logits(T * E), bias(E);
  for (auto &v : logits) v = uni(3.f);
  for (auto &v : bias) v = uni(0.1f);
  std::vector<uint32_t> ids(T * K, 99);
  const int warps = 4;
  emu_launch(dim3{(T + warps - 1) / warps, 1, 1}, dim3{32 * warps, 1, 1}, [&] {
    moe_topk_select_f32(logits.data(), bias.data(), sigmoid, ids.data(), T, E, K, sigmoid, G, TG);
  }, warps * (E + G) * 4);
  std::vector<float> w(T * K);
  emu_launch(dim3{(T + 3) / 4, 1, 1}, dim3{128, 1, 1}, [&] {
    moe_router_weights_f32(logits.data(), ids.data(), w.data(), T, E, K, sigmoid, 1, 2.5f);
  });
  int bad = 0;
  double werr = 0;
  for (int t = 0; t < T; t++) {
    const float *l = &logits[t * E];
    std::vector<double> p(E);
    double mx = *std::max_element(l, l + E), sum = 0;
    for (int j = 0; j < E; j++) sum += std::exp(l[j] - mx);
    for (int j = 0; j < E; j++)
      p[j] = sigmoid ? 1.0 / (1.0 + std::exp(-(double)l[j])) : std::exp(l[j] - mx) / sum;
    std::vector<double> sel(E);
    for (int j = 0; j < E; j++) sel[j] = p[j] + (sigmoid ? bias[j] : 0.0);
    if (G > 1) {
      int per = E / G;
      std::vector<std::pair<double, int>> gs;
      for (int g = 0; g < G; g++) {
        std::vector<double> c(sel.begin() + g * per, sel.begin() + (g + 1) * per);
        std::sort(c.rbegin(), c.rend());
        gs.push_back({-(c[0] + c[1]), g}); // with a bias: sum of the best two
      }
      std::sort(gs.begin(), gs.end());
      for (int r = TG; r < G; r++)
        for (int j = 0; j < per; j++) sel[gs[r].second * per + j] = -INFINITY;
    }
    std::vector<int> order(E);
    for (int j = 0; j < E; j++) order[j] = j;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return sel[a] > sel[b]; });
    double tot = 0;
    for (int r = 0; r < K; r++) tot += p[order[r]];
    for (int r = 0; r < K; r++) {
      bad += ids[t * K + r] != (uint32_t)order[r];
      werr = std::max(werr, std::fabs(w[t * K + r] - p[order[r]] / tot * 2.5));
    }
  }
  report(std::string("topk select ") + (sigmoid ? "sigmoid grouped+bias" : "softmax"), bad, 0);
  report(std::string("router weights ") + (sigmoid ? "sigmoid" : "softmax"), werr, 1e-6);
}

static void check_align(bool with_map) {
  Problem p = problem(15, 3, 10, 8, 8, true);
  if (!with_map)
    for (int x = 0; x < p.E; x++) p.map[x] = x;
  Routing want = align(p.ids, 16, p.E, p.map);
  std::vector<uint32_t> got(want.buf.size(), 7);
  emu_launch(dim3{1, 1, 1}, dim3{1024, 1, 1}, [&] {
    moe_align(p.ids.data(), p.map.data(), with_map, got.data(), want.numel, 16, p.E,
              want.num_local, want.max_padded, want.max_blocks);
  }, (3 * p.E + 1) * 4);
  // rows inside one expert's run may come in any order: compare each run sorted
  int bad = 0;
  size_t tail = want.max_padded;
  for (size_t i = tail; i < want.buf.size(); i++) bad += got[i] != want.buf[i];
  int blocks = (int)want.buf[want.max_padded + want.max_blocks] / 16;
  for (int b0 = 0; b0 < blocks;) {
    int b1 = b0;
    while (b1 < blocks && want.buf[tail + b1] == want.buf[tail + b0]) b1++;
    std::vector<uint32_t> g(got.begin() + b0 * 16, got.begin() + b1 * 16),
        w(want.buf.begin() + b0 * 16, want.buf.begin() + b1 * 16);
    std::sort(g.begin(), g.end());
    std::sort(w.begin(), w.end());
    bad += g != w;
    b0 = b1;
  }
  for (int i = blocks * 16; i < want.max_padded; i++) bad += got[i] != want.buf[i];
  report(std::string("align ") + (with_map ? "with expert map" : "no map"), bad, 0);
}

static void check_simt(const std::string &fmt, int bs) {
  Problem p = problem(bs == 16 ? 12 : 60, bs == 16 ? 3 : 2, 6, 72, 320, true);
  int L = p.local();
  Weights w = make_weights(fmt, L, p.N, p.K, 32, 64);
  Routing r = align(p.ids, bs, p.E, p.map);
  std::vector<float> out((size_t)r.numel * p.N, 0.f);
  int blocks = std::min(r.max_blocks, r.numel);
  emu_launch(dim3{(unsigned)blocks, (unsigned)((p.N + 63) / 64), 1}, dim3{256, 1, 1}, [&] {
    auto f = fmt == "f32"    ? moe_gemm_f32_f32
             : fmt == "bf16" ? moe_gemm_f32_bf16
             : fmt == "f16"  ? moe_gemm_f32_f16
             : fmt == "fp8"  ? moe_gemm_f32_fp8
                             : moe_gemm_f32_mxfp4;
    f(p.a.data(), w.raw.data(), scales_of(w), r.buf.data(), p.bias.data(), 1, p.topk_w.data(), 1,
      out.data(), p.N, p.K, p.top_k, r.numel, bs, r.max_padded, r.max_blocks, L, w.bn, w.bk);
  });
  report("simt " + fmt + " block " + std::to_string(bs), max_rel(out, reference(p, w.dec, p.a)),
         1e-5);
}

static void check_wmma16(const std::string &fmt) {
  Problem p = problem(12, 3, 6, 72, 200, true);
  int L = p.local();
  Weights w = make_weights(fmt, L, p.N, p.K, 1, 1);
  Routing r = align(p.ids, 16, p.E, p.map);
  std::vector<float> out((size_t)r.numel * p.N, 0.f);
  int blocks = std::min(r.max_blocks, r.numel);
  emu_launch(dim3{(unsigned)blocks, (unsigned)((p.N + 63) / 64), 1}, dim3{128, 1, 1}, [&] {
    if (fmt == "bf16")
      moe_gemm_wmma_bf16(p.a.data(), (const __nv_bfloat16 *)w.raw.data(), r.buf.data(),
                         p.bias.data(), 1, p.topk_w.data(), 1, out.data(), p.N, p.K, p.top_k,
                         r.numel, r.max_padded, r.max_blocks, L);
    else
      moe_gemm_wmma_f16(p.a.data(), (const __half *)w.raw.data(), r.buf.data(), p.bias.data(),
                        1, p.topk_w.data(), 1, out.data(), p.N, p.K, p.top_k, r.numel,
                        r.max_padded, r.max_blocks, L);
  });
  std::vector<float> ar(p.a);
  for (float &v : ar)
    v = fmt == "f16" ? __half2float(__float2half(v)) : __bfloat162float(__float2bfloat16(v));
  report("wmma16 " + fmt, max_rel(out, reference(p, w.dec, ar)), 1e-5);
}

static void check_elementwise() {
  const int rows = 7, inter = 37, tokens = 5, k = 3, h = 19;
  std::vector<float> x(rows * 2 * inter), y(rows * inter);
  for (auto &v : x) v = uni(4.f);
  for (int act = 0; act < 3; act++) {
    emu_launch(dim3{2, 1, 1}, dim3{64, 1, 1},
               [&] { moe_act_and_mul_f32(x.data(), y.data(), rows, inter, act); });
    double err = 0;
    for (int r = 0; r < rows; r++)
      for (int j = 0; j < inter; j++) {
        double g = x[r * 2 * inter + j], u = x[r * 2 * inter + inter + j];
        double a = act == 0   ? g / (1 + std::exp(-g))
                   : act == 1 ? 0.5 * g * (1 + std::erf(g / std::sqrt(2.0)))
                              : 0.5 * g * (1 + std::tanh(std::sqrt(2 / M_PI) * (g + 0.044715 * g * g * g)));
        err = std::max(err, std::fabs(y[r * inter + j] - a * u) / (1 + std::fabs(a * u)));
      }
    report("act_and_mul act " + std::to_string(act), err, 1e-5);
  }
  std::vector<float> in(tokens * k * h), w(tokens * k), out(tokens * h);
  for (auto &v : in) v = uni(1.f);
  for (auto &v : w) v = uni(1.f);
  for (int has_w = 0; has_w < 2; has_w++) {
    emu_launch(dim3{1, 1, 1}, dim3{64, 1, 1},
               [&] { moe_weighted_sum_f32(in.data(), w.data(), has_w, out.data(), tokens, k, h); });
    double err = 0;
    for (int t = 0; t < tokens; t++)
      for (int c = 0; c < h; c++) {
        double s = 0;
        for (int j = 0; j < k; j++) s += (has_w ? w[t * k + j] : 1.0) * in[(t * k + j) * h + c];
        err = std::max(err, std::fabs(out[t * h + c] - s));
      }
    report(std::string("weighted sum") + (has_w ? " with weights" : ""), err, 1e-6);
  }
  // quantize-dequantize equals the byte kernel's values times their scales
  const int r2 = 6, cols = 200, group = 64, groups = (cols + group - 1) / group;
  std::vector<float> a(r2 * cols), dq(r2 * cols), qs(r2 * groups);
  std::vector<uint8_t> q(r2 * cols);
  for (auto &v : a) v = uni(5.f);
  emu_launch(dim3{(r2 * groups + 7) / 8, 1, 1}, dim3{256, 1, 1},
             [&] { moe_fp8_group_quant_f32(a.data(), dq.data(), r2, cols, group); });
  emu_launch(dim3{(r2 * groups + 7) / 8, 1, 1}, dim3{256, 1, 1}, [&] {
    moe_fp8_group_quant_bytes_f32(a.data(), q.data(), qs.data(), r2, cols, group);
  });
  double err = 0;
  for (int i = 0; i < r2 * cols; i++)
    err = std::max(err, (double)std::fabs(dq[i] - emu_e4m3(q[i]) * qs[(i / cols) * groups + (i % cols) / group]));
  report("fp8 quant-dequant == bytes * scale", err, 0);
}

int main() {
  // e4m3 bytes survive decode -> encode
  int bad = 0;
  for (int b = 0; b < 256; b++)
    if ((b & 0x7f) != 0x7f && f_to_e4m3(emu_e4m3((uint8_t)b)) != b) bad++;
  report("e4m3 encode(decode(b)) == b", bad, 0);
  for (const char *f : {"f32", "bf16", "f16", "fp8", "mxfp4"}) check_gemv(f);
  for (const char *f : {"bf16", "f16", "fp8", "mxfp4"}) check_tc64(f);
  check_fp8_mma(16);
  check_fp8_mma(64);
  check_topk(false);
  check_topk(true);
  check_align(true);
  check_align(false);
  for (const char *f : {"f32", "bf16", "f16", "fp8", "mxfp4"})
    for (int bs : {16, 64}) check_simt(f, bs);
  for (const char *f : {"bf16", "f16"}) check_wmma16(f);
  check_elementwise();
  std::printf("%d failed\n", failures);
  return failures ? 1 : 0;
}
