//! TensorBoard event files without TensorFlow or protobuf crates: TFRecord framing (length,
//! masked CRC32C of the length, data, masked CRC32C of the data) around hand-encoded
//! `tensorboard.Event` messages, as `torch.utils.tensorboard.SummaryWriter` writes them. A
//! reader checks every CRC and decodes the same subset, so tests and tools can read back a run.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::ReportError;

/// The first event of every file, as TensorFlow's and PyTorch's writers put it.
pub const FILE_VERSION: &str = "brain.Event:2";

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) lookup table, built at compile time.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut k = 0;
        while k < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
            k += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC-32C of `data`: the checksum TFRecord uses (not the zlib CRC-32).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC (rotate right by 15, add a constant), which keeps a CRC of data that
/// itself holds CRCs from being weak.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `data`.
pub fn frame_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// The records of a TFRecord stream, every length and data CRC checked; `Err((offset, why))` at
/// the first bad one.
pub fn split_records(bytes: &[u8]) -> Result<Vec<&[u8]>, (u64, String)> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let bad = |why: String| (at as u64, why);
        let header = bytes.get(at..at + 12).ok_or_else(|| bad("truncated header".into()))?;
        let (len_bytes, len_crc) = header.split_at(8);
        let want = u32::from_le_bytes(len_crc.try_into().map_err(|_| bad("header".into()))?);
        if masked_crc32c(len_bytes) != want {
            return Err(bad("length CRC mismatch".into()));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().map_err(|_| bad("header".into()))?);
        let len = usize::try_from(len).map_err(|_| bad(format!("length {len} too large")))?;
        let start = at + 12;
        let end = start.checked_add(len).filter(|&e| e + 4 <= bytes.len());
        let end = end.ok_or_else(|| bad(format!("truncated record of {len} bytes")))?;
        let data = &bytes[start..end];
        let want = u32::from_le_bytes(bytes[end..end + 4].try_into().map_err(|_| bad("footer".into()))?);
        if masked_crc32c(data) != want {
            return Err(bad("data CRC mismatch".into()));
        }
        out.push(data);
        at = end + 4;
    }
    Ok(out)
}

// ---- protobuf wire format (the few fields an event file needs) ----

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// What one `Summary.Value` holds, as far as nibble writes and reads them.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueKind {
    /// `simple_value`: a scalar (`add_scalar`).
    Scalar(f32),
    /// A string tensor under the `text` plugin (`add_text`).
    Text(String),
    /// Anything else (another plugin's tensor, a histogram, an image): not decoded.
    Other,
}

/// One tagged value of an event's summary.
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    /// The tag (`train/loss`).
    pub tag: String,
    /// The value.
    pub kind: ValueKind,
}

/// One `tensorboard.Event`, the subset TensorBoard needs for scalars and text.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub wall_time: f64,
    /// Global step.
    pub step: i64,
    /// Set only on the first event of a file (`brain.Event:2`).
    pub file_version: Option<String>,
    /// The summary's values (empty for the file-version event).
    pub values: Vec<Value>,
}

