//! The decode sweep the f32-FMA kernels share (bf16 in [`super::bf16_fma`],
//! MXFP4 and FP8 in `quant/avx512.rs`): a tile's activation rows laid out
//! per group of 32 along K, and the walk over its weight rows in register
//! blocks and K chunks.
//!
//! A sweep keeps one sum per (row, weight row) in registers. Register
//! blocks are sized so the sums, each block row's widened weight vectors
//! (one group's pair, or two groups' for FP8) and one activation pair fit
//! the 32 zmm registers; loops run
//! activation row outside, weight row inside, so each activation vector is
//! loaded once per group.

use super::bf16_avx512::mask16;
use std::arch::x86_64::*;

/// A sweep's activation rows interleaved by group: for group `g` of 32
/// along K and row `m`, a pair of vectors at `(g * rows + m) * 2`, the tail
/// past K zero. One pointer walks all rows. The pair is the group's 16
/// even then 16 odd elements: the order in which a shift and a mask widen
/// 32 bf16, the low and high nibbles of 16 MXFP4 bytes, or the two bytes
/// of 16-bit lanes of FP8.
pub(crate) struct SweepRows {
    v: Scratch,
    rows: usize,
}

/// A vector buffer from a per-thread pool, returned to it on drop: a
/// decode GEMV runs one sweep per column tile (over a thousand for an
/// `lm_head`), and allocating and zeroing its rows and sums each time
/// showed as ~2–3 % of a decode step.
struct Scratch(Vec<__m512>);

thread_local! {
    static POOL: std::cell::RefCell<Vec<Vec<__m512>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Scratch {
    /// `len` vectors of unspecified (stale) values: callers write each
    /// before reading it.
    fn stale(len: usize) -> Self {
        let mut v = POOL.with_borrow_mut(|p| p.pop()).unwrap_or_default();
        if v.len() < len {
            // SAFETY: __m512 is plain data: all zero bits are a valid value
            v.resize(len, unsafe { std::mem::zeroed() });
        }
        v.truncate(len);
        Scratch(v)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        // a few buffers per thread at most (rows and sums of one sweep);
        // during the thread's teardown the buffer is simply freed
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < 4 {
                p.push(v)
            }
        });
    }
}

impl SweepRows {
    /// The `k` f32 at each of `a` (at most [`MAX_ROWS`]), in even/odd
    /// order.
    ///
    /// # Safety
    /// Every `a` pointer addresses `k` readable f32; the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn new(a: &[*const f32], k: usize) -> Self {
        debug_assert!(a.len() <= MAX_ROWS);
        let i0 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let i1 = _mm512_add_epi32(i0, _mm512_set1_epi32(1));
        let (groups, rows) = (k.div_ceil(32), a.len());
        // every vector is written below
        let mut s = Scratch::stale(groups * rows * 2);
        let v = &mut s.0;
        for (m, &a) in a.iter().enumerate() {
            for g in 0..groups {
                let c = 32 * g;
                let x0 = _mm512_maskz_loadu_ps(mask16(k - c), a.add(c));
                // wrapping: past the row's end the mask loads nothing
                let x1 =
                    _mm512_maskz_loadu_ps(mask16(k.saturating_sub(c + 16)), a.wrapping_add(c + 16));
                v[(g * rows + m) * 2] = _mm512_permutex2var_ps(x0, i0, x1);
                v[(g * rows + m) * 2 + 1] = _mm512_permutex2var_ps(x0, i1, x1);
            }
        }
        Self { v: s, rows }
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }
}

/// Rows of one sweep at most.
pub(crate) const MAX_ROWS: usize = 11;

/// `n` rows split into sweeps of equal size (at most [`MAX_ROWS`] each):
/// the size of each.
pub(crate) fn sweep_rows(n: usize) -> usize {
    n.div_ceil(n.div_ceil(MAX_ROWS).max(1)).max(1)
}

