//! Every key the pinned TRL accepts, from `trl_fields.json` (made by scripts/dump_trl_fields.py),
//! and the typed keys nibble adds; used to tell a valid-but-untyped key from a typo, and a key of
//! the other trainer (`beta` in an SFT recipe, `packing` in a DPO one) from both.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;

use crate::fields::{DataArgs, DpoArgs, Field, ModelArgs, TrainingArgs};
use crate::types::Trainer;

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
    /// Fields by group: `model` (ModelConfig), `data` (ScriptArguments), `training` (SFTConfig),
    /// `dpo` (DPOConfig).
    pub groups: BTreeMap<String, Vec<TrlField>>,
}

impl TrlFields {
    /// Look a key up among those an SFT recipe takes.
    pub fn get(&self, name: &str) -> Option<&TrlField> {
        self.get_for(Trainer::Sft, name)
    }

    /// Look a key up among those `trainer` reads: ModelConfig's, ScriptArguments' and its own
    /// config class's.
    pub fn get_for(&self, trainer: Trainer, name: &str) -> Option<&TrlField> {
        self.in_group(trainer.group(), name)
            .or_else(|| self.in_group("model", name))
            .or_else(|| self.in_group("data", name))
    }

    fn in_group(&self, group: &str, name: &str) -> Option<&TrlField> {
        self.groups.get(group).and_then(|g| g.iter().find(|f| f.name == name))
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

/// The typed fields `trainer` reads: model, data and training keys, and for DPO its own keys
/// in place of SFTConfig's own (DPO's `loss_type` is its list of losses).
pub fn typed_fields(trainer: Trainer) -> impl Iterator<Item = &'static Field> {
    let own: &'static [Field] = match trainer {
        Trainer::Sft => &[],
        Trainer::Dpo => DpoArgs::FIELDS,
    };
    ModelArgs::FIELDS
        .iter()
        .chain(DataArgs::FIELDS)
        .chain(own)
        .chain(TrainingArgs::FIELDS.iter().filter(move |f| reads_training_key(trainer, f.name)))
}

/// Whether `trainer` reads this key of [`TrainingArgs`]: SFT all of them; DPO those DPOConfig
/// shares with SFTConfig, and nibble's own.
pub(crate) fn reads_training_key(trainer: Trainer, name: &str) -> bool {
    match trainer {
        Trainer::Sft => true,
        Trainer::Dpo => {
            let t = trl_fields();
            t.in_group("dpo", name).is_some() && name != "loss_type" || t.in_group("training", name).is_none()
        }
    }
}

/// The typed field of this name that `trainer` reads.
pub fn typed(trainer: Trainer, name: &str) -> Option<&'static Field> {
    typed_fields(trainer).find(|f| f.name == name)
}

/// A TRL key that nibble does not type: accepted, carried in `Recipe::extra`, and reported as
/// not acted on.
pub fn passthrough(trainer: Trainer, name: &str) -> Option<&'static TrlField> {
    if typed(trainer, name).is_some()
        || typed_fields(Trainer::Sft).chain(DpoArgs::FIELDS).any(|f| f.name == name)
    {
        return None;
    }
    trl_fields().get_for(trainer, name)
}

/// The other trainer that reads a key `trainer` does not (`beta` is DPO's; `packing` SFT's).
pub fn other_trainer(trainer: Trainer, name: &str) -> Option<Trainer> {
    if typed(trainer, name).is_some() || passthrough(trainer, name).is_some() {
        return None;
    }
    Trainer::VALUES
        .iter()
        .copied()
        .find(|&t| t != trainer && (typed(t, name).is_some() || passthrough(t, name).is_some()))
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
