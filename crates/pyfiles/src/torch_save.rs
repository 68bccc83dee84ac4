//! Files `torch.save` writes (an optimizer's `optimizer.pt`, a scheduler's `scheduler.pt`), read
//! without Python or libtorch: a zip archive (entries stored, not compressed) holding `data.pkl`, a
//! pickle whose tensors point at one archive entry per storage. Only what a state dict needs is
//! understood: the pickle opcodes of protocols 2-5 that build plain values, `OrderedDict`,
//! tensors (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`) and typed storages; any other
//! object is kept as an opaque [`Value::Object`]. Nothing is executed.

use std::collections::HashMap;
use std::path::Path;

/// Why a file could not be read; the message names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", .path.display())]
pub struct Error {
    /// The file.
    pub path: std::path::PathBuf,
    /// What is wrong with it.
    pub message: String,
}

/// A tensor's values, contiguous in row-major order, little-endian.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    /// safetensors' dtype name (`F32`, `BF16`, `F16`, `F64`, `I64`, `I32`, `I16`, `I8`, `U8`, `BOOL`).
    pub dtype: &'static str,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// The element bytes.
    pub data: Vec<u8>,
}

/// A value the pickle builds.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// A bool.
    Bool(bool),
    /// An int that fits 64 bits.
    Int(i64),
    /// A float.
    Float(f64),
    /// A str.
    Str(String),
    /// bytes.
    Bytes(Vec<u8>),
    /// A list.
    List(Vec<Value>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A dict (or `OrderedDict`), in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A tensor.
    Tensor(TensorData),
    /// Anything else: the class or function by its module and name, and its arguments.
    Object(String, Vec<Value>),
}

impl Value {
    /// The entry of a dict under a str or int key.
    pub fn get(&self, key: &Value) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// [`Value::get`] with a str key.
    pub fn get_str(&self, key: &str) -> Option<&Value> {
        self.get(&Value::Str(key.to_owned()))
    }
}

/// Read a file `torch.save` wrote.
pub fn read(path: &Path) -> Result<Value, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error { path: path.to_owned(), message: e.to_string() })?;
    parse(&bytes).map_err(|message| Error { path: path.to_owned(), message })
}

/// [`read`] on the file's bytes.
pub fn parse(bytes: &[u8]) -> Result<Value, String> {
    let entries = zip_entries(bytes)?;
    let (pkl_name, pkl) = entries
        .iter()
        .find(|(n, _)| n.ends_with("/data.pkl") || n.as_str() == "data.pkl")
        .ok_or("no data.pkl in the archive (not a torch.save file, or the legacy non-zip format)")?;
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    let storage = |key: &str| -> Result<&[u8], String> {
        let name = format!("{prefix}data/{key}");
        entries.get(&name).copied().ok_or_else(|| format!("storage `{name}` is missing from the archive"))
    };
    Unpickler {
        data: pkl,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        storage: &storage,
    }
    .run()
}