impl Event {
    /// The protobuf bytes of this event (fields in TensorFlow's order; zero step omitted as
    /// proto3 does).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_key(&mut out, 1, 1);
        out.extend_from_slice(&self.wall_time.to_le_bytes());
        if self.step != 0 {
            put_key(&mut out, 2, 0);
            put_varint(&mut out, self.step as u64);
        }
        if let Some(v) = &self.file_version {
            put_bytes(&mut out, 3, v.as_bytes());
        }
        if !self.values.is_empty() {
            let mut summary = Vec::new();
            for v in &self.values {
                put_bytes(&mut summary, 1, &encode_value(v));
            }
            put_bytes(&mut out, 5, &summary);
        }
        out
    }

    /// Decode an event's protobuf bytes (unknown fields skipped).
    pub fn decode(bytes: &[u8]) -> Result<Event, String> {
        let mut ev = Event::default();
        for field in Fields::new(bytes) {
            match field? {
                (1, Wire::Fixed64(v)) => ev.wall_time = f64::from_bits(v),
                (2, Wire::Varint(v)) => ev.step = v as i64,
                (3, Wire::Bytes(b)) => ev.file_version = Some(utf8(b)?),
                (5, Wire::Bytes(summary)) => {
                    for f in Fields::new(summary) {
                        if let (1, Wire::Bytes(v)) = f? {
                            ev.values.push(decode_value(v)?);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(ev)
    }
}

fn encode_value(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(&mut out, 1, v.tag.as_bytes());
    match &v.kind {
        ValueKind::Scalar(x) => {
            put_key(&mut out, 2, 5);
            out.extend_from_slice(&x.to_le_bytes());
        }
        ValueKind::Text(text) => {
            // metadata { plugin_data { plugin_name: "text" } } (TextPluginData{version: 0} is empty)
            let mut plugin = Vec::new();
            put_bytes(&mut plugin, 1, b"text");
            let mut meta = Vec::new();
            put_bytes(&mut meta, 1, &plugin);
            put_bytes(&mut out, 9, &meta);
            // tensor { dtype: DT_STRING, tensor_shape { dim { size: 1 } }, string_val: text }
            let mut dim = Vec::new();
            put_key(&mut dim, 1, 0);
            put_varint(&mut dim, 1);
            let mut shape = Vec::new();
            put_bytes(&mut shape, 2, &dim);
            let mut tensor = Vec::new();
            put_key(&mut tensor, 1, 0);
            put_varint(&mut tensor, 7);
            put_bytes(&mut tensor, 2, &shape);
            put_bytes(&mut tensor, 8, text.as_bytes());
            put_bytes(&mut out, 8, &tensor);
        }
        ValueKind::Other => {}
    }
    out
}

fn decode_value(bytes: &[u8]) -> Result<Value, String> {
    let (mut tag, mut kind, mut plugin, mut strings) = (String::new(), ValueKind::Other, None, Vec::new());
    for f in Fields::new(bytes) {
        match f? {
            (1, Wire::Bytes(b)) => tag = utf8(b)?,
            (2, Wire::Fixed32(v)) => kind = ValueKind::Scalar(f32::from_bits(v)),
            (9, Wire::Bytes(meta)) => {
                for f in Fields::new(meta) {
                    if let (1, Wire::Bytes(pd)) = f? {
                        for f in Fields::new(pd) {
                            if let (1, Wire::Bytes(name)) = f? {
                                plugin = Some(utf8(name)?);
                            }
                        }
                    }
                }
            }
            (8, Wire::Bytes(tensor)) => {
                for f in Fields::new(tensor) {
                    if let (8, Wire::Bytes(s)) = f? {
                        strings.push(utf8(s)?);
                    }
                }
            }
            _ => {}
        }
    }
    if plugin.as_deref() == Some("text") && strings.len() == 1 {
        kind = ValueKind::Text(strings.remove(0));
    }
    Ok(Value { tag, kind })
}

fn utf8(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "string field is not UTF-8".to_owned())
}

/// A field's payload by wire type.
enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Iterates `(field number, payload)` over a message's bytes.
struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Fields { bytes, at: 0, failed: false }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.bytes.get(self.at).ok_or("truncated varint")?;
            self.at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or("truncated field")?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn field(&mut self) -> Result<(u32, Wire<'a>), String> {
        let key = self.varint()?;
        let number = u32::try_from(key >> 3).map_err(|_| "field number out of range")?;
        let payload = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => Wire::Fixed64(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| "fixed64")?)),
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| "length out of range")?;
                Wire::Bytes(self.take(n)?)
            }
            5 => Wire::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| "fixed32")?)),
            w => return Err(format!("unsupported wire type {w} (field {number})")),
        };
        Ok((number, payload))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Wire<'a>), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.at >= self.bytes.len() {
            return None;
        }
        let r = self.field();
        self.failed = r.is_err();
        Some(r)
    }
}

// ---- files ----

static FILE_SEQ: AtomicU64 = AtomicU64::new(0);

/// Appends events to one `events.out.tfevents.*` file, flushed after every call so TensorBoard
/// shows a live run.
#[derive(Debug)]
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created if missing), named as PyTorch's `SummaryWriter` names
    /// it (`events.out.tfevents.<unix seconds>.<host>.<pid>.<n>`), starting with the
    /// file-version event.
    pub fn create(dir: &Path) -> Result<Self, ReportError> {
        std::fs::create_dir_all(dir).map_err(ReportError::io("creating", dir))?;
        let now = super::clock::unix_now();
        let name = format!(
            "events.out.tfevents.{:010}.{}.{}.{}",
            now as u64,
            super::clock::hostname(),
            std::process::id(),
            FILE_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file = File::create_new(&path).map_err(ReportError::io("creating", &path))?;
        let mut w = EventWriter { file, path };
        w.write(&Event { wall_time: now, file_version: Some(FILE_VERSION.into()), ..Event::default() })?;
        Ok(w)
    }

    /// Where the events go.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one event and flush.
    pub fn write(&mut self, event: &Event) -> Result<(), ReportError> {
        let rec = frame_record(&event.encode());
        self.file.write_all(&rec).map_err(ReportError::io("writing", &self.path))?;
        self.file.flush().map_err(ReportError::io("flushing", &self.path))
    }

    /// One event per scalar, as `SummaryWriter.add_scalar` writes them.
    pub fn add_scalars(
        &mut self,
        step: i64,
        wall_time: f64,
        scalars: &[(String, f64)],
    ) -> Result<(), ReportError> {
        let mut bytes = Vec::new();
        for (tag, v) in scalars {
            let ev = Event {
                wall_time,
                step,
                file_version: None,
                values: vec![Value { tag: tag.clone(), kind: ValueKind::Scalar(*v as f32) }],
            };
            bytes.extend(frame_record(&ev.encode()));
        }
        self.file.write_all(&bytes).map_err(ReportError::io("writing", &self.path))?;
        self.file.flush().map_err(ReportError::io("flushing", &self.path))
    }

    /// A text summary, as `SummaryWriter.add_text` writes it (shown under TensorBoard's Text tab).
    pub fn add_text(&mut self, step: i64, wall_time: f64, tag: &str, text: &str) -> Result<(), ReportError> {
        let values = vec![Value { tag: tag.into(), kind: ValueKind::Text(text.into()) }];
        self.write(&Event { wall_time, step, file_version: None, values })
    }
}

