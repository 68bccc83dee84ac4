//! Preference rows against TRL 1.16's DPOTrainer: every row of `golden/dpo_data.json` (made by
//! `scripts/golden_dpo_data.py` with DPOTrainer's own preparation and collator on the shipped tiny
//! model's tokenizer and chat template) gives the same prompt, chosen and rejected ids, the same
//! rows dropped by `max_length`, and the same collated batches under both truncation modes.

use std::path::Path;

use config::types::TruncationMode;
use data::Tokenizer;
use data::preference::{PreferenceIds, collate_preferences, prepare_preferences};
use data::template::{ChatTemplate, find_chat_template};
use serde_json::Value;

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).expect("ids")
}

fn flat(v: &Value) -> Vec<i64> {
    let rows: Vec<Vec<i64>> = serde_json::from_value(v.clone()).expect("matrix");
    rows.concat()
}

#[test]
fn preference_rows_prepare_and_collate_as_trl() {
    let golden: Value = serde_json::from_str(include_str!("golden/dpo_data.json")).expect("golden JSON");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama");
    let tok = Tokenizer::from_dir(&model).expect("tokenizer");
    let source = find_chat_template(&[&model]).expect("template").expect("the tiny model has one");
    let template = ChatTemplate::new(&source).expect("compiles");
    let pad = golden["pad_token_id"].as_i64().expect("pad id");
    let groups = golden["groups"].as_object().expect("groups");
    assert_eq!(groups.len(), 4);
    for (name, g) in groups {
        let rows = g["rows"].as_array().expect("rows");
        let (got, dropped) =
            prepare_preferences(rows, &tok, Some(&template), None, TruncationMode::KeepStart).expect(name);
        assert_eq!(dropped, 0);
        let want: Vec<PreferenceIds> = g["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|r| PreferenceIds {
                prompt: ids(&r["prompt_ids"]),
                chosen: ids(&r["chosen_ids"]),
                rejected: ids(&r["rejected_ids"]),
            })
            .collect();
        assert_eq!(got, want, "{name}");
        let max_length = g["max_length"].as_u64().expect("max_length") as usize;
        for (mode_name, mode, multiple) in
            [("keep_start", TruncationMode::KeepStart, None), ("keep_end", TruncationMode::KeepEnd, Some(8))]
        {
            let b = &g["batches"][mode_name];
            let (kept, _) =
                prepare_preferences(rows, &tok, Some(&template), Some(max_length), mode).expect(name);
            assert_eq!(kept.len() as u64, b["kept"].as_u64().expect("kept"), "{name} {mode_name}: rows kept");
            let first: Vec<&PreferenceIds> = kept.iter().take(2).collect();
            let batch = collate_preferences(&first, pad, Some(max_length), mode, multiple);
            assert_eq!(batch.input_ids, flat(&b["input_ids"]), "{name} {mode_name}: input_ids");
            assert_eq!(
                batch.completion_mask,
                flat(&b["completion_mask"]),
                "{name} {mode_name}: completion_mask"
            );
            assert_eq!(
                batch.attention_mask,
                flat(&b["attention_mask"]),
                "{name} {mode_name}: attention_mask"
            );
        }
    }
}

#[test]
fn a_bad_row_is_named() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama");
    let tok = Tokenizer::from_dir(&model).expect("tokenizer");
    let rows = vec![
        serde_json::json!({"prompt": "q", "chosen": "a", "rejected": "b"}),
        serde_json::json!({"prompt": "q", "chosen": "", "rejected": 7}),
    ];
    let e = prepare_preferences(&rows, &tok, None, None, TruncationMode::KeepStart).expect_err("row 2");
    let msg = e.to_string();
    assert!(msg.contains("row 2") && msg.contains("`rejected`") && msg.contains("a number"), "{msg}");
}

#[test]
fn loaded_rows_name_their_file_or_are_skipped_when_asked() {
    use std::sync::Arc;
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama");
    let tok = Tokenizer::from_dir(&model).expect("tokenizer");
    let file = Arc::new(std::path::PathBuf::from("pairs.jsonl"));
    let origin = |row| data::Origin { file: file.clone(), row };
    let rows = data::Rows {
        values: vec![
            serde_json::json!({"prompt": "q", "chosen": "a", "rejected": "b"}),
            serde_json::json!({"prompt": "q", "chosen": "a"}),
            serde_json::json!({"prompt": "r", "chosen": "c", "rejected": "d"}),
        ],
        origins: vec![origin(1), origin(7), origin(9)],
    };
    let mode = TruncationMode::KeepStart;
    let e =
        data::preference::prepare_preference_rows(&rows, &tok, None, None, mode, false).expect_err("row 7");
    assert!(e.to_string().starts_with("pairs.jsonl: row 7: missing `rejected`"), "{e}");
    let (pairs, dropped, skipped) =
        data::preference::prepare_preference_rows(&rows, &tok, None, None, mode, true).expect("skipped");
    assert_eq!((pairs.len(), dropped, skipped), (2, 0, 1));
}