/// The archive's stored entries by name (the central directory, then each local header).
fn zip_entries(b: &[u8]) -> Result<HashMap<String, &[u8]>, String> {
    let u16_at = |at: usize| b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]]) as usize);
    let u32_at = |at: usize| b.get(at..at + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize);
    let short = || "the zip archive is cut short".to_owned();
    // End of central directory: the last signature within the final 64 KiB + 22 bytes.
    let lo = b.len().saturating_sub(22 + 65_535);
    let eocd = (lo..b.len().saturating_sub(21))
        .rev()
        .find(|&i| b[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or("no zip end-of-central-directory record (not a torch.save file)")?;
    let count = u16_at(eocd + 10).ok_or_else(short)?;
    let mut at = u32_at(eocd + 16).ok_or_else(short)?;
    if count == 0xffff || at == 0xffff_ffff {
        return Err("zip64 archives (files over 4 GiB) are not supported".into());
    }
    let mut out = HashMap::with_capacity(count);
    for _ in 0..count {
        if b.get(at..at + 4) != Some(&[0x50, 0x4b, 0x01, 0x02][..]) {
            return Err(format!("bad central directory entry at byte {at}"));
        }
        let method = u16_at(at + 10).ok_or_else(short)?;
        let size = u32_at(at + 20).ok_or_else(short)?;
        let (name_len, extra_len, comment_len) = (
            u16_at(at + 28).ok_or_else(short)?,
            u16_at(at + 30).ok_or_else(short)?,
            u16_at(at + 32).ok_or_else(short)?,
        );
        let local = u32_at(at + 42).ok_or_else(short)?;
        let name = b.get(at + 46..at + 46 + name_len).ok_or_else(short)?;
        let name = String::from_utf8_lossy(name).into_owned();
        if method != 0 {
            return Err(format!("entry `{name}` is compressed (method {method}); torch.save stores entries"));
        }
        if b.get(local..local + 4) != Some(&[0x50, 0x4b, 0x03, 0x04][..]) {
            return Err(format!("bad local header for `{name}`"));
        }
        let start =
            local + 30 + u16_at(local + 26).ok_or_else(short)? + u16_at(local + 28).ok_or_else(short)?;
        let data = b.get(start..start.checked_add(size).ok_or_else(short)?).ok_or_else(short)?;
        out.insert(name, data);
        at += 46 + name_len + extra_len + comment_len;
    }
    Ok(out)
}

/// torch's typed storage classes: each one's safetensors dtype name and element size. The one
/// table the reader and the writer both go by.
const STORAGES: [(&str, &str, usize); 10] = [
    ("FloatStorage", "F32", 4),
    ("DoubleStorage", "F64", 8),
    ("HalfStorage", "F16", 2),
    ("BFloat16Storage", "BF16", 2),
    ("LongStorage", "I64", 8),
    ("IntStorage", "I32", 4),
    ("ShortStorage", "I16", 2),
    ("CharStorage", "I8", 1),
    ("ByteStorage", "U8", 1),
    ("BoolStorage", "BOOL", 1),
];

/// The dtype name and element size of a storage class.
fn storage_dtype(class: &str) -> Option<(&'static str, usize)> {
    STORAGES.iter().find(|(c, _, _)| *c == class).map(|&(_, d, size)| (d, size))
}

/// A dtype name's storage class and element size.
fn storage_of(dtype: &str) -> Option<(&'static str, &'static str, usize)> {
    STORAGES.iter().find(|(_, d, _)| *d == dtype).copied()
}

/// What the pickle machine holds: values, and globals (classes and functions) not yet called.
/// A storage a persistent id names is a [`Value::Object`] tagged [`STORAGE_TAG`].
#[derive(Debug, Clone, PartialEq)]
enum Item {
    V(Value),
    Global(String, String),
}

struct Unpickler<'a, F: Fn(&str) -> Result<&'a [u8], String>> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Item>,
    marks: Vec<usize>,
    memo: HashMap<u32, Item>,
    storage: &'a F,
}

