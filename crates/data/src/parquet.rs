//! Parquet data files, row by row, as the JSON values `datasets` hands TRL: a struct is an object
//! with every field of the schema (absent ones null), a list an array, strings, integers, floats
//! and booleans as themselves. Read with the `parquet` crate's record API (no arrow).

use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde_json::{Map, Number, Value};

use crate::Error;

/// Every row of a Parquet file, in file order (row groups in order).
pub fn read_parquet(path: &Path) -> Result<Vec<Value>, Error> {
    let err = |row: Option<usize>, message: String| Error::Parquet { path: path.to_owned(), row, message };
    let file = std::fs::File::open(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| err(None, format!("not a readable Parquet file: {e}")))?;
    let n = reader.metadata().file_metadata().num_rows().max(0) as usize;
    let iter = reader.get_row_iter(None).map_err(|e| err(None, e.to_string()))?;
    let mut rows = Vec::with_capacity(n);
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
