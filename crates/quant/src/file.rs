//! safetensors files for quantized weights: read any file (memory-mapped, header checked), write
//! one deterministically (sorted header, fixed layout) and atomically (temp file, then rename),
//! so the same input always gives the same bytes and an interrupted write leaves nothing behind.

use std::collections::BTreeMap;
use std::path::Path;

use crate::Error;
use crate::state::RawTensor;

/// All tensors of a safetensors file (copied out of the map) and its metadata.
pub fn read(path: &Path) -> Result<(Vec<RawTensor>, BTreeMap<String, String>), Error> {
    let io = |source| Error::FileIo { path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: read-only map of a file we only read from; its bytes are copied out below.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    let st = safetensors::SafeTensors::deserialize(&map)
        .map_err(|e| Error::InvalidFile { path: path.to_owned(), message: format!("{e:?}") })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&map)
        .map_err(|e| Error::InvalidFile { path: path.to_owned(), message: format!("{e:?}") })?;
    let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
    let mut tensors: Vec<RawTensor> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| RawTensor {
            name,
            dtype: format!("{:?}", t.dtype()),
            shape: t.shape().to_vec(),
            data: t.data().to_vec(),
        })
        .collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((tensors, metadata))
}

/// The bytes of a safetensors file holding `tensors` (laid out in name order) and `metadata`.
pub fn to_bytes(tensors: &[RawTensor], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut sorted: Vec<&RawTensor> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::json!(metadata));
    }
    let mut offset = 0usize;
    for t in &sorted {
        let end = offset + t.data.len();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut head = serde_json::Value::Object(header).to_string().into_bytes();
    // Pad the header with spaces so the data starts 8-byte aligned, as the reference writer does.
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + offset);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    for t in sorted {
        out.extend_from_slice(&t.data);
    }
    out
}

/// Write a safetensors file atomically (see [`write_atomic_with`]).
pub fn write(path: &Path, tensors: &[RawTensor], metadata: &BTreeMap<String, String>) -> Result<(), Error> {
    write_atomic(path, &to_bytes(tensors, metadata))
        .map_err(|source| Error::FileIo { path: path.to_owned(), source })
}

pub use pyfiles::atomic::{write_atomic, write_atomic_with};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// safetensors files with a hostile header (sizes beyond the file, overlapping or
        /// reversed offsets, dtype/shape disagreements, a header length larger than the file, or
        /// plain garbage) are errors naming the file: never a panic or an allocation sized by the
        /// header (issue 22).
        #[test]
        fn hostile_safetensors_files_are_errors(
            header_len in proptest::prop_oneof![
                proptest::prelude::Just(None),
                (0u64..200).prop_map(Some),
                proptest::prelude::Just(Some(u64::MAX)),
                proptest::prelude::Just(Some(1u64 << 40)),
            ],
            begin in 0u64..64,
            end in proptest::prop_oneof![0u64..64, proptest::prelude::Just(u64::MAX / 2)],
            dtype in proptest::sample::select(vec!["F32", "F16", "BF16", "U8", "I64", "X9", ""]),
            shape in proptest::collection::vec(proptest::prop_oneof![0u64..5, proptest::prelude::Just(u64::MAX / 3)], 0..3),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let dir = std::env::temp_dir().join(format!("quant-hostile-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("dir");
            let path = dir.join("h.safetensors");
            let header = format!(
                r#"{{"t": {{"dtype": "{dtype}", "shape": {shape:?}, "data_offsets": [{begin}, {end}]}}}}"#
            );
            let mut bytes = header_len.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
            bytes.extend(header.as_bytes());
            bytes.extend(&tail);
            for candidate in [bytes, garbage] {
                std::fs::write(&path, &candidate).expect("write");
                if let Err(e) = read(&path) {
                    proptest::prop_assert!(e.to_string().contains("h.safetensors"), "{e}");
                }
            }
        }
    }

    #[test]
    fn written_files_read_back_with_the_safetensors_crate() {
        let t = vec![
            RawTensor {
                name: "b".into(),
                dtype: "F32".into(),
                shape: vec![2],
                data: vec![0, 0, 128, 63, 0, 0, 0, 64],
            },
            RawTensor { name: "a".into(), dtype: "U8".into(), shape: vec![3, 1], data: vec![1, 2, 3] },
        ];
        let meta = BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
        let bytes = to_bytes(&t, &meta);
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid file");
        assert_eq!(st.tensor("a").expect("a").data(), &[1, 2, 3]);
        assert_eq!(st.tensor("b").expect("b").shape(), &[2]);
        assert_eq!(to_bytes(&t, &meta), bytes, "deterministic");
        let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        assert!(header_len.is_multiple_of(8));
    }
}