impl<'a, F: Fn(&str) -> Result<&'a [u8], String>> Unpickler<'a, F> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or("data.pkl is cut short")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&c| c == b'\n').ok_or("data.pkl: unterminated name")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn pop(&mut self) -> Result<Item, String> {
        self.stack.pop().ok_or_else(|| "data.pkl pops an empty stack".to_owned())
    }

    fn pop_value(&mut self) -> Result<Value, String> {
        match self.pop()? {
            Item::V(v) => Ok(v),
            Item::Global(m, n) => Ok(Value::Object(format!("{m}.{n}"), Vec::new())),
        }
    }

    fn pop_mark(&mut self) -> Result<Vec<Item>, String> {
        let at = self.marks.pop().ok_or("data.pkl pops a mark it never set")?;
        if at > self.stack.len() {
            return Err("data.pkl: mark beyond the stack".into());
        }
        Ok(self.stack.split_off(at))
    }

    fn values(items: Vec<Item>) -> Result<Vec<Value>, String> {
        // (Infallible today; kept fallible for the checks a new item kind would need.)
        items
            .into_iter()
            .map(|i| match i {
                Item::V(v) => Ok(v),
                Item::Global(m, n) => Ok(Value::Object(format!("{m}.{n}"), Vec::new())),
            })
            .collect()
    }

    fn top_container(&mut self) -> Result<&mut Value, String> {
        match self.stack.last_mut() {
            Some(Item::V(v)) => Ok(v),
            _ => Err("data.pkl adds items to something that is not a container".into()),
        }
    }

    fn run(mut self) -> Result<Value, String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                }
                0x95 => {
                    self.take(8)?;
                }
                b'.' => return self.pop_value(),
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.stack.push(Item::V(Value::Dict(Vec::new()))),
                b']' => self.stack.push(Item::V(Value::List(Vec::new()))),
                b')' => self.stack.push(Item::V(Value::Tuple(Vec::new()))),
                b'N' => self.stack.push(Item::V(Value::None)),
                0x88 => self.stack.push(Item::V(Value::Bool(true))),
                0x89 => self.stack.push(Item::V(Value::Bool(false))),
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Item::V(Value::Int(i64::from(v))));
                }
                b'M' => {
                    let s = self.take(2)?;
                    self.stack.push(Item::V(Value::Int(i64::from(u16::from_le_bytes([s[0], s[1]])))));
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Item::V(Value::Int(i64::from(v))));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let s = self.take(n)?;
                    if n > 8 {
                        return Err(format!("data.pkl: an int of {n} bytes"));
                    }
                    let mut v: i64 = 0;
                    for (i, byte) in s.iter().enumerate() {
                        v |= i64::from(*byte) << (8 * i);
                    }
                    if n > 0 && n < 8 && s[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Item::V(Value::Int(v)));
                }
                b'G' => {
                    let s = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(s);
                    self.stack.push(Item::V(Value::Float(f64::from_be_bytes(a))));
                }
                b'X' | 0x8c | 0x8d | b'U' | b'T' => {
                    let n = match op {
                        0x8c | b'U' => self.u8()? as usize,
                        0x8d => {
                            let s = self.take(8)?;
                            usize::try_from(u64::from_le_bytes(s.try_into().map_err(|_| "short")?))
                                .map_err(|e| e.to_string())?
                        }
                        _ => self.u32()? as usize,
                    };
                    let s = self.take(n)?;
                    self.stack.push(Item::V(Value::Str(String::from_utf8_lossy(s).into_owned())));
                }
                b'B' | b'C' => {
                    let n = if op == b'C' { self.u8()? as usize } else { self.u32()? as usize };
                    let s = self.take(n)?.to_vec();
                    self.stack.push(Item::V(Value::Bytes(s)));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Item::V(Value::Tuple(Self::values(items)?)));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n {
                        return Err("data.pkl: tuple from an empty stack".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Item::V(Value::Tuple(Self::values(items)?)));
                }
                b'q' => {
                    let k = u32::from(self.u8()?);
                    let top = self.stack.last().cloned().ok_or("data.pkl memoizes an empty stack")?;
                    self.memo.insert(k, top);
                }
                b'r' => {
                    let k = self.u32()?;
                    let top = self.stack.last().cloned().ok_or("data.pkl memoizes an empty stack")?;
                    self.memo.insert(k, top);
                }
                0x94 => {
                    let k = u32::try_from(self.memo.len()).map_err(|e| e.to_string())?;
                    let top = self.stack.last().cloned().ok_or("data.pkl memoizes an empty stack")?;
                    self.memo.insert(k, top);
                }
                b'h' | b'j' => {
                    let k = if op == b'h' { u32::from(self.u8()?) } else { self.u32()? };
                    let v = self.memo.get(&k).cloned().ok_or_else(|| format!("data.pkl: memo {k} unset"))?;
                    self.stack.push(v);
                }
                b'c' => {
                    let (m, n) = (self.line()?, self.line()?);
                    self.stack.push(Item::Global(m, n));
                }
                0x93 => {
                    let n = self.pop_value()?;
                    let m = self.pop_value()?;
                    match (m, n) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Item::Global(m, n)),
                        _ => return Err("data.pkl: STACK_GLOBAL of non-strings".into()),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(self.persistent(pid)?);
                }
                b'R' | 0x81 => {
                    let args = match self.pop()? {
                        Item::V(Value::Tuple(a)) => a,
                        _ => return Err("data.pkl calls with arguments that are not a tuple".into()),
                    };
                    let f = self.pop()?;
                    let v = self.call(f, args)?;
                    self.stack.push(Item::V(v));
                }
                b'b' => {
                    // An object's state: kept out of the tree (state dicts carry none that matter).
                    self.pop()?;
                }
                b's' => {
                    let v = self.pop_value()?;
                    let k = self.pop_value()?;
                    match self.top_container()? {
                        Value::Dict(items) => items.push((k, v)),
                        _ => return Err("data.pkl sets an item on a non-dict".into()),
                    }
                }
                b'u' => {
                    let items = Self::values(self.pop_mark()?)?;
                    if items.len() % 2 != 0 {
                        return Err("data.pkl: SETITEMS with an odd count".into());
                    }
                    let mut it = items.into_iter();
                    let mut pairs = Vec::new();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    match self.top_container()? {
                        Value::Dict(d) => d.extend(pairs),
                        _ => return Err("data.pkl sets items on a non-dict".into()),
                    }
                }
                b'a' => {
                    let v = self.pop_value()?;
                    match self.top_container()? {
                        Value::List(l) => l.push(v),
                        _ => return Err("data.pkl appends to a non-list".into()),
                    }
                }
                b'e' => {
                    let items = Self::values(self.pop_mark()?)?;
                    match self.top_container()? {
                        Value::List(l) => l.extend(items),
                        _ => return Err("data.pkl appends to a non-list".into()),
                    }
                }
                b'0' => {
                    self.pop()?;
                }
                other => {
                    return Err(format!(
                        "data.pkl: pickle opcode 0x{other:02x} at byte {} is not supported",
                        self.pos - 1
                    ));
                }
            }
        }
    }

    /// `('storage', <class>, key, location, numel)`.
    fn persistent(&self, pid: Item) -> Result<Item, String> {
        let Item::V(Value::Tuple(t)) = pid else {
            return Err("data.pkl: a persistent id that is not a tuple".into());
        };
        match (t.first(), t.get(1), t.get(2), t.get(4)) {
            (
                Some(Value::Str(kind)),
                Some(Value::Object(class, _)),
                Some(Value::Str(key)),
                Some(Value::Int(n)),
            ) if kind == "storage" => {
                let short = class.rsplit('.').next().unwrap_or(class);
                let (dtype, size) = storage_dtype(short)
                    .ok_or_else(|| format!("data.pkl: storage class `{class}` is not supported"))?;
                let need = usize::try_from(*n)
                    .map_err(|e| e.to_string())?
                    .checked_mul(size)
                    .ok_or("storage too big")?;
                let have = (self.storage)(key)?.len();
                if have < need {
                    return Err(format!("storage `{key}` holds {have} bytes, its {n} elements need {need}"));
                }
                let size = i64::try_from(size).map_err(|e| e.to_string())?;
                Ok(Item::V(Value::Object(
                    STORAGE_TAG.into(),
                    vec![Value::Str(dtype.into()), Value::Int(size), Value::Str(key.clone()), Value::Int(*n)],
                )))
            }
            _ => Err(format!("data.pkl: persistent id {t:?} is not a storage")),
        }
    }

    fn call(&self, f: Item, args: Vec<Value>) -> Result<Value, String> {
        let Item::Global(module, name) = f else {
            return Err("data.pkl calls something that is not a global".into());
        };
        match (module.as_str(), name.as_str()) {
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => self.tensor(&args),
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                args.into_iter().next().ok_or_else(|| "a parameter without data".to_owned())
            }
            ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
            // Protocol 2's bytes: `_codecs.encode(<str of the byte values>, "latin1")`.
            ("_codecs", "encode") => match args.as_slice() {
                [Value::Str(text), Value::Str(enc)] if enc == "latin1" => text
                    .chars()
                    .map(|c| {
                        u8::try_from(u32::from(c)).map_err(|_| "data.pkl: bytes beyond latin1".to_owned())
                    })
                    .collect::<Result<Vec<u8>, String>>()
                    .map(Value::Bytes),
                _ => Ok(Value::Object(format!("{module}.{name}"), args)),
            },
            _ => Ok(Value::Object(format!("{module}.{name}"), args)),
        }
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, ...)`, gathered into contiguous bytes.
    fn tensor(&self, args: &[Value]) -> Result<Value, String> {
        let storage = match args.first() {
            Some(Value::Object(tag, a)) if tag == STORAGE_TAG => match (a.first(), a.get(1), a.get(2)) {
                (Some(Value::Str(dtype)), Some(Value::Int(size)), Some(Value::Str(key))) => {
                    (dtype.clone(), *size, key.clone())
                }
                _ => return Err("data.pkl: bad storage reference".into()),
            },
            _ => return Err("data.pkl: a tensor without a storage".into()),
        };
        let ints = |v: Option<&Value>| -> Result<Vec<usize>, String> {
            match v {
                Some(Value::Tuple(t)) => t
                    .iter()
                    .map(|x| match x {
                        Value::Int(i) => usize::try_from(*i).map_err(|e| e.to_string()),
                        _ => Err("data.pkl: a tensor size that is not an int".into()),
                    })
                    .collect(),
                _ => Err("data.pkl: a tensor size that is not a tuple".into()),
            }
        };
        let offset = match args.get(1) {
            Some(Value::Int(o)) => usize::try_from(*o).map_err(|e| e.to_string())?,
            _ => return Err("data.pkl: a tensor offset that is not an int".into()),
        };
        let (shape, stride) = (ints(args.get(2))?, ints(args.get(3))?);
        if shape.len() != stride.len() {
            return Err("data.pkl: a tensor's size and stride differ in length".into());
        }
        let (dtype_name, size, key) = storage;
        let size = usize::try_from(size).map_err(|e| e.to_string())?;
        let bytes = (self.storage)(&key)?;
        let numel =
            shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("data.pkl: a tensor too big")?;
        // A view never has more elements than its storage (an overlapping or broadcast one could
        // ask for any amount of memory).
        if numel > bytes.len() / size.max(1) {
            return Err(format!(
                "a tensor of {numel} elements over storage `{key}` of {} bytes",
                bytes.len()
            ));
        }
        let mut data = Vec::with_capacity(numel * size);
        let mut index = vec![0usize; shape.len()];
        for _ in 0..numel {
            let at = offset + index.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
            let src = bytes
                .get(at * size..(at + 1) * size)
                .ok_or_else(|| format!("a tensor reads past the end of storage `{key}`"))?;
            data.extend_from_slice(src);
            for d in (0..shape.len()).rev() {
                index[d] += 1;
                if index[d] < shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        let (_, dtype, _) = storage_of(&dtype_name).ok_or("data.pkl: unknown storage dtype")?;
        Ok(Value::Tensor(TensorData { dtype, shape, data }))
    }
}

/// The [`Value::Object`] name of a storage reference: `[dtype, element size, archive key, numel]`.
pub const STORAGE_TAG: &str = "<storage>";

/// Writes a file `torch.load` reads: storages first, each as it is handed over (so a large state
/// is never held twice), then the pickle of the value that refers to them.
#[derive(Debug)]
pub struct Writer {
    path: std::path::PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    archive: String,
    offset: u64,
    entries: Vec<(String, u32, u64, u64)>,
    storages: usize,
}

impl Writer {
    /// Start `path`; torch names the archive's folder after the file's stem.
    pub fn create(path: &Path) -> Result<Self, Error> {
        let err = |e: std::io::Error| Error { path: path.to_owned(), message: e.to_string() };
        let file = std::fs::File::create(path).map_err(err)?;
        let archive = path.file_stem().and_then(|s| s.to_str()).unwrap_or("archive").to_owned();
        Ok(Writer {
            path: path.to_owned(),
            out: std::io::BufWriter::new(file),
            archive,
            offset: 0,
            entries: Vec::new(),
            storages: 0,
        })
    }

    fn err(&self, message: impl ToString) -> Error {
        Error { path: self.path.clone(), message: message.to_string() }
    }

    fn entry(&mut self, name: &str, data: &[u8]) -> Result<(), Error> {
        use std::io::Write;
        let name = format!("{}/{name}", self.archive);
        let size =
            u32::try_from(data.len()).map_err(|_| self.err("an entry over 4 GiB (zip64 is not written)"))?;
        let crc = crc32(data);
        let mut h = Vec::with_capacity(30 + name.len());
        h.extend_from_slice(&[0x50, 0x4b, 0x03, 0x04, 20, 0, 0, 0, 0, 0, 0, 0, 0x21, 0]);
        h.extend_from_slice(&crc.to_le_bytes());
        h.extend_from_slice(&size.to_le_bytes());
        h.extend_from_slice(&size.to_le_bytes());
        h.extend_from_slice(&(name.len() as u16).to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes());
        h.extend_from_slice(name.as_bytes());
        self.out.write_all(&h).and_then(|()| self.out.write_all(data)).map_err(|e| self.err(e))?;
        self.entries.push((name, crc, u64::from(size), self.offset));
        self.offset += (h.len() + data.len()) as u64;
        Ok(())
    }

    /// Store one tensor's contiguous little-endian bytes; the value to put in the pickled tree.
    pub fn tensor(&mut self, dtype: &'static str, shape: &[usize], data: &[u8]) -> Result<Value, Error> {
        let (_, _, size) = storage_of(dtype).ok_or_else(|| self.err(format!("tensors of dtype {dtype}")))?;
        let numel: usize = shape.iter().product();
        if numel * size != data.len() {
            return Err(self.err(format!("{} bytes for a {dtype} tensor of shape {shape:?}", data.len())));
        }
        let key = self.storages.to_string();
        self.storages += 1;
        self.entry(&format!("data/{key}"), data)?;
        let mut stride = vec![1i64; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * shape[d + 1] as i64;
        }
        let ints = |v: Vec<i64>| Value::Tuple(v.into_iter().map(Value::Int).collect());
        let storage = Value::Object(
            STORAGE_TAG.into(),
            vec![
                Value::Str(dtype.into()),
                Value::Int(size as i64),
                Value::Str(key),
                Value::Int(numel as i64),
            ],
        );
        Ok(Value::Object(
            "torch._utils._rebuild_tensor_v2".into(),
            vec![
                storage,
                Value::Int(0),
                ints(shape.iter().map(|&d| d as i64).collect()),
                ints(stride),
                Value::Bool(false),
                Value::Object("collections.OrderedDict".into(), Vec::new()),
            ],
        ))
    }

    /// Pickle `value` (protocol 2, as `torch.save`), write the records torch reads and the zip
    /// directory, and flush the file to disk.
    pub fn finish(mut self, value: &Value) -> Result<(), Error> {
        use std::io::Write;
        let mut pkl = vec![0x80, 2];
        pickle(value, &mut pkl).map_err(|m| self.err(m))?;
        pkl.push(b'.');
        // The pickle first, as torch writes it; storages may come before it in the file.
        self.entry("data.pkl", &pkl)?;
        self.entry("byteorder", b"little")?;
        self.entry("version", b"3\n")?;
        let start = self.offset;
        let mut dir = Vec::new();
        for (name, crc, size, at) in &self.entries {
            let at = u32::try_from(*at).map_err(|_| self.err("archive over 4 GiB (zip64 is not written)"))?;
            dir.extend_from_slice(&[0x50, 0x4b, 0x01, 0x02, 20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0x21, 0]);
            dir.extend_from_slice(&crc.to_le_bytes());
            dir.extend_from_slice(&(*size as u32).to_le_bytes());
            dir.extend_from_slice(&(*size as u32).to_le_bytes());
            dir.extend_from_slice(&(name.len() as u16).to_le_bytes());
            dir.extend_from_slice(&[0; 12]);
            dir.extend_from_slice(&at.to_le_bytes());
            dir.extend_from_slice(name.as_bytes());
        }
        let n = u16::try_from(self.entries.len()).map_err(|_| self.err("more than 65535 entries"))?;
        let start =
            u32::try_from(start).map_err(|_| self.err("archive over 4 GiB (zip64 is not written)"))?;
        let mut end = vec![0x50, 0x4b, 0x05, 0x06, 0, 0, 0, 0];
        end.extend_from_slice(&n.to_le_bytes());
        end.extend_from_slice(&n.to_le_bytes());
        end.extend_from_slice(&(dir.len() as u32).to_le_bytes());
        end.extend_from_slice(&start.to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        self.out.write_all(&dir).and_then(|()| self.out.write_all(&end)).map_err(|e| self.err(e))?;
        let file =
            self.out.into_inner().map_err(|e| Error { path: self.path.clone(), message: e.to_string() })?;
        file.sync_all().map_err(|e| Error { path: self.path.clone(), message: e.to_string() })
    }
}

fn pickle_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'X');
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn pickle_global(module: &str, name: &str, out: &mut Vec<u8>) {
    out.push(b'c');
    out.extend_from_slice(module.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(name.as_bytes());
    out.push(b'\n');
}

/// Protocol-2 opcodes for `v`; objects become `GLOBAL` + arguments + `REDUCE`, storages persistent ids.
fn pickle(v: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    match v {
        Value::None => out.push(b'N'),
        Value::Bool(b) => out.push(if *b { 0x88 } else { 0x89 }),
        Value::Int(i) => match *i {
            0..=0xff => out.extend_from_slice(&[b'K', *i as u8]),
            0x100..=0xffff => {
                out.push(b'M');
                out.extend_from_slice(&(*i as u16).to_le_bytes());
            }
            i if i32::try_from(i).is_ok() => {
                out.push(b'J');
                out.extend_from_slice(&(i as i32).to_le_bytes());
            }
            i => {
                out.extend_from_slice(&[0x8a, 8]);
                out.extend_from_slice(&i.to_le_bytes());
            }
        },
        Value::Float(f) => {
            out.push(b'G');
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Str(s) => pickle_str(s, out),
        Value::Bytes(b) => {
            out.push(b'B');
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        Value::List(items) => {
            out.push(b']');
            if !items.is_empty() {
                out.push(b'(');
                for x in items {
                    pickle(x, out)?;
                }
                out.push(b'e');
            }
        }
        Value::Tuple(items) => {
            if items.is_empty() {
                out.push(b')');
            } else {
                out.push(b'(');
                for x in items {
                    pickle(x, out)?;
                }
                out.push(b't');
            }
        }
        Value::Dict(items) => {
            out.push(b'}');
            if !items.is_empty() {
                out.push(b'(');
                for (k, x) in items {
                    pickle(k, out)?;
                    pickle(x, out)?;
                }
                out.push(b'u');
            }
        }
        Value::Tensor(_) => return Err("a tensor must be stored with `Writer::tensor` first".into()),
        Value::Object(name, args) if name == STORAGE_TAG => match args.as_slice() {
            [Value::Str(dtype), _, Value::Str(key), Value::Int(numel)] => {
                let (class, _, _) =
                    storage_of(dtype).ok_or_else(|| format!("no storage class for {dtype}"))?;
                out.push(b'(');
                pickle_str("storage", out);
                pickle_global("torch", class, out);
                pickle_str(key, out);
                pickle_str("cpu", out);
                pickle(&Value::Int(*numel), out)?;
                out.extend_from_slice(b"tQ");
            }
            _ => return Err("a malformed storage reference".into()),
        },
        Value::Object(name, args) => {
            let (module, short) = name.rsplit_once('.').ok_or_else(|| format!("`{name}` has no module"))?;
            pickle_global(module, short, out);
            pickle(&Value::Tuple(args.clone()), out)?;
            out.push(b'R');
        }
    }
    Ok(())
}

/// CRC-32 (IEEE), as zip records it.
fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8))
}
