//! `export::quantize_checkpoint`: a model quantized to disk loads pre-quantized with the same
//! logits as quantizing while loading, sharded or not; corrupt input is named; outputs are
//! atomic and never replace a non-empty directory unasked.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::{Path, PathBuf};

use model_loader::export::{QuantizeCheckpointOptions, quantize_checkpoint};
use model_loader::{CausalLm, Checkpoint, Error, LoadOptions};
use quant::QuantType;
use quant::ops::QuantizeOptions;
use tch::{Kind, Tensor};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nibble-export-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn load(dir: &Path, opts: LoadOptions) -> CausalLm {
    CausalLm::load(dir, &opts, &mut |_, _| {}).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn ids(vocab: i64) -> Tensor {
    Tensor::from_slice(&[5i64, 9, 14, 3, 77, 20, 41, 8, 60, 2, 11, 30]).remainder(vocab).view([2, 6])
}

fn logits(model: &CausalLm) -> Tensor {
    let vocab = model.config().shape.vocab as i64;
    tch::no_grad(|| model.forward(&ids(vocab), None, None)).unwrap()
}

#[test]
fn quantized_to_disk_equals_quantized_while_loading() {
    let root = scratch("parity");
    let cases = [
        (repo().join("models/tiny-llama"), QuantType::Nf4, 64, false),
        (repo().join("models/tiny-llama"), QuantType::Fp4, 128, true),
        (golden("llama"), QuantType::Nf4, 64, true),
        (golden("qwen2"), QuantType::Fp4, 32, false),
        (golden("qwen3"), QuantType::Nf4, 256, true),
    ];
    for (i, (src, quant_type, blocksize, double_quant)) in cases.into_iter().enumerate() {
        let quant = QuantizeOptions { quant_type, blocksize, double_quant };
        let dst = root.join(format!("case{i}"));
        let opts = QuantizeCheckpointOptions { quant, ..Default::default() };
        let mut calls = 0;
        let summary = quantize_checkpoint(&src, &dst, &opts, &mut |done, total| {
            calls += 1;
            assert!(done <= total);
        })
        .unwrap();
        assert_eq!(calls, Checkpoint::open(&src).unwrap().names().count());
        assert_eq!(summary.shards, ["model.safetensors"]);
        let pre = load(&dst, LoadOptions::default());
        assert!(pre.config().prequantized, "case {i}");
        let on_load = load(&src, LoadOptions { quantize: Some(quant), ..LoadOptions::default() });
        let (a, b) = (logits(&pre), logits(&on_load));
        assert!(a.equal(&b), "case {i}: pre-quantized logits differ from quantized-while-loading");
        let dense = logits(&load(&src, LoadOptions::default()));
        assert!(!a.allclose(&dense, 1e-4, 1e-4, false), "case {i}: nothing was quantized");
        // The 4-bit keys replace the dense weight: no fp copy of a linear is left.
        let ck = Checkpoint::open(&dst).unwrap();
        let w = ck.tensor("model.layers.1.mlp.up_proj.weight").unwrap();
        assert_eq!(w.dtype, safetensors::Dtype::U8);
        let suffix = format!("weight.quant_state.bitsandbytes__{}", quant_type.as_str());
        assert_eq!(ck.names().filter(|n| n.ends_with(&suffix)).count(), 7 * 2, "case {i}");
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn sharded_output_loads_and_keeps_each_weight_with_its_state() {
    let root = scratch("sharded");
    let src = repo().join("models/tiny-llama");
    let dst = root.join("out");
    let opts = QuantizeCheckpointOptions { max_shard_size: 20_000, ..Default::default() };
    let summary = quantize_checkpoint(&src, &dst, &opts, &mut |_, _| {}).unwrap();
    let n = summary.shards.len();
    assert!(n > 3, "{:?}", summary.shards);
    assert_eq!(summary.shards[0], format!("model-00001-of-{n:05}.safetensors"));
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dst.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    for (k, f) in map {
        if let Some(stem) = k.split(".weight.").next().filter(|_| k.contains(".weight.")) {
            assert_eq!(f, &map[&format!("{stem}.weight")], "{k} is apart from its weight");
        }
    }
    // The metadata transformers writes in the index of the same model saved in 4 bits.
    assert_eq!(index["metadata"]["total_parameters"], 115_264);
    assert_eq!(index["metadata"]["total_size"], 167_356);
    assert_eq!(summary.total_size, 167_356);
    // Each shard holds at most 20,000 bytes of data, unless it is one tensor (group) larger.
    let ck = Checkpoint::open(&dst).unwrap();
    for f in &summary.shards {
        let names: Vec<&String> = map.iter().filter(|(_, v)| *v == f).map(|(k, _)| k).collect();
        let bytes: usize = names.iter().map(|n| ck.tensor(n).unwrap().data.len()).sum();
        let stems: std::collections::BTreeSet<&str> =
            names.iter().map(|n| n.split(".weight").next().unwrap()).collect();
        assert!(bytes <= 20_000 || stems.len() == 1, "{f}: {bytes} bytes in {names:?}");
    }
    let single = root.join("single");
    quantize_checkpoint(&src, &single, &Default::default(), &mut |_, _| {}).unwrap();
    let (a, b) = (load(&dst, LoadOptions::default()), load(&single, LoadOptions::default()));
    assert!(logits(&a).equal(&logits(&b)));
    // The tokenizer and generation files come along; the weights are not copied twice.
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"] {
        assert_eq!(std::fs::read(dst.join(f)).unwrap(), std::fs::read(src.join(f)).unwrap(), "{f}");
    }
    assert!(!dst.join("model.safetensors").exists());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn config_gets_transformers_quantization_config() {
    let root = scratch("config");
    let dst = root.join("out");
    let opts = QuantizeCheckpointOptions {
        quant: QuantizeOptions { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true },
        compute_dtype: Kind::Float,
        ..Default::default()
    };
    quantize_checkpoint(&golden("llama"), &dst, &opts, &mut |_, _| {}).unwrap();
    // The golden 4-bit save is transformers' own for the same model and options.
    let want = std::fs::read_to_string(golden("llama-4bit-saved/config.json")).unwrap();
    assert_eq!(std::fs::read_to_string(dst.join("config.json")).unwrap(), want);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn outputs_are_refused_when_non_empty_and_never_half_written() {
    let root = scratch("refuse");
    let src = repo().join("models/tiny-llama");
    let dst = root.join("out");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::write(dst.join("notes.txt"), "mine").unwrap();
    let e = quantize_checkpoint(&src, &dst, &Default::default(), &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, Error::OutputExists { .. }), "{e}");
    assert!(e.to_string().contains("--overwrite"), "{e}");
    let opts = QuantizeCheckpointOptions { overwrite: true, ..Default::default() };
    quantize_checkpoint(&src, &dst, &opts, &mut |_, _| {}).unwrap();
    assert!(!dst.join("notes.txt").exists() && dst.join("model.safetensors").is_file());
    // The source itself is never a destination.
    let e = quantize_checkpoint(&src, &src, &opts, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, Error::BadOutput { .. }), "{e}");
    // A pre-quantized model is not quantized again.
    let e = quantize_checkpoint(&dst, &root.join("again"), &opts, &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("already quantized"), "{e}");
    // A failure half way leaves nothing behind: no output, no temporary directory.
    let bad = root.join("bad-src");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(src.join("config.json"), bad.join("config.json")).unwrap();
    corrupt_copy(&src, &bad, "model.layers.1.mlp.up_proj.weight");
    let e =
        quantize_checkpoint(&bad, &root.join("nothing"), &Default::default(), &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("model.layers.1.mlp.up_proj.weight"), "{e}");
    assert!(e.to_string().contains("non-finite"), "{e}");
    let names: Vec<String> =
        std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(names.len(), 2, "only the source copy and the output: {names:?}");
    assert!(!root.join("nothing").exists());
    let _ = std::fs::remove_dir_all(&root);
}

/// Copy the tiny model's weights into `dst` with a NaN in tensor `name`.
fn corrupt_copy(src: &Path, dst: &Path, name: &str) {
    let (mut tensors, meta) = quant::file::read(&src.join("model.safetensors")).unwrap();
    let t = tensors.iter_mut().find(|t| t.name == name).unwrap();
    t.data[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    quant::file::write(&dst.join("model.safetensors"), &tensors, &meta).unwrap();
}

#[test]
fn corrupt_input_names_the_file_and_tensor() {
    let root = scratch("corrupt");
    let src = repo().join("models/tiny-llama");
    // A truncated weight file.
    let trunc = root.join("trunc");
    std::fs::create_dir_all(&trunc).unwrap();
    std::fs::copy(src.join("config.json"), trunc.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(trunc.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let e = quantize_checkpoint(&trunc, &root.join("o1"), &Default::default(), &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains(&trunc.join("model.safetensors").display().to_string()), "{e}");
    // A linear of the wrong shape.
    let shape = root.join("shape");
    std::fs::create_dir_all(&shape).unwrap();
    std::fs::copy(src.join("config.json"), shape.join("config.json")).unwrap();
    let (mut tensors, meta) = quant::file::read(&src.join("model.safetensors")).unwrap();
    let t = tensors.iter_mut().find(|t| t.name == "model.layers.0.self_attn.k_proj.weight").unwrap();
    t.shape = vec![64, 32];
    quant::file::write(&shape.join("model.safetensors"), &tensors, &meta).unwrap();
    let e = quantize_checkpoint(&shape, &root.join("o2"), &Default::default(), &mut |_, _| {}).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("model.layers.0.self_attn.k_proj.weight") && msg.contains("shape [64, 32]"),
        "{msg}"
    );
    assert!(!root.join("o1").exists() && !root.join("o2").exists());
    let _ = std::fs::remove_dir_all(&root);
}
