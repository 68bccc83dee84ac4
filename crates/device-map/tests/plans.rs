//! Device-map planning: examples of each strategy, and the invariants as properties (every module
//! placed exactly once, no device over budget, layer order kept, impossible budgets rejected
//! with the shortfall in bytes).

use device_map::{Budget, Device, Error, Module, Plan, Strategy, plan};
use proptest::prelude::{Just, prop_assert, prop_assert_eq, prop_oneof, proptest};
use proptest::strategy::Strategy as Gen;

const GIB: u64 = 1 << 30;

fn llama(layers: usize, layer_bytes: u64) -> Vec<Module> {
    let mut m = vec![Module { name: "model.embed_tokens".into(), bytes: 2 * layer_bytes }];
    m.extend((0..layers).map(|i| Module { name: format!("model.layers.{i}"), bytes: layer_bytes }));
    m.push(Module { name: "model.norm".into(), bytes: 1024 });
    m.push(Module { name: "lm_head".into(), bytes: 2 * layer_bytes });
    m
}

fn devices(p: &Plan) -> Vec<Device> {
    p.placements.iter().map(|(_, d)| *d).collect()
}

#[test]
fn single_device_map_puts_everything_there() {
    let m = llama(4, GIB);
    let p = plan(&m, &Strategy::Single(Device::Cuda(0)), &Budget::default()).expect("plan");
    assert!(devices(&p).iter().all(|d| *d == Device::Cuda(0)));
    let e = plan(&m, &Strategy::Single(Device::Cuda(0)), &Budget::new([(Device::Cuda(0), 5 * GIB)]))
        .expect_err("over budget");
    assert_eq!(
        e,
        Error::OverBudget {
            device: Device::Cuda(0),
            needed: 8 * GIB + 1024,
            budget: 5 * GIB,
            shortfall: 3 * GIB + 1024
        }
    );
    assert!(e.to_string().contains("short by 3.00 GiB (3221226496 bytes)"), "{e}");
}

#[test]
fn sequential_fills_gpu_0_first_then_offloads_whole_layers() {
    let m = llama(6, GIB);
    let b = Budget::new([(Device::Cuda(0), 5 * GIB), (Device::Cuda(1), 2 * GIB), (Device::Cpu, 100 * GIB)]);
    let p = plan(&m, &Strategy::Sequential, &b).expect("plan");
    let usage = p.usage(&m);
    assert_eq!(usage[&Device::Cuda(0)], 5 * GIB, "embeddings and layers 0-2");
    assert_eq!(usage[&Device::Cuda(1)], 2 * GIB, "layers 3-4");
    assert_eq!(p.device_of("lm_head"), Some(Device::Cpu));
    assert_eq!(p.device_of("model.layers.5"), Some(Device::Cpu), "offloaded whole");
    // Streamed, the offloaded layer computes on the plan's first GPU; otherwise where it is.
    assert_eq!(p.compute_device(Device::Cpu, true), Device::Cuda(0));
    assert_eq!(p.compute_device(Device::Cpu, false), Device::Cpu);
    assert_eq!(p.compute_device(Device::Cuda(1), true), Device::Cuda(1));
    let all_cpu = plan(&m, &Strategy::Single(Device::Cpu), &Budget::default()).expect("plan");
    assert_eq!(all_cpu.compute_device(Device::Cpu, true), Device::Cpu);
}

#[test]
fn balanced_spreads_evenly_and_low_0_spares_gpu_0() {
    let m = llama(8, GIB); // 12 GiB + 1 KiB
    let b = Budget::new([(Device::Cuda(0), 40 * GIB), (Device::Cuda(1), 40 * GIB), (Device::Cpu, 64 * GIB)]);
    let p = plan(&m, &Strategy::Balanced, &b).expect("balanced");
    let u = p.usage(&m);
    let (a, c) = (u[&Device::Cuda(0)], u[&Device::Cuda(1)]);
    assert!(a.abs_diff(c) <= 2 * GIB, "{a} vs {c}");
    assert_eq!(plan(&m, &Strategy::Auto, &b).expect("auto"), p, "auto is balanced");
    let low = plan(&m, &Strategy::BalancedLow0, &b).expect("low_0");
    assert!(low.usage(&m).get(&Device::Cuda(0)).copied().unwrap_or(0) <= 2 * GIB);
}

