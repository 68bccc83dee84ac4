//! Parquet data files, row by row, as the JSON values `datasets` hands TRL: a struct is an object
//! with every field of the schema (absent ones null), a list an array, strings, integers, floats
//! and booleans as themselves. Read with the `parquet` crate's record API (no arrow).

use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde_json::{Map, Number, Value};

use crate::Error;

/// Every row of a Parquet file, in file order (row groups in order). A damaged file is an error
/// naming it, also where the parquet crate's record reader panics on it (it does on some
/// corrupted definition levels: found by the property test below).
pub fn read_parquet(path: &Path) -> Result<Vec<Value>, Error> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_rows(path))) {
        Ok(rows) => rows,
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            Err(Error::Parquet {
                path: path.to_owned(),
                row: None,
                message: format!("damaged Parquet file (the reader gave up: {why})"),
            })
        }
    }
}

fn read_rows(path: &Path) -> Result<Vec<Value>, Error> {
    let err = |row: Option<usize>, message: String| Error::Parquet { path: path.to_owned(), row, message };
    let file = std::fs::File::open(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| err(None, format!("not a readable Parquet file: {e}")))?;
    let n = reader.metadata().file_metadata().num_rows().max(0) as usize;
    let iter = reader.get_row_iter(None).map_err(|e| err(None, e.to_string()))?;
    // The row count is the file's claim: a hostile file cannot make it an allocation.
    let mut rows = Vec::with_capacity(n.min(1 << 16));
    for (i, row) in iter.enumerate() {
        let row = row.map_err(|e| err(Some(i + 1), e.to_string()))?;
        let mut obj = Map::new();
        for (name, field) in row.into_columns() {
            let v = to_json(&field).map_err(|m| err(Some(i + 1), format!("column `{name}`{m}")))?;
            obj.insert(name, v);
        }
        rows.push(Value::Object(obj));
    }
    Ok(rows)
}

fn float(x: f64) -> Value {
    // JSON has no NaN or infinities; such a value (a score column, say) reads as null.
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// One field as JSON; the error is a path suffix and a reason (`.tags[2]: ...`).
fn to_json(field: &Field) -> Result<Value, String> {
    Ok(match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(v) => Value::from(*v),
        Field::Short(v) => Value::from(*v),
        Field::Int(v) => Value::from(*v),
        Field::Long(v) => Value::from(*v),
        Field::UByte(v) => Value::from(*v),
        Field::UShort(v) => Value::from(*v),
        Field::UInt(v) => Value::from(*v),
        Field::ULong(v) => Value::from(*v),
        Field::Float16(v) => float(f64::from(*v)),
        Field::Float(v) => float(f64::from(*v)),
        Field::Double(v) => float(*v),
        Field::Str(s) => Value::String(s.clone()),
        // Python gives datetime / Decimal objects; their text is the nearest JSON value.
        f @ (Field::Decimal(_)
        | Field::Date(_)
        | Field::TimeMillis(_)
        | Field::TimeMicros(_)
        | Field::TimestampMillis(_)
        | Field::TimestampMicros(_)) => Value::String(f.to_string()),
        Field::Bytes(_) => {
            return Err(": binary data has no JSON form (keep other columns with `columns`)".into());
        }
        Field::Group(row) => {
            let mut obj = Map::new();
            for (name, f) in row.get_column_iter() {
                obj.insert(name.clone(), to_json(f).map_err(|m| format!(".{name}{m}"))?);
            }
            Value::Object(obj)
        }
        Field::ListInternal(list) => Value::Array(
            list.elements()
                .iter()
                .enumerate()
                .map(|(i, f)| to_json(f).map_err(|m| format!("[{i}]{m}")))
                .collect::<Result<_, _>>()?,
        ),
        // pyarrow's `to_pylist` gives a map as a list of (key, value) pairs.
        Field::MapInternal(map) => Value::Array(
            map.entries()
                .iter()
                .enumerate()
                .map(|(i, (k, v))| {
                    let k = to_json(k).map_err(|m| format!("[{i}].key{m}"))?;
                    let v = to_json(v).map_err(|m| format!("[{i}].value{m}"))?;
                    Ok(Value::Array(vec![k, v]))
                })
                .collect::<Result<_, String>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// A Parquet file with bytes flipped, cut short or overwritten (footer lengths, page
        /// headers, row counts) is read or refused with an error naming the file: never a panic
        /// (issue 22).
        #[test]
        fn damaged_parquet_files_are_errors(
            at in 0usize..4096,
            byte in any::<u8>(),
            cut in proptest::option::of(0usize..4096),
        ) {
            let good = std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/sources/files/chat.parquet"),
            )
            .expect("golden parquet");
            let mut bytes = good.clone();
            let i = at % bytes.len();
            bytes[i] = byte;
            if let Some(c) = cut {
                bytes.truncate(c % bytes.len());
            }
            let dir = std::env::temp_dir().join(format!("data-parquet-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("dir");
            let path = dir.join("damaged.parquet");
            std::fs::write(&path, &bytes).expect("write");
            let outcome = std::panic::catch_unwind(|| read_parquet(&path));
            prop_assert!(outcome.is_ok(), "read_parquet panicked on byte {i} = {byte}, cut {cut:?}");
            if let Ok(Err(e)) = outcome {
                prop_assert!(e.to_string().contains("damaged.parquet"), "{e}");
            }
        }
    }
}
