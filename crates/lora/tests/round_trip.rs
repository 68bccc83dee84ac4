//! Save then load gives back every adapter tensor exactly, for random layer shapes, ranks,
//! scalings, target forms, adapter dtypes and DoRA or not; and the saved files are a fixed point (loading and
//! saving again writes the same bytes).

use std::path::PathBuf;

use lora::{LoraConfig, LoraInit, TargetModules, inject, inject_from};
use proptest::prelude::*;
use quant::linear::{Dense, Linear};
use tch::{Device, Kind, Tensor};

fn linears(shapes: &[(i64, i64)]) -> Vec<(String, Box<dyn Linear>)> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, (out, inp))| {
            let w = Tensor::zeros([*out, *inp], (Kind::Float, Device::Cpu));
            let layer: Box<dyn Linear> = Box::new(Dense::new(w, None).expect("dense"));
            (format!("model.layers.{i}.mlp.up_proj"), layer)
        })
        .collect()
}

fn offer(m: &mut [(String, Box<dyn Linear>)]) -> Vec<(String, &mut Box<dyn Linear>)> {
    m.iter_mut().map(|(n, l)| (n.clone(), l)).collect()
}

fn arb_targets() -> impl Strategy<Value = TargetModules> {
    prop_oneof![
        Just(TargetModules::AllLinear),
        Just(TargetModules::List(vec!["up_proj".into()])),
        Just(TargetModules::Regex(r"model\.layers\.\d+\.mlp\.up_proj".into())),
    ]
}

fn arb_case() -> impl Strategy<Value = (Vec<(i64, i64)>, LoraConfig, u64)> {
    (
        prop::collection::vec((1i64..40, 1i64..40), 1..4),
        1usize..9,
        prop_oneof![Just(1.0), Just(16.0), Just(7.5)],
        any::<bool>(),
        prop_oneof![Just(Kind::Float), Just(Kind::BFloat16), Just(Kind::Half)],
        arb_targets(),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(shapes, r, alpha, use_rslora, dtype, targets, seed, use_dora)| {
            let mut cfg = LoraConfig::new(r, alpha, targets);
            cfg.use_rslora = use_rslora;
            cfg.use_dora = use_dora;
            cfg.dtype = dtype;
            cfg.init = LoraInit::False;
            (shapes, cfg, seed)
        })
}

fn temp_dir(tag: &str, n: u64) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nibble-lora-rt-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn save_load_round_trip((shapes, cfg, seed) in arb_case()) {
        let dir = temp_dir("a", seed);
        let mut m = linears(&shapes);
        let saved = inject(offer(&mut m), &cfg, seed).expect("inject");
        saved.save(&dir).expect("save");

        // Same dtype: exact tensors, and the files saved again are byte-identical.
        let mut m2 = linears(&shapes);
        let mut loaded = inject(offer(&mut m2), &cfg, seed.wrapping_add(1)).expect("inject");
        loaded.load_into(&dir).expect("load_into");
        for (a, b) in saved.parameters().iter().zip(loaded.parameters()) {
            prop_assert_eq!(b.kind(), cfg.dtype);
            prop_assert!(a.equal(&b));
        }
        let again = temp_dir("b", seed);
        loaded.save(&again).expect("save again");
        for file in [lora::CONFIG_FILE, lora::WEIGHTS_FILE] {
            prop_assert_eq!(std::fs::read(dir.join(file)).expect("a"), std::fs::read(again.join(file)).expect("b"));
        }

        // Through inject_from: Float adapters holding the saved values exactly.
        let mut m3 = linears(&shapes);
        let from = inject_from(offer(&mut m3), &dir).expect("inject_from");
        prop_assert_eq!(from.modules().len(), shapes.len());
        for (a, b) in saved.parameters().iter().zip(from.parameters()) {
            prop_assert_eq!(b.kind(), Kind::Float);
            prop_assert!(a.to_kind(Kind::Float).equal(&b));
        }
        let back = LoraConfig::read(&dir).expect("config");
        prop_assert_eq!(back.r, cfg.r);
        prop_assert_eq!(back.alpha, cfg.alpha);
        prop_assert_eq!(back.scaling(), cfg.scaling());
        std::fs::remove_dir_all(&dir).expect("clean up");
        std::fs::remove_dir_all(&again).expect("clean up");
    }
}