#[test]
fn explicit_maps_use_the_longest_prefix() {
    let m = llama(3, GIB);
    let s = Strategy::from_json(&serde_json::json!({"": 0, "model.layers.2": "cpu", "lm_head": "cuda:1"}))
        .expect("parse");
    let p = plan(&m, &s, &Budget::default()).expect("plan");
    assert_eq!(p.device_of("model.layers.1"), Some(Device::Cuda(0)));
    assert_eq!(p.device_of("model.layers.2"), Some(Device::Cpu));
    assert_eq!(p.device_of("lm_head"), Some(Device::Cuda(1)));
    let partial = Strategy::from_json(&serde_json::json!({"model.layers": 0})).expect("parse");
    match plan(&m, &partial, &Budget::default()) {
        Err(Error::Unplaced(names)) => assert_eq!(names, ["model.embed_tokens", "model.norm", "lm_head"]),
        other => panic!("{other:?}"),
    }
    // "model.layers.1" must not capture "model.layers.10".
    let m = llama(11, 1);
    let s = Strategy::Explicit(vec![("".into(), Device::Cuda(0)), ("model.layers.1".into(), Device::Cpu)]);
    let p = plan(&m, &s, &Budget::default()).expect("plan");
    assert_eq!(p.device_of("model.layers.10"), Some(Device::Cuda(0)));
}

#[test]
fn parsing_maps_and_budgets() {
    assert_eq!(
        Strategy::from_json(&serde_json::json!({"": 0})).ok(),
        Some(Strategy::Single(Device::Cuda(0)))
    );
    assert_eq!(Strategy::from_json(&serde_json::json!("cpu")).ok(), Some(Strategy::Single(Device::Cpu)));
    assert_eq!(Strategy::from_json(&serde_json::json!("balanced_low_0")).ok(), Some(Strategy::BalancedLow0));
    assert!(matches!(Strategy::from_json(&serde_json::json!("everywhere")), Err(Error::BadStrategy(_))));
    let b = Budget::from_json(&serde_json::json!({"0": "20GiB", "cpu": "64GB"})).expect("budget");
    assert_eq!(b.limit(Device::Cuda(0)), Some(20 * GIB));
    assert_eq!(b.limit(Device::Cpu), Some(64_000_000_000));
    assert!(matches!(Budget::from_json(&serde_json::json!({"tpu": "1GB"})), Err(Error::BadDevice(_))));
}

#[test]
fn duplicate_modules_are_rejected() {
    let m = vec![Module { name: "a".into(), bytes: 1 }, Module { name: "a".into(), bytes: 1 }];
    assert_eq!(
        plan(&m, &Strategy::Sequential, &Budget::new([(Device::Cpu, 10)])),
        Err(Error::Duplicate("a".into()))
    );
}

fn modules() -> impl Gen<Value = Vec<Module>> {
    proptest::collection::vec(1u64..1000, 0..40).prop_map(|sizes| {
        sizes
            .into_iter()
            .enumerate()
            .map(|(i, bytes)| Module { name: format!("model.layers.{i}"), bytes })
            .collect()
    })
}

fn budget() -> impl Gen<Value = Budget> {
    (proptest::collection::vec(0u64..6000, 0..4), proptest::option::of(0u64..20000)).prop_map(
        |(gpus, cpu)| {
            Budget::new(
                gpus.into_iter()
                    .enumerate()
                    .map(|(i, b)| (Device::Cuda(i as u32), b))
                    .chain(cpu.map(|b| (Device::Cpu, b))),
            )
        },
    )
}

