//! Every key the pinned TRL accepts, from `trl_fields.json` (made by scripts/dump_trl_fields.py),
//! and the typed keys nibble adds; used to tell a valid-but-untyped key from a typo.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;

use crate::fields::{DataArgs, Field, ModelArgs, TrainingArgs};

/// One TRL argument as the dump script recorded it.
#[derive(Debug, Clone, Deserialize)]
pub struct TrlField {
    /// Key name.
    pub name: String,
    /// Reduced type: bool, int, float, str, list, dict or any.
    pub kind: String,
    /// TRL's default, when it is plain JSON.
    pub default: serde_json::Value,
    /// The allowed values of a closed set.
    pub choices: Option<Vec<String>>,
}

/// The dump of the pinned TRL's argument classes.
#[derive(Debug, Clone, Deserialize)]
pub struct TrlFields {
    /// TRL version the dump was made with.
    pub trl: String,
    /// transformers version the dump was made with.
    pub transformers: String,
    /// Fields by group: `model`, `data`, `training`.
    pub groups: BTreeMap<String, Vec<TrlField>>,
}

impl TrlFields {
    /// Look a key up in any group.
    pub fn get(&self, name: &str) -> Option<&TrlField> {
        self.groups.values().flatten().find(|f| f.name == name)
    }
}

/// The embedded dump, parsed once.
pub fn trl_fields() -> &'static TrlFields {
    static CELL: OnceLock<TrlFields> = OnceLock::new();
    CELL.get_or_init(|| {
        serde_json::from_str(include_str!("trl_fields.json"))
            .unwrap_or_else(|e| panic!("embedded trl_fields.json is invalid: {e}"))
    })
}

/// All typed fields of the three sections.
pub fn typed_fields() -> impl Iterator<Item = &'static Field> {
    ModelArgs::FIELDS.iter().chain(DataArgs::FIELDS).chain(TrainingArgs::FIELDS)
}

/// The typed field of this name.
pub fn typed(name: &str) -> Option<&'static Field> {
    typed_fields().find(|f| f.name == name)
}

/// A TRL key that nibble does not type: accepted, carried in `Recipe::extra`, and reported as
/// not acted on.
pub fn passthrough(name: &str) -> Option<&'static TrlField> {
    if typed(name).is_some() {
        return None;
    }
    trl_fields().get(name)
}

/// Whether a JSON value fits a reduced TRL kind.
pub fn fits_kind(kind: &str, v: &serde_json::Value) -> bool {
    use serde_json::Value as J;
    match (kind, v) {
        (_, J::Null) => true,
        ("bool", J::Bool(_)) => true,
        ("int", J::Number(n)) => n.is_i64() || n.is_u64(),
        ("float", J::Number(_)) => true,
        ("str", J::String(_)) => true,
        ("list", J::Array(_)) => true,
        ("dict", J::Object(_)) => true,
        ("any", _) => true,
        _ => false,
    }
}