/// A decode kernel over [`SweepRows`]: `block` adds groups `g0..g1` of
/// weight rows `n..n + NW` times the `M` rows at `a` (as [`SweepRows`]
/// lays them out) into the partial sums `sums[j * M + m]`, and stores them
/// back. The first K chunk (`g0 == 0`) starts from zero, not from `sums`
/// (stale then): implementations read them through [`load_sums`].
pub(crate) trait SweepBlock {
    /// Whether `block` widens two groups at a time (four vectors per
    /// weight row live at once): register blocks then take fewer weight
    /// rows, and K chunks are whole multiples of 4 groups (pairs and
    /// 128-column scale blocks do not straddle them).
    const PAIRS: bool = false;
    /// Groups of 32 along K (the last one may be partial).
    fn groups(&self) -> usize;
    /// # Safety
    /// `a` holds `groups() * M * 2` vectors, `sums` `NW * M`; rows
    /// `n..n + NW` exist; the CPU has the kernel's features (the body is
    /// inlined into a caller that enables them).
    unsafe fn block<const M: usize, const NW: usize>(
        &self,
        a: *const __m512,
        n: usize,
        g: (usize, usize),
        sums: *mut __m512,
    );
}

/// A block's partial sums `acc[m][j]` from `sums[j * M + m]`, or zeros
/// for the first K chunk (`g0 == 0`: the buffer holds stale values then).
///
/// # Safety
/// `sums` holds `NW * M` vectors.
#[inline(always)]
pub(crate) unsafe fn load_sums<const M: usize, const NW: usize>(
    sums: *const __m512,
    g0: usize,
) -> [[__m512; NW]; M] {
    if g0 == 0 {
        return [[_mm512_setzero_ps(); NW]; M];
    }
    std::array::from_fn(|m| std::array::from_fn(|j| *sums.add(j * M + m)))
}

/// The inverse of [`load_sums`].
///
/// # Safety
/// As [`load_sums`], writable.
#[inline(always)]
pub(crate) unsafe fn store_sums<const M: usize, const NW: usize>(
    acc: &[[__m512; NW]; M],
    sums: *mut __m512,
) {
    for (m, acc) in acc.iter().enumerate() {
        for (j, v) in acc.iter().enumerate() {
            *sums.add(j * M + m) = *v;
        }
    }
}

/// One group: `acc[m][j] += w[j].0 · pair(m).0 + w[j].1 · pair(m).1`, the
/// activation pairs at `ag` (the group's `M` rows as [`SweepRows`] lays
/// them out), each loaded once.
///
/// # Safety
/// `ag` holds `2 * M` vectors; the CPU has AVX-512F.
#[inline(always)]
pub(crate) unsafe fn fma_group<const M: usize, const NW: usize>(
    acc: &mut [[__m512; NW]; M],
    ag: *const __m512,
    w: &[(__m512, __m512); NW],
) {
    for (m, acc) in acc.iter_mut().enumerate() {
        let (x0, x1) = (*ag.add(2 * m), *ag.add(2 * m + 1));
        for (acc, w) in acc.iter_mut().zip(w) {
            *acc = _mm512_fmadd_ps(w.0, x0, *acc);
            *acc = _mm512_fmadd_ps(w.1, x1, *acc);
        }
    }
}

/// Activation bytes one K chunk of a sweep may hold, so they stay in L1
/// while the chunk meets every weight row of the tile (past that, sweeps
/// of 7–11 rows read their activations from L2 once per block of weight
/// rows: bench_linear bf16 1408×2048, 12 rows 0.63×, 23 rows 0.77–0.88× the
/// time with chunks).
const CHUNK_BYTES: usize = 32 << 10;

