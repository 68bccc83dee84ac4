//! Comparisons shared by the test targets that check nibble against bitsandbytes.

/// The first element where two little-endian f32 buffers hold different values, as the 4-bit
/// formats define them: bit for bit, except that +0 and -0 are one value (FP4 code 8 is the
/// code's "-0"; bitsandbytes' native AVX-512 dequantize gives +0 for it, its scalar kernel -0,
/// nibble -0; docs/reference-cpu-paths.md). `None` when every value is the same.
pub fn first_value_difference(a: &[u8], b: &[u8]) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!("lengths {} vs {}", a.len(), b.len()));
    }
    let f = |c: &[u8]| f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    a.chunks_exact(4).zip(b.chunks_exact(4)).enumerate().find_map(|(i, (x, y))| {
        let (x, y) = (f(x), f(y));
        let same = x.to_bits() == y.to_bits() || (x == 0.0 && y == 0.0);
        (!same).then(|| format!("element {i}: {x:e} vs {y:e}"))
    })
}

/// Whether bitsandbytes' native CPU dequantize gives the right values for rows of `last_dim`
/// elements at `blocksize` on every CPU: its AVX-512 kernel is wrong (up to ~0.2 relative) when
/// the last dimension is a multiple of 16 but not of the blocksize (seen for every blocksize
/// 32..1024 on an AVX-512 host; docs/reference-cpu-paths.md). Odd rows take its torch fallback.
pub fn bnb_native_dequantize_is_exact(last_dim: usize, blocksize: usize) -> bool {
    !last_dim.is_multiple_of(16) || last_dim.is_multiple_of(blocksize)
}

#[test]
fn signed_zeros_are_one_value_and_everything_else_is_bitwise() {
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    assert_eq!(first_value_difference(&bytes(&[1.5, 0.0, -0.0]), &bytes(&[1.5, -0.0, 0.0])), None);
    assert_eq!(
        first_value_difference(&bytes(&[1.5, 2.0]), &bytes(&[1.5, 2.0000002])).as_deref(),
        Some("element 1: 2e0 vs 2.0000002e0")
    );
    let nan = f32::from_bits(0x7fc0_0001);
    assert!(first_value_difference(&bytes(&[nan]), &bytes(&[f32::NAN])).is_some());
    assert!(first_value_difference(&bytes(&[1.0]), &bytes(&[1.0, 2.0])).is_some());
}
