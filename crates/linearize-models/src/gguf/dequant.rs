//! Decoding ggml blocks to f32, bit-exact with ggml's reference `dequantize_row_*` (ggml-quants.c)
//! and gguf-py's numpy port: the same products in the same order, each rounded once.
use super::ggml_type::{GgmlType, DEQUANTIZABLE};
use anyhow::{bail, Result};
use half::{bf16, f16};

/// Decodes `data` (whole blocks of `ty`) into `out`, which must hold exactly the decoded values.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    let (block, size) = (ty.block_size(), ty.type_size());
    if data.len() % size != 0 || data.len() / size * block != out.len() {
        bail!(
            "{} bytes of {ty} do not decode to {} values ({block} values per {size}-byte block)",
            data.len(),
            out.len()
        );
    }
    match ty {
        GgmlType::F32 => blocks::<4, 1>(data, out, |b, y| y[0] = f32::from_le_bytes(*b)),
        GgmlType::F16 => blocks::<2, 1>(data, out, |b, y| y[0] = half_at(b, 0)),
        GgmlType::BF16 => blocks::<2, 1>(data, out, |b, y| {
            y[0] = bf16::from_bits(u16::from_le_bytes(*b)).to_f32()
        }),
        GgmlType::Q8_0 => blocks::<34, 32>(data, out, q8_0),
        GgmlType::Q4_0 => blocks::<18, 32>(data, out, q4_0),
        GgmlType::Q4_1 => blocks::<20, 32>(data, out, q4_1),
        GgmlType::Q5_0 => blocks::<22, 32>(data, out, q5_0),
        GgmlType::Q5_1 => blocks::<24, 32>(data, out, q5_1),
        GgmlType::Q4_K => blocks::<144, 256>(data, out, q4_k),
        GgmlType::Q5_K => blocks::<176, 256>(data, out, q5_k),
        GgmlType::Q6_K => blocks::<210, 256>(data, out, q6_k),
        other => bail!(
            "tensor type {other} cannot be decoded (supported: {})",
            DEQUANTIZABLE
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
    Ok(())
}

/// Runs `decode` over each `B`-byte block and its `N` outputs; fixed sizes let the compiler
/// drop bounds checks and vectorise the inner loops.
fn blocks<const B: usize, const N: usize>(
    data: &[u8],
    out: &mut [f32],
    decode: impl Fn(&[u8; B], &mut [f32; N]),
) {
    for (block, y) in data.chunks_exact(B).zip(out.chunks_exact_mut(N)) {
        decode(
            block.try_into().expect("chunk of B bytes"),
            y.try_into().expect("chunk of N"),
        );
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

fn q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = half_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..]) {
        *y = (q as i8) as f32 * d;
    }
}

fn q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = half_at(b, 0);
    let (lo, hi) = y.split_at_mut(16);
    for (j, &q) in b[2..].iter().enumerate() {
        lo[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        hi[j] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let (lo, hi) = y.split_at_mut(16);
    for (j, &q) in b[4..].iter().enumerate() {
        lo[j] = (q & 0x0F) as f32 * d + m;
        hi[j] = (q >> 4) as f32 * d + m;
    }
}

fn q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = half_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let (lo, hi) = y.split_at_mut(16);
    for (j, &q) in b[6..].iter().enumerate() {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        lo[j] = (((q & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
        hi[j] = (((q >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let (lo, hi) = y.split_at_mut(16);
    for (j, &q) in b[8..].iter().enumerate() {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        lo[j] = ((q & 0x0F) as u32 | h0) as f32 * d + m;
        hi[j] = ((q >> 4) as u32 | h1) as f32 * d + m;
    }
}

/// The 6-bit scale and min of sub-block `j` (of 8) in a Q4_K / Q5_K block's 12 scale bytes.
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    };
    (sc as f32, m as f32)
}

fn q4_k(b: &[u8; 144], y: &mut [f32; 256]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..];
    for (j, y) in y.chunks_exact_mut(64).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * j, scales);
        let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let (lo, hi) = y.split_at_mut(32);
        for (l, &q) in qs[32 * j..32 * j + 32].iter().enumerate() {
            lo[l] = d1 * (q & 0x0F) as f32 - m1;
            hi[l] = d2 * (q >> 4) as f32 - m2;
        }
    }
}

fn q5_k(b: &[u8; 176], y: &mut [f32; 256]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let ql = &b[48..];
    for (j, y) in y.chunks_exact_mut(64).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * j, scales);
        let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
        let (lo, hi) = y.split_at_mut(32);
        for l in 0..32 {
            let q = ql[32 * j + l];
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            lo[l] = d1 * ((q & 0x0F) + h1) as f32 - m1;
            hi[l] = d2 * ((q >> 4) + h2) as f32 - m2;
        }
    }
}

fn q6_k(b: &[u8; 210], y: &mut [f32; 256]) {
    let (ql, rest) = b.split_at(128);
    let (qh, rest) = rest.split_at(64);
    let (scales, d) = rest.split_at(16);
    let d = half_at(d, 0);
    // Two halves of 128 values; in each, four groups of 32 take their low 4 bits from nibbles
    // of 64 `ql` bytes and their high 2 bits from bit pairs of 32 `qh` bytes.
    for (n, y) in y.chunks_exact_mut(128).enumerate() {
        let (ql, qh, sc) = (
            &ql[64 * n..64 * n + 64],
            &qh[32 * n..32 * n + 32],
            &scales[8 * n..],
        );
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_by_hand() {
        // d = 0.5, m = -1.0; byte j holds value j in its low nibble and 15 - j in its high one.
        let mut b = [0u8; 20];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_bits().to_le_bytes());
        for j in 0..16 {
            b[4 + j] = j as u8 | ((15 - j as u8) << 4);
        }
        let mut y = [0f32; 32];
        dequantize(GgmlType::Q4_1, &b, &mut y).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 0.5 - 1.0);
            assert_eq!(y[16 + j], (15 - j) as f32 * 0.5 - 1.0);
        }
    }

    #[test]
    fn rejects_partial_blocks_and_unsupported_types() {
        let mut y = [0f32; 32];
        let err = dequantize(GgmlType::Q8_0, &[0u8; 33], &mut y).unwrap_err();
        assert!(err.to_string().contains("do not decode"), "{err}");
        let err = dequantize(GgmlType::IQ2_XXS, &[0u8; 66], &mut [0f32; 256]).unwrap_err();
        assert!(
            err.to_string().contains("IQ2_XXS cannot be decoded"),
            "{err}"
        );
    }
}