fn strategy() -> impl Gen<Value = Strategy> {
    prop_oneof![
        Just(Strategy::Sequential),
        Just(Strategy::Balanced),
        Just(Strategy::Auto),
        Just(Strategy::BalancedLow0),
    ]
}

proptest! {
    #[test]
    fn plans_keep_every_invariant(m in modules(), b in budget(), s in strategy()) {
        match plan(&m, &s, &b) {
            Ok(p) => {
                // Every module exactly once, in order.
                let names: Vec<&str> = p.placements.iter().map(|(n, _)| n.as_str()).collect();
                let want: Vec<&str> = m.iter().map(|x| x.name.as_str()).collect();
                prop_assert_eq!(names, want);
                // No device over budget, and only budgeted devices used.
                for (d, used) in p.usage(&m) {
                    let limit = b.limit(d);
                    prop_assert!(limit.is_some_and(|l| used <= l), "{d}: {used} > {limit:?}");
                }
                // Layer order kept: the device never goes back along the forward pass.
                let ds = devices(&p);
                prop_assert!(ds.windows(2).all(|w| w[0] <= w[1]), "{ds:?}");
            }
            Err(Error::TooSmall { needed, available, shortfall }) => {
                prop_assert_eq!(needed, m.iter().map(|x| x.bytes).sum::<u64>());
                prop_assert!(shortfall > 0 && shortfall == needed - available);
                prop_assert!(available <= b.devices().map(|(_, l)| l).sum::<u64>());
            }
            Err(Error::ModuleDoesNotFit { bytes, room, shortfall, ref module, .. }) => {
                prop_assert!(bytes > room && shortfall == bytes - room);
                let shown = plan(&m, &s, &b).expect_err("same error").to_string();
                let bytes_text = format!("({shortfall} bytes)");
                prop_assert!(shown.contains(&bytes_text) && shown.contains(module.as_str()), "{}", shown);
            }
            Err(Error::Unplaced(names)) => prop_assert!(b.devices().next().is_none() && !names.is_empty()),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    #[test]
    fn sequential_succeeds_when_budgets_leave_room_for_fragmentation(m in modules(), b in budget()) {
        let needed: u64 = m.iter().map(|x| x.bytes).sum();
        let largest = m.iter().map(|x| x.bytes).max().unwrap_or(0);
        let n = b.devices().count() as u64;
        let total: u64 = b.devices().map(|(_, l)| l).sum();
        // Each device wastes less than one module's bytes when it moves on.
        if n > 0 && total >= needed + n * largest {
            prop_assert!(plan(&m, &Strategy::Sequential, &b).is_ok());
        }
        if needed > total {
            let is_too_small = matches!(plan(&m, &Strategy::Sequential, &b), Err(Error::TooSmall { .. }));
            prop_assert!(is_too_small);
        }
    }

    #[test]
    fn explicit_maps_place_by_longest_prefix_and_respect_budgets(
        m in modules(),
        cut in 0usize..40,
        limit in 0u64..20000,
    ) {
        let s = Strategy::Explicit(vec![
            ("".into(), Device::Cuda(0)),
            (format!("model.layers.{cut}"), Device::Cpu),
        ]);
        let b = Budget::new([(Device::Cuda(0), limit)]);
        let gpu_bytes: u64 = m.iter().filter(|x| x.name != format!("model.layers.{cut}")).map(|x| x.bytes).sum();
        match plan(&m, &s, &b) {
            Ok(p) => {
                prop_assert!(gpu_bytes <= limit);
                for (name, d) in &p.placements {
                    let want = if *name == format!("model.layers.{cut}") { Device::Cpu } else { Device::Cuda(0) };
                    prop_assert_eq!(*d, want);
                }
            }
            Err(Error::OverBudget { device, needed, budget, shortfall }) => {
                prop_assert_eq!(device, Device::Cuda(0));
                prop_assert_eq!(needed, gpu_bytes);
                prop_assert_eq!((budget, shortfall), (limit, gpu_bytes - limit));
            }
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }
}
