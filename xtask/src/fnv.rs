//! FNV-1a 64: a tiny hash whose output never changes between Rust versions (std's
//! `DefaultHasher` may), so a setup stamp written by one toolchain is still valid under the next.

const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of `bytes`, continuing from `state`.
fn update(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state ^= u64::from(b);
        state = state.wrapping_mul(PRIME);
    }
    state
}

/// FNV-1a 64 of several fields, each followed by its length so that field boundaries count.
pub fn hash_fields(fields: &[&[u8]]) -> u64 {
    fields.iter().fold(OFFSET_BASIS, |state, field| {
        let state = update(state, field);
        update(state, &(field.len() as u64).to_le_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_reference_vectors() {
        assert_eq!(update(OFFSET_BASIS, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(update(OFFSET_BASIS, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(update(OFFSET_BASIS, b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn field_boundaries_matter() {
        assert_ne!(hash_fields(&[b"ab", b"c"]), hash_fields(&[b"a", b"bc"]));
        assert_eq!(hash_fields(&[b"ab", b"c"]), hash_fields(&[b"ab", b"c"]));
    }
}
