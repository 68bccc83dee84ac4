//! Property: any valid plan written back as a recipe YAML loads into the same plan.

use config::types::*;
use config::{Loader, Recipe};
use proptest::prelude::*;

/// Strings that stress YAML quoting: YAML keywords, numbers, colons, quotes, unicode.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9_/.-]{0,20}",
        Just("yes".to_owned()),
        Just("null".to_owned()),
        Just("1e3".to_owned()),
        Just("0x1F".to_owned()),
        Just("a: b # c".to_owned()),
        Just("'quoted' \"double\"".to_owned()),
        Just("ünïcødé — {% jinja %}\n{{ x }}".to_owned()),
        Just("-".to_owned()),
    ]
}

fn choice<T: Copy + std::fmt::Debug + 'static>(all: &'static [T]) -> impl Strategy<Value = T> {
    proptest::sample::select(all)
}

fn dataset() -> impl Strategy<Value = DatasetSpec> {
    (
        text(),
        proptest::option::of(text()),
        "[a-z_]{1,10}",
        proptest::option::of(proptest::collection::vec(text(), 1..3)),
        0.001f64..=1.0,
    )
        .prop_map(|(id, config, split, columns, weight)| DatasetSpec {
            id: format!("x{id}"),
            config,
            split,
            columns,
            weight,
        })
}

prop_compose! {
    fn recipe()(
        model in text(),
        dtype in choice(&[Dtype::Auto, Dtype::Bfloat16, Dtype::Float16, Dtype::Float32]),
        quant in choice(&[QuantType::Nf4, QuantType::Fp4]),
        nested in any::<bool>(),
        lora_r in 1i64..1024,
        lora_alpha in 1i64..4096,
        lora_dropout in 0.0f64..0.99,
        targets in prop_oneof![
            proptest::collection::vec("[a-z_]{1,12}", 1..6).prop_map(TargetModules::List),
            Just(TargetModules::Pattern("all-linear".into())),
            Just(TargetModules::Pattern(r".*\.(q|v)_proj".into())),
        ],
        use_mixture in any::<bool>(),
        name in text(),
        mix in proptest::collection::vec(dataset(), 1..4),
        seed in any::<u64>(),
        lr in 0.0f64..1.0,
        sched in choice(&[Scheduler::Linear, Scheduler::Cosine, Scheduler::CosineWithMinLr, Scheduler::ConstantWithWarmup]),
        warmup in prop_oneof![0.0f64..0.999, (1u32..1000).prop_map(f64::from)],
        max_length in proptest::option::of(1i64..1_000_000),
        packing in any::<bool>(),
        strategy in choice(&[PackingStrategy::Bfd, PackingStrategy::BfdSplit, PackingStrategy::Wrapped]),
        accum in 1i64..64,
        max_steps in prop_oneof![Just(-1i64), 1i64..100_000],
        template in proptest::option::of(text()),
        env_value in text(),
        report in prop_oneof![Just(ReportTo::One("none".into())), proptest::collection::vec("[a-z]{1,8}", 1..3).prop_map(ReportTo::Many)],
    ) -> Recipe {
        let mut r = Loader::new().yaml("base.yaml", "model_name_or_path: m\ndataset_name: d\n").load().expect("base");
        r.model.model_name_or_path = Some(format!("m{model}"));
        r.model.dtype = dtype;
        r.model.bnb_4bit_quant_type = quant;
        r.model.use_bnb_nested_quant = nested;
        r.model.load_in_4bit = true;
        r.model.use_peft = true;
        r.model.lora_r = lora_r;
        r.model.lora_alpha = lora_alpha;
        r.model.lora_dropout = lora_dropout;
        r.model.lora_target_modules = Some(targets);
        if use_mixture {
            r.data.dataset_name = None;
            let columns = mix[0].columns.clone();
            let datasets = mix.into_iter().map(|d| DatasetSpec { columns: columns.clone(), ..d }).collect();
            r.data.dataset_mixture = Some(DatasetMixture { datasets, seed, test_split_size: Some(0.1), eval_datasets: vec![] });
        } else {
            r.data.dataset_name = Some(format!("d{name}"));
        }
        r.training.learning_rate = lr;
        r.training.lr_scheduler_type = sched;
        r.training.warmup_steps = warmup;
        r.training.max_length = max_length;
        r.training.packing = packing;
        r.training.packing_strategy = strategy;
        r.training.gradient_accumulation_steps = accum;
        r.training.max_steps = max_steps;
        r.training.chat_template = template;
        r.training.seed = seed;
        r.training.report_to = report;
        r.env.insert("SOME_VAR".into(), env_value);
        r
    }
}

/// One recipe written as YAML and loaded back.
fn round_trip(r: Recipe) -> Result<(), TestCaseError> {
    let yaml = r.to_yaml();
    let back = Loader::new().yaml("roundtrip.yaml", yaml.clone()).load();
    let back = match back {
        Ok(b) => b,
        Err(e) => return Err(TestCaseError::fail(format!("{e}\n--- yaml ---\n{yaml}"))),
    };
    prop_assert_eq!(&back.model, &r.model, "yaml:\n{}", yaml);
    prop_assert_eq!(&back.data, &r.data);
    prop_assert_eq!(&back.training, &r.training);
    prop_assert_eq!(&back.env, &r.env);
    prop_assert_eq!(&back.extra, &r.extra);
    // Everything the YAML spells out is attributed to the file.
    prop_assert_eq!(back.sources["lora_r"], config::Source::File);
    Ok(())
}

/// Any generated recipe survives the trip. Run on a thread with a larger stack: a debug build's
/// serde frames for the whole recipe outgrow a test thread's 2 MiB.
#[test]
fn plan_to_yaml_to_plan() {
    std::thread::Builder::new()
        .stack_size(32 << 20)
        .spawn(|| {
            let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(200));
            if let Err(e) = runner.run(&recipe(), round_trip) {
                panic!("{e}");
            }
        })
        .expect("a test thread")
        .join()
        .expect("the round trip holds");
}
