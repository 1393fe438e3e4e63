//! Panel packing for the 512-bit FMA tile ([`super::kernel_avx512`]): the
//! strip's 16 weight rows are widened into f32 rows 32 columns at a time
//! (in order, or as the group's even then odd elements, whichever the
//! format widens into more cheaply), then 16 × 16 transposes write the
//! panel `[kk][16]`, each transposed vector to the row of the column it
//! holds. Per weight that is about half the vector instructions of the
//! AVX2 packer (8 × 8 transposes, 8 columns per widening), whose shuffles
//! compete with the tile's FMAs for the same port on Intel cores.

use super::bf16_packed::transpose16;
use super::{KC, NR};
use std::arch::x86_64::*;

/// The f32 row buffer [`pack`] decodes into: 16 rows of [`KC`].
pub(crate) const ROWS_LEN: usize = NR * KC;

/// Panel row of column `c` of a decoded row whose first `even_odd`
/// columns (a multiple of 32) hold each group of 32 as its 16 even then 16
/// odd elements, the rest in order.
#[inline(always)]
fn column_k(c: usize, even_odd: usize) -> usize {
    if c < even_odd {
        let (g, i) = (c / 32 * 32, c % 32);
        g + 2 * (i % 16) + i / 16
    } else {
        c
    }
}

/// Writes `panel[kk * 16 + j]` (`kk < kc`) for the strip's rows `j < ns`
/// (zero for `ns..16`): `decode(j, out)` fills `out[..kc]` with row `j`,
/// its first `even_odd` columns (a multiple of 32) in even/odd order.
///
/// # Safety
/// The CPU has AVX-512F; `kc <= KC`, `even_odd` is a multiple of 32 and at
/// most `kc` (else columns land past the panel), `rows` holds
/// [`ROWS_LEN`] and `panel` `kc * 16`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn pack(
    ns: usize,
    kc: usize,
    even_odd: usize,
    rows: &mut [f32],
    panel: &mut [f32],
    mut decode: impl FnMut(usize, &mut [f32]),
) {
    debug_assert!(kc <= KC && rows.len() >= ROWS_LEN && panel.len() >= kc * NR);
    debug_assert!(even_odd.is_multiple_of(32) && even_odd <= kc);
    for j in 0..NR {
        let out = &mut rows[j * KC..j * KC + kc];
        if j < ns {
            decode(j, out);
        } else {
            out.fill(0.0);
        }
    }
    let (r, p) = (rows.as_ptr(), panel.as_mut_ptr());
    let mut c = 0;
    while c + 16 <= kc {
        let v: [__m512i; 16] =
            std::array::from_fn(|j| _mm512_loadu_si512(r.add(j * KC + c) as *const _));
        for (i, t) in transpose16(v).iter().enumerate() {
            _mm512_storeu_si512(p.add(column_k(c + i, even_odd) * NR) as *mut _, *t);
        }
        c += 16;
    }
    for kk in c..kc {
        for j in 0..NR {
            *p.add(kk * NR + j) = *r.add(j * KC + kk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_places_every_column_in_its_panel_row() {
        if !crate::CpuFeatures::hardware().avx512 {
            return;
        }
        // value = 1000·row + k, so a misplaced element names itself; the
        // decoder lays each group of 32 out as 0, 2, .., 30, 1, 3, .., 31
        let k_at = |c: usize, even_odd: usize| {
            if c >= even_odd {
                c
            } else if c % 32 < 16 {
                c / 32 * 32 + 2 * (c % 32)
            } else {
                c / 32 * 32 + 2 * (c % 32 - 16) + 1
            }
        };
        for (kc, even_odd) in [(256, 256), (256, 0), (200, 192), (45, 32), (7, 0)] {
            let ns = 13;
            let mut rows = vec![0f32; ROWS_LEN];
            let mut panel = vec![-1f32; kc * NR];
            // SAFETY: AVX-512F checked; sizes as `pack` requires.
            unsafe {
                pack(ns, kc, even_odd, &mut rows, &mut panel, |j, out| {
                    for (c, o) in out.iter_mut().enumerate() {
                        *o = (1000 * j + k_at(c, even_odd)) as f32;
                    }
                })
            };
            for kk in 0..kc {
                for j in 0..NR {
                    let want = if j < ns { (1000 * j + kk) as f32 } else { 0.0 };
                    assert_eq!(
                        panel[kk * NR + j],
                        want,
                        "kc {kc} even_odd {even_odd}: k {kk} row {j}"
                    );
                }
            }
        }
    }
}