/// Runs `kern` over the tile's output columns `n0..n1` for the rows of
/// `rows`, writing `c[m][..n1 - n0]`.
///
/// # Safety
/// Every `c[m]` for `m < rows.rows()` addresses `n1 - n0` writable f32;
/// `rows` has `kern.groups()` groups; the CPU has AVX-512F and the
/// kernel's features.
#[inline(always)]
pub(crate) unsafe fn sweep<K: SweepBlock>(
    kern: &K,
    rows: &SweepRows,
    cols: (usize, usize),
    c: &[*mut f32],
) {
    debug_assert!(c.len() >= rows.rows);
    if K::PAIRS {
        // sums, four widened vectors per weight row, the activations and
        // the scales within the 32 zmm (11 rows × 2 with scaled weights
        // exceed them by a few; such sweeps still measured 0.24–0.30× the
        // time of run 11's FP8 sweep, BENCHMARKS.md run 12)
        return match rows.rows {
            0 => {}
            1 => chunked::<K, 1, 4>(kern, rows, cols, c),
            2 => chunked::<K, 2, 3>(kern, rows, cols, c),
            3 => chunked::<K, 3, 3>(kern, rows, cols, c),
            4 => chunked::<K, 4, 3>(kern, rows, cols, c),
            5 => chunked::<K, 5, 2>(kern, rows, cols, c),
            6 => chunked::<K, 6, 2>(kern, rows, cols, c),
            7 => chunked::<K, 7, 2>(kern, rows, cols, c),
            8 => chunked::<K, 8, 2>(kern, rows, cols, c),
            9 => chunked::<K, 9, 2>(kern, rows, cols, c),
            10 => chunked::<K, 10, 2>(kern, rows, cols, c),
            _ => chunked::<K, 11, 2>(kern, rows, cols, c),
        };
    }
    match rows.rows {
        0 => {}
        1 => chunked::<K, 1, 8>(kern, rows, cols, c),
        2 => chunked::<K, 2, 6>(kern, rows, cols, c),
        3 => chunked::<K, 3, 5>(kern, rows, cols, c),
        4 => chunked::<K, 4, 4>(kern, rows, cols, c),
        5 => chunked::<K, 5, 4>(kern, rows, cols, c),
        6 => chunked::<K, 6, 3>(kern, rows, cols, c),
        7 => chunked::<K, 7, 2>(kern, rows, cols, c),
        8 => chunked::<K, 8, 2>(kern, rows, cols, c),
        9 => chunked::<K, 9, 2>(kern, rows, cols, c),
        10 => chunked::<K, 10, 2>(kern, rows, cols, c),
        _ => chunked::<K, 11, 2>(kern, rows, cols, c),
    }
}

/// K chunks of at most [`CHUNK_BYTES`] of activations; in each, the weight
/// rows `NW` at a time, then one at a time. The partial sums (one zmm per
/// output) live in memory between chunks and are reduced into `c` at the
/// end.
#[inline(always)]
unsafe fn chunked<K: SweepBlock, const M: usize, const NW: usize>(
    kern: &K,
    rows: &SweepRows,
    (n0, n1): (usize, usize),
    c: &[*mut f32],
) {
    let groups = kern.groups();
    debug_assert_eq!(rows.v.0.len(), groups * M * 2);
    let a = rows.v.0.as_ptr();
    // the first chunk's blocks start from zero (load_sums), not from these
    let mut sums = Scratch::stale((n1 - n0) * M);
    let sums = &mut sums.0;
    let mut chunk = (CHUNK_BYTES / (M * 128)).max(1);
    if K::PAIRS {
        chunk = (chunk / 4 * 4).max(4);
    }
    if groups == 0 {
        // K = 0: no chunk zeroes the sums
        sums.iter_mut().for_each(|v| *v = _mm512_setzero_ps());
    }
    let mut g0 = 0;
    while g0 < groups {
        let g1 = (g0 + chunk).min(groups);
        let mut n = n0;
        while n < n1 {
            let s = sums.as_mut_ptr().add((n - n0) * M);
            if n + NW <= n1 {
                kern.block::<M, NW>(a, n, (g0, g1), s);
                n += NW;
            } else {
                kern.block::<M, 1>(a, n, (g0, g1), s);
                n += 1;
            }
        }
        g0 = g1;
    }
    for (col, s) in sums.chunks_exact(M).enumerate() {
        for (c, v) in c.iter().zip(s) {
            *c.add(col) = _mm512_reduce_add_ps(*v);
        }
    }
}