/// Every event of a file, each record's CRCs checked.
pub fn read_events(path: &Path) -> Result<Vec<Event>, ReportError> {
    let bytes = std::fs::read(path).map_err(ReportError::io("reading", path))?;
    let corrupt = |offset, problem| ReportError::Corrupt { path: path.to_owned(), offset, problem };
    let records = split_records(&bytes).map_err(|(o, p)| corrupt(o, p))?;
    let mut offset = 0u64;
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        out.push(Event::decode(r).map_err(|p| corrupt(offset, p))?);
        offset += r.len() as u64 + 16;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_published_check_values() {
        // The CRC catalogue's check value and RFC 3720 (iSCSI) B.4's vectors.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let ascending: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&ascending), 0x46DD_794E);
        let descending: Vec<u8> = (0..32).rev().collect();
        assert_eq!(crc32c(&descending), 0x113F_DB5C);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    #[allow(clippy::manual_rotate)] // spelled as TensorFlow spells it
    fn masking_is_tensorflows() {
        // tensorflow/core/lib/hash/crc32c.h: ((crc >> 15) | (crc << 17)) + 0xa282ead8.
        let crc = crc32c(b"abc");
        assert_eq!(masked_crc32c(b"abc"), ((crc >> 15) | (crc << 17)).wrapping_add(0xa282ead8));
    }

    #[test]
    fn scalar_event_has_the_expected_wire_bytes() {
        let ev = Event {
            wall_time: 1.5,
            step: 300,
            file_version: None,
            values: vec![Value { tag: "a".into(), kind: ValueKind::Scalar(1.0) }],
        };
        let mut want = vec![0x09];
        want.extend(1.5f64.to_le_bytes());
        want.extend([0x10, 0xac, 0x02]); // step 300 as a varint
        // summary (field 5) { value (field 1) { tag "a", simple_value 1.0f } }
        want.extend([0x2a, 0x0a, 0x0a, 0x08, 0x0a, 0x01, b'a', 0x15]);
        want.extend(1.0f32.to_le_bytes());
        assert_eq!(ev.encode(), want);
        assert_eq!(Event::decode(&want), Ok(ev));
    }

    #[test]
    fn file_version_and_text_events_round_trip() {
        let v = Event { wall_time: 3.25, step: 0, file_version: Some(FILE_VERSION.into()), values: vec![] };
        let bytes = v.encode();
        assert_eq!(bytes.len(), 9 + 2 + FILE_VERSION.len());
        assert_eq!(Event::decode(&bytes), Ok(v));
        let t = Event {
            wall_time: 1.0,
            step: 7,
            file_version: None,
            values: vec![Value { tag: "args".into(), kind: ValueKind::Text("{\"lr\": 1}".into()) }],
        };
        assert_eq!(Event::decode(&t.encode()), Ok(t));
    }

    #[test]
    fn records_are_framed_and_every_corruption_is_caught() {
        let mut stream = frame_record(b"hello");
        stream.extend(frame_record(b""));
        stream.extend(frame_record(&[7u8; 300]));
        let recs = split_records(&stream).expect("valid stream");
        assert_eq!(recs, vec![&b"hello"[..], &b""[..], &[7u8; 300][..]]);
        for i in 0..stream.len() {
            let mut bad = stream.clone();
            bad[i] ^= 0x10;
            assert!(split_records(&bad).is_err(), "flipping byte {i} went unnoticed");
        }
        assert!(split_records(&stream[..stream.len() - 1]).is_err());
    }

    #[test]
    fn malformed_protobuf_is_an_error_not_a_panic() {
        assert!(Event::decode(&[0x2a, 0x05, 0x0a]).is_err());
        assert!(Event::decode(&[0x09, 0x00]).is_err());
        assert!(Event::decode(&[0x0b]).is_err());
    }
}
