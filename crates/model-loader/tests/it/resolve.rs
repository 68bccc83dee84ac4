//! Finding models: local directories, the hub cache layout (refs and snapshots), offline
//! errors naming the id, revision and folder; reading config.json with key-level errors.

use std::path::{Path, PathBuf};

use model_loader::{Architecture, Error, HfConfig, HubCache, RopeScaling, resolve_model};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nibble-loader-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch");
    d
}

/// Lay out a model in a hub cache exactly as huggingface_hub does.
fn fake_cache(root: &Path, id: &str, commit: &str, branch: &str) {
    let repo = root.join(format!("models--{}", id.replace('/', "--")));
    std::fs::create_dir_all(repo.join("refs")).expect("refs");
    std::fs::write(repo.join("refs").join(branch), commit).expect("ref");
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).expect("snapshot");
    std::fs::copy(repo_root().join("models/tiny-llama/config.json"), snap.join("config.json"))
        .expect("config");
}

#[test]
fn local_directory_is_used_as_is() {
    let dir = repo_root().join("models/tiny-llama");
    let cache = HubCache { path: "/nonexistent".into() };
    assert_eq!(resolve_model(dir.to_str().expect("utf-8"), "main", &cache).expect("resolve"), dir);
}

#[test]
fn hub_ids_resolve_through_refs_and_commits() {
    let root = scratch("cache");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    fake_cache(&root, "org/tiny", commit, "main");
    let cache = HubCache { path: root.clone() };
    let snap = root.join("models--org--tiny/snapshots").join(commit);
    assert_eq!(resolve_model("org/tiny", "main", &cache).expect("by branch"), snap);
    assert_eq!(resolve_model("org/tiny", commit, &cache).expect("by commit"), snap);
    let shape = HfConfig::from_dir(&snap).expect("config").shape;
    assert_eq!(shape.layers, 2);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn missing_models_name_id_revision_and_folder() {
    let root = scratch("empty");
    let cache = HubCache { path: root.clone() };
    let e = resolve_model("org/absent", "v2", &cache).expect_err("absent");
    let shown = e.to_string();
    assert!(matches!(e, Error::NotInCache { .. }));
    for part in ["org/absent", "v2", "models--org--absent", "never downloads"] {
        assert!(shown.contains(part), "`{part}` missing from: {shown}");
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_tiny_model_config_reads() {
    let c = HfConfig::from_dir(&repo_root().join("models/tiny-llama")).expect("config");
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(
        (c.shape.hidden, c.shape.intermediate, c.shape.heads, c.shape.kv_heads, c.shape.head_dim),
        (64, 160, 4, 2, 16)
    );
    assert_eq!(c.rope_theta, 10000.0, "read from transformers 5's rope_parameters");
    assert!(!c.prequantized);
}

/// Hub-era Gemma configs (before transformers 5): no `layer_types`, Gemma 3's local RoPE base in
/// `rope_local_base_freq` and its global scaling in `rope_scaling`, read with transformers' defaults.
#[test]
fn older_gemma_configs_read_with_transformers_defaults() {
    let p = Path::new("g/config.json");
    let dims = r#""hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
        "intermediate_size": 128, "num_hidden_layers": 7, "vocab_size": 32"#;
    let g2 = HfConfig::parse(
        p,
        &format!(
            r#"{{"architectures": ["Gemma2ForCausalLM"], {dims}, "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 4096, "rope_theta": 10000.0}}"#
        ),
    )
    .expect("gemma2");
    assert_eq!(
        g2.sliding_layers,
        vec![true, false, true, false, true, false, true],
        "every second layer global"
    );
    let g = g2.gemma.as_ref().expect("gemma options");
    assert_eq!((g.attn_logit_softcapping, g.final_logit_softcapping), (Some(50.0), Some(30.0)));
    assert_eq!((g.query_pre_attn_scalar, g.local_rope.clone()), (256.0, None));
    let g3 = HfConfig::parse(
        p,
        &format!(
            r#"{{"architectures": ["Gemma3ForCausalLM"], {dims}, "sliding_window": 512,
            "sliding_window_pattern": 6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "rope_scaling": {{"rope_type": "linear", "factor": 8.0}}, "final_logit_softcapping": null,
            "query_pre_attn_scalar": 16}}"#
        ),
    )
    .expect("gemma3");
    assert_eq!(
        g3.sliding_layers,
        vec![true, true, true, true, true, false, true],
        "every sixth layer global"
    );
    assert_eq!((g3.rope_theta, g3.rope_scaling.clone()), (1e6, RopeScaling::Linear { factor: 8.0 }));
    let g = g3.gemma.as_ref().expect("gemma options");
    assert_eq!(g.local_rope, Some((10000.0, RopeScaling::Default)));
    assert_eq!(
        (g.attn_logit_softcapping, g.final_logit_softcapping, g.query_pre_attn_scalar),
        (None, None, 16.0)
    );
    // What nibble's decoder does not compute is refused by key.
    for (extra, want) in [
        (r#""hidden_activation": "gelu""#, "`hidden_activation` `gelu` is not supported"),
        (r#""use_bidirectional_attention": true"#, "use_bidirectional_attention"),
        (r#""layer_types": ["full_attention"]"#, "`layer_types` has 1 entries"),
        (r#""layer_types": ["sliding_attention", "x", 1, 2, 3, 4, 5]"#, "`layer_types[1]`"),
    ] {
        let text = format!(r#"{{"architectures": ["Gemma3ForCausalLM"], {dims}, {extra}}}"#);
        let e = HfConfig::parse(p, &text).expect_err(&text).to_string();
        assert!(e.starts_with("g/config.json: ") && e.contains(want), "{extra}: {e}");
    }
}

/// Phi-3 configs as the hub has them: LongRoPE under the older `rope_scaling` with `type: su`,
/// the pretraining length at the top level, the attention factor derived from the two lengths;
/// Phi-4-mini's partial rotary; what the decoder cannot compute refused by key.
#[test]
fn phi3_configs_read_longrope_and_partial_rotary() {
    let p = Path::new("phi/config.json");
    let dims = r#""hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
        "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 32"#;
    let factors = |n: usize| format!("[{}]", vec!["1.0"; n].join(", "));
    let su = format!(
        r#"{{"architectures": ["Phi3ForCausalLM"], {dims}, "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096, "sliding_window": 262144,
            "rope_scaling": {{"type": "su", "short_factor": {f}, "long_factor": {f}}}}}"#,
        f = factors(8)
    );
    let c = HfConfig::parse(p, &su).expect("phi3");
    assert!(c.shape.fused_projections);
    assert_eq!((c.rotary_dim, c.sliding_window), (16, Some(262144)));
    let RopeScaling::LongRope { original_max_position_embeddings, attention_factor, .. } = c.rope_scaling
    else {
        panic!("{:?}", c.rope_scaling)
    };
    assert_eq!(original_max_position_embeddings, 4096.0);
    let want = (1.0 + 32f64.ln() / 4096f64.ln()).sqrt();
    assert!((attention_factor - want).abs() < 1e-12, "{attention_factor} vs {want}");
    // Phi-4-mini: a quarter of each head unrotated, factors for the rotated part only.
    let mini = format!(
        r#"{{"architectures": ["Phi3ForCausalLM"], {dims}, "partial_rotary_factor": 0.75,
            "rope_scaling": {{"type": "longrope", "short_factor": {f}, "long_factor": {f}}}}}"#,
        f = factors(6)
    );
    assert_eq!(HfConfig::parse(p, &mini).expect("phi4-mini").rotary_dim, 12);
    for (text, want) in [
        (su.replace(&factors(8), &factors(7)), "need 8 entries each"),
        (mini.replace("0.75", "1.5"), "`partial_rotary_factor` must be a number in (0, 1]"),
        (
            su.replace("\"sliding_window\"", "\"resid_pdrop\": 0.1, \"sliding_window\""),
            "`resid_pdrop` is not 0",
        ),
    ] {
        let e = HfConfig::parse(p, &text).expect_err(&text).to_string();
        assert!(e.starts_with("phi/config.json: ") && e.contains(want), "{want}: {e}");
    }
}

#[test]
fn config_errors_name_the_file_and_key() {
    let p = Path::new("m/config.json");
    let cases = [
        (r#"{"architectures": ["GPT2LMHeadModel"]}"#, "GPT2LMHeadModel"),
        (r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}"#, "missing `num_attention_heads`"),
        (
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": "64", "num_attention_heads": 4}"#,
            "`hidden_size` must be",
        ),
        (
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3}"#,
            "must divide",
        ),
        ("{not json", "not valid JSON"),
        (
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
               "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 32,
               "quantization_config": {"quant_method": "gptq", "bits": 4}}"#,
            "quantization method `gptq` is not supported: nibble reads bitsandbytes",
        ),
    ];
    for (text, want) in cases {
        let e = HfConfig::parse(p, text).expect_err(text).to_string();
        assert!(e.starts_with("m/config.json: ") && e.contains(want), "{text}: {e}");
    }
    let unsupported =
        HfConfig::parse(p, r#"{"architectures": ["GPT2LMHeadModel"]}"#).expect_err("gpt2").to_string();
    assert!(unsupported.contains("Qwen3ForCausalLM"), "lists the supported ones: {unsupported}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

    /// config.json garbage and near-misses (a value replaced by another kind, huge or negative
    /// numbers, a key dropped) give a config or an error naming the file: never a panic and never
    /// an allocation sized by a hostile number (issue 22).
    #[test]
    fn garbage_and_near_miss_configs_never_panic(
        garbage in "\\PC{0,120}",
        key in proptest::sample::select(vec![
            "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
            "intermediate_size", "vocab_size", "head_dim", "rope_scaling", "quantization_config",
            "architectures", "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings",
        ]),
        value in proptest::sample::select(vec![
            "null", "-1", "0", "1e300", "18446744073709551615", "\"x\"", "[]", "{}", "true",
            "[\"GPT2LMHeadModel\"]", "{\"rope_type\": \"yarn\"}", "{\"load_in_8bit\": true}",
            "9007199254740993", "NaN",
        ]),
    ) {
        let p = Path::new("c/config.json");
        if let Err(e) = HfConfig::parse(p, &garbage) {
            proptest::prop_assert!(e.to_string().starts_with("c/config.json"));
        }
        let text = std::fs::read_to_string(repo_root().join("models/tiny-llama/config.json")).expect("config");
        let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
        match serde_json::from_str::<serde_json::Value>(value) {
            Ok(x) => v[key] = x,
            Err(_) => { v.as_object_mut().expect("object").remove(key); }
        }
        let _ = HfConfig::parse(p, &v.to_string());
    }
}
