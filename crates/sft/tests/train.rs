//! The training loop on the shipped tiny model with LoRA: gradient checkpointing changes no
//! gradient, the loss falls, the window loss is normalised over its label tokens, and a run
//! resumed from a checkpoint ends where an uninterrupted one does; a diverged SFT or DPO loss
//! (training or eval) stops the run naming the step.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::{Path, PathBuf};

use model_loader::{CausalLm, LoadOptions};
use quant::QuantType;
use quant::ops::QuantizeOptions;
use sft::train::{
    AdamWConfig, Checkpoint, DeviceBatch, EpochBatches, Event, Schedule, TrainOptions, Trainer,
    forward_backward,
};
use tch::{Kind, Tensor};

/// torch's generator is global to the process: tests that reseed it for dropout take turns.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nibble-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn model_4bit() -> CausalLm {
    let opts = LoadOptions {
        quantize: Some(QuantizeOptions { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true }),
        ..LoadOptions::default()
    };
    CausalLm::load(&tiny(), &opts, &mut |_, _| {}).unwrap()
}

fn adapters(model: &mut CausalLm, dropout: f64) -> lora::Adapters {
    let mut cfg = lora::LoraConfig::new(4, 8.0, lora::TargetModules::AllLinear);
    cfg.dropout = dropout;
    cfg.init = lora::LoraInit::False; // non-zero B, so every adapter gets a gradient at once
    lora::inject(model.linears_mut(), &cfg, 3).unwrap()
}

/// A batch of random tokens, the last two of each row masked out of the loss.
fn batch(seed: i64, rows: i64, cols: i64) -> (DeviceBatch, u64) {
    tch::manual_seed(seed);
    let ids = Tensor::randint_low(6, 226, [rows, cols], (Kind::Int64, tch::Device::Cpu));
    let labels = ids.copy();
    let _ = labels.narrow(1, cols - 2, 2).fill_(-100);
    let count = labels.narrow(1, 1, cols - 1).ne(-100).sum(Kind::Int64).int64_value(&[]) as u64;
    let pos = Tensor::arange(cols, (Kind::Int64, tch::Device::Cpu)).expand([rows, cols], false).contiguous();
    let num_tokens = (rows * cols) as u64;
    (DeviceBatch { input_ids: ids, labels, position_ids: pos, segment_ids: None, num_tokens }, count)
}

fn grads(a: &lora::Adapters) -> Vec<Tensor> {
    a.parameters().iter().map(|p| p.grad().copy()).collect()
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let _rng = rng_lock();
    let mut model = model_4bit();
    let a = adapters(&mut model, 0.1);
    let (b, n) = batch(1, 2, 24);
    let l1 = forward_backward(&model, &b, n as f64, false, 99).unwrap().loss;
    let g1 = grads(&a);
    for p in a.parameters() {
        let _ = p.grad().zero_();
    }
    let l2 = forward_backward(&model, &b, n as f64, true, 99).unwrap().loss;
    let g2 = grads(&a);
    assert!((l1 - l2).abs() < 1e-6, "loss {l1} vs {l2}");
    assert_eq!(g1.len(), 2 * 14);
    for (x, y) in g1.iter().zip(&g2) {
        let scale = x.abs().max().double_value(&[]).max(1e-12);
        let err = (x - y).abs().max().double_value(&[]) / scale;
        assert!(err < 1e-5, "gradient differs by {err:e}");
        assert!(scale > 0.0, "an adapter got no gradient");
    }
}

#[test]
fn loss_is_normalised_over_the_window_tokens() {
    let _rng = rng_lock();
    let mut model = model_4bit();
    let _a = adapters(&mut model, 0.0);
    let (b, n) = batch(2, 3, 16);
    // Half the count doubles the reported share.
    let l1 = forward_backward(&model, &b, n as f64, false, 1).unwrap().loss;
    let l2 = forward_backward(&model, &b, n as f64 / 2.0, false, 1).unwrap().loss;
    assert!((l2 - 2.0 * l1).abs() < 1e-5 * l1.abs());
    // And the per-token mean is near ln(vocab) for an untrained tiny model on random tokens.
    assert!(l1 > 3.0 && l1 < 8.0, "{l1}");
}

fn options(out: &Path, total: u64, save_steps: Option<u64>) -> TrainOptions {
    TrainOptions {
        total_steps: total,
        grad_accum: 2,
        learning_rate: 5e-3,
        schedule: Schedule::new(&config::types::Scheduler::Cosine, None, 5e-3, 0.25, total).unwrap(),
        adam: AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, fused: true },
        max_grad_norm: 1.0,
        logging_steps: 1,
        logging_first_step: false,
        save_steps,
        save_total_limit: Some(2),
        output_dir: out.to_owned(),
        gradient_checkpointing: false,
        seed: 5,
        eval_steps: None,
        eval_on_start: false,
        neftune_noise_alpha: None,
        router_aux_loss_coef: None,
        state: Default::default(),
        best: None,
    }
}

fn epoch_data(epoch: u64) -> EpochBatches {
    (0..5).map(|i| batch(100 * epoch as i64 + i, 2, 20)).collect()
}

fn run(out: &Path, total: u64, save_steps: Option<u64>, resume: Option<&Path>) -> (Vec<f64>, Vec<Tensor>) {
    let mut model = model_4bit();
    let mut a = adapters(&mut model, 0.05);
    if let Some(ck) = resume {
        a.load_into(ck).unwrap();
    }
    let mut trainer = Trainer::new(&model, a.parameters(), options(out, total, save_steps)).unwrap();
    if let Some(ck) = resume {
        let c = Checkpoint::load(ck).unwrap();
        trainer.optimizer.load_state(&c.optimizer, c.optimizer_step).unwrap();
        trainer.progress = c.progress;
    }
    let save = |d: &Path| a.save(d).map_err(|e| e.to_string());
    let mut losses = Vec::new();
    trainer
        .train(&mut epoch_data, &[], &save, &mut |e| {
            if let Event::Train(e) = e {
                losses.push(e.loss);
            }
        })
        .unwrap();
    (losses, a.parameters().iter().map(Tensor::copy).collect())
}

#[test]
fn training_lowers_the_loss_and_resume_matches_an_uninterrupted_run() {
    let _rng = rng_lock();
    let out = scratch("resume");
    // 6 steps over 5 micro-batches per epoch with accumulation 2: windows cross an epoch end.
    let (losses, full) = run(&out, 6, Some(2), None);
    assert_eq!(losses.len(), 6);
    assert!(losses.iter().all(|l| l.is_finite()));
    // As transformers' Trainer, the last step is saved too; save_total_limit 2 keeps the two
    // newest of checkpoint-2, -4 and -6.
    let kept: Vec<String> = sft::train::checkpoint::list(&out)
        .unwrap()
        .into_iter()
        .map(|(s, _)| format!("checkpoint-{s}"))
        .collect();
    assert_eq!(kept, ["checkpoint-4", "checkpoint-6"]);
    let (resumed_losses, resumed) = run(&scratch("resume-2"), 6, None, Some(&out.join("checkpoint-4")));
    assert_eq!(&resumed_losses[..], &losses[4..], "losses after resuming");
    for (x, y) in full.iter().zip(&resumed) {
        assert!(x.equal(y), "resumed adapter differs from the uninterrupted one");
    }
}

/// A diverged evaluation stops the run with the step named, as a diverged training loss does.
#[test]
fn a_non_finite_eval_loss_is_an_error_naming_the_step() {
    let _rng = rng_lock();
    let mut model = model_4bit();
    let a = adapters(&mut model, 0.0);
    let out = scratch("nan-eval");
    let trainer = Trainer::new(&model, a.parameters(), options(&out, 1, None)).unwrap();
    let eval = vec![batch(5, 2, 8)];
    trainer.evaluate(&eval, 0.0).expect("a finite eval loss");
    // A NaN in v_proj's B reaches the logits (torch's CPU attention kernel passes over NaN
    // queries, so q_proj would not show it).
    tch::no_grad(|| {
        let _ = a.parameters()[5].shallow_clone().fill_(f64::NAN);
    });
    let e = trainer.evaluate(&eval, 0.0).expect_err("NaN adapter");
    assert!(matches!(e, sft::Error::NonFiniteEval { step: 0, .. }), "{e}");
    assert!(e.to_string().contains("step 0: the eval loss is NaN"), "{e}");
}

#[test]
fn repeated_batches_are_learned() {
    let _rng = rng_lock();
    let mut model = model_4bit();
    let a = adapters(&mut model, 0.0);
    let out = scratch("learn");
    let mut opts = options(&out, 12, None);
    opts.learning_rate = 2e-2;
    opts.schedule = Schedule::new(&config::types::Scheduler::Constant, None, 2e-2, 0.0, 12).unwrap();
    let mut trainer = Trainer::new(&model, a.parameters(), opts).unwrap();
    let mut same = |_e: u64| -> EpochBatches { vec![batch(7, 2, 20), batch(8, 2, 20)] };
    let mut losses = Vec::new();
    trainer
        .train(&mut same, &[], &|_d: &Path| Ok(()), &mut |e| {
            if let Event::Train(e) = e {
                losses.push(e.loss);
            }
        })
        .unwrap();
    // Two repeated batches of random tokens: the loss must fall well below where it started.
    assert!(losses[11] < 0.8 * losses[0], "loss did not fall: {losses:?}");
    assert!(losses[8..].iter().all(|l| *l < losses[0]), "loss came back up: {losses:?}");
}

#[test]
fn neftune_noise_changes_the_loss_and_checkpointing_replays_it() {
    let _rng = rng_lock();
    let mut model = model_4bit();
    let a = adapters(&mut model, 0.0);
    let (b, n) = batch(3, 2, 24);
    let clean = sft::train::forward_backward_with(&model, &b, n as f64, false, 7, None, None).unwrap().loss;
    let noisy =
        sft::train::forward_backward_with(&model, &b, n as f64, false, 7, Some(5.0), None).unwrap().loss;
    assert!((clean - noisy).abs() > 1e-4, "NEFTune noise had no effect: {clean} vs {noisy}");
    for p in a.parameters() {
        let _ = p.grad().zero_();
    }
    let g1 = {
        sft::train::forward_backward_with(&model, &b, n as f64, false, 7, Some(5.0), None).unwrap();
        grads(&a)
    };
    for p in a.parameters() {
        let _ = p.grad().zero_();
    }
    sft::train::forward_backward_with(&model, &b, n as f64, true, 7, Some(5.0), None).unwrap();
    for (x, y) in g1.iter().zip(&grads(&a)) {
        let err = (x - y).abs().max().double_value(&[]) / x.abs().max().double_value(&[]).max(1e-12);
        assert!(err < 1e-5, "checkpointed recompute saw different noise: {err:e}");
    }
}

/// A DPO micro-batch of `pairs` random pairs: a shared 4-token prompt, then 4 completion tokens
/// each.
fn dpo_batch(seed: i64, pairs: i64) -> (sft::train::dpo::DpoMicroBatch, u64) {
    tch::manual_seed(seed);
    let ids = Tensor::randint_low(6, 226, [2 * pairs, 8], (Kind::Int64, tch::Device::Cpu));
    let prompt = ids.narrow(0, 0, pairs).narrow(1, 0, 4).copy();
    ids.narrow(0, pairs, pairs).narrow(1, 0, 4).copy_(&prompt);
    let mask = Tensor::cat(
        &[
            Tensor::zeros([2 * pairs, 4], (Kind::Int64, tch::Device::Cpu)),
            Tensor::ones([2 * pairs, 4], (Kind::Int64, tch::Device::Cpu)),
        ],
        1,
    );
    let batch = sft::train::dpo::DpoBatch {
        input_ids: ids,
        completion_mask: mask,
        segment_ids: None,
        skip_padding: false,
    };
    (sft::train::dpo::DpoMicroBatch { batch, reference: None, tokens: (16 * pairs) as u64 }, pairs as u64)
}

/// A diverged DPO loss (training or eval) stops the run naming the step, as SFT's does.
#[test]
fn a_non_finite_dpo_loss_is_an_error_naming_the_step() {
    use sft::train::Evaluator;
    use sft::train::dpo::{Dpo, DpoEval, DpoObjective};
    let _rng = rng_lock();
    let mut model = model_4bit();
    let a = adapters(&mut model, 0.0);
    let out = scratch("nan-dpo");
    let dpo = Dpo {
        objective: DpoObjective::default(),
        adapters: &a,
        initial: Some(a.snapshot().unwrap()),
        router_aux_loss_coef: None,
    };
    let eval = DpoEval { dpo: &dpo, batches: vec![dpo_batch(3, 2)] };
    let e = eval.evaluate(&model, 0, 0.0).expect("a finite eval loss");
    // The policy is the reference here: every reward is 0 and the sigmoid loss is ln 2.
    assert!((e.eval_loss - std::f64::consts::LN_2).abs() < 1e-6, "{e:?}");
    assert_eq!(e.metrics.get("eval_rewards/margins"), Some(&0.0));
    assert!(e.metrics.contains_key("eval_logits/chosen") && e.eval_mean_token_accuracy >= 0.0);
    tch::no_grad(|| {
        let _ = a.parameters()[5].shallow_clone().fill_(f64::NAN);
    });
    let err = eval.evaluate(&model, 0, 0.0).expect_err("NaN adapter");
    assert!(matches!(err, sft::Error::NonFiniteEval { step: 0, .. }), "{err}");
    let mut trainer = Trainer::new(&model, a.parameters(), options(&out, 2, None)).unwrap();
    let save = |d: &Path| a.save(d).map_err(|e| e.to_string());
    let mut batches = |_: u64| vec![dpo_batch(4, 2), dpo_batch(5, 2)];
    let no_eval = DpoEval { dpo: &dpo, batches: Vec::new() };
    let err =
        trainer.train_objective(&dpo, &mut batches, &no_eval, &save, &mut |_| {}).expect_err("NaN loss");
    assert!(matches!(err, sft::Error::NonFinite { step: 1, .. }), "{err}");
}

/// DPO on a mixture of experts adds the router's load-balancing loss as TRL's DPOTrainer does
/// (`coef * aux` on the policy's loss, divided like it): the micro-batch's loss grows by
/// `coef * aux * scale`, with `aux` over the concatenated chosen and rejected rows and padding
/// masked, and the adapters' gradients by that term's own gradient.
#[test]
fn dpo_on_a_mixture_adds_the_router_loss() {
    use sft::train::Objective;
    use sft::train::dpo::{Dpo, DpoObjective};
    use sft::train::router::RouterLoss;
    let _rng = rng_lock();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/families/mixtral/model");
    let mut model = CausalLm::load(&dir, &LoadOptions::default(), &mut |_, _| {}).unwrap();
    let mut cfg = lora::LoraConfig::new(4, 8.0, lora::TargetModules::AllLinear);
    cfg.init = lora::LoraInit::False;
    let a = lora::inject(model.linears_mut(), &cfg, 3).unwrap();
    // Two pairs, the second row of each half padded at its end (segment -1).
    let (mut mb, _) = dpo_batch(11, 2);
    let seg = Tensor::zeros([4, 8], (Kind::Int64, tch::Device::Cpu));
    let _ = seg.narrow(0, 1, 1).narrow(1, 6, 2).fill_(-1);
    let _ = seg.narrow(0, 3, 1).narrow(1, 6, 2).fill_(-1);
    mb.batch.segment_ids = Some(seg.shallow_clone());
    let ctx = sft::train::MicroContext {
        window_items: 1.0,
        grad_accum: 2,
        world: 1,
        checkpointing: false,
        seed: 5,
        neftune_alpha: None,
    };
    let step = |coef: Option<f64>| {
        for p in a.parameters() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let dpo = Dpo {
            objective: DpoObjective::default(),
            adapters: &a,
            initial: None,
            router_aux_loss_coef: coef,
        };
        let m = dpo.step(&model, &mb, &ctx).unwrap();
        (m, grads(&a))
    };
    let (plain, g0) = step(None);
    let (routed, g1) = step(Some(0.3));
    assert_eq!(plain.metrics.len() + 1, routed.metrics.len(), "aux_loss is logged");
    // The router loss by itself, on the same rows: every layer's router over the policy's forward.
    let (experts, top_k) = model.routing().unwrap();
    let mask = seg.ge(0).to_kind(Kind::Float).reshape([-1]);
    let loss =
        RouterLoss { experts, top_k, mask: Some(mask), scale: 0.3 / 2.0, value: std::cell::Cell::new(None) };
    let ids = &mb.batch.input_ids;
    let pos = Tensor::arange(8, (Kind::Int64, tch::Device::Cpu)).expand([4, 8], false).contiguous();
    let ctx_l = model.context(&pos, Some(&seg)).unwrap();
    let mut h = model.embed(ids).unwrap();
    let mut logits = Vec::new();
    for i in 0..model.num_layers() {
        let (next, l) = model.layer_routed(i, &h, &ctx_l).unwrap();
        logits.push(l.unwrap());
        h = next;
    }
    let aux = {
        let mut c = loss.counts(tch::Device::Cpu).unwrap();
        for l in &logits {
            loss.add(&mut c, l).unwrap();
        }
        let v = loss.value_of(&c).unwrap();
        for p in a.parameters() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let term =
            logits.iter().map(|l| loss.layer_term(&c, l).unwrap()).fold(Tensor::from(0.0f32), |x, y| x + y);
        term.backward();
        v
    };
    let want = plain.loss + 0.3 / 2.0 * aux;
    assert!((routed.loss - want).abs() < 1e-7 * want.abs().max(1.0), "{} vs {want}", routed.loss);
    assert!((routed.metrics.last().unwrap().unwrap() - aux).abs() < 1e-9);
    // Gradients: the router loss's own added to the DPO loss's.
    let g_aux = grads(&a);
    let mut moved = 0.0f64;
    for ((x, y), z) in g0.iter().zip(&g1).zip(&g_aux) {
        let d = (y - x - z).abs().max().double_value(&[]);
        assert!(d < 1e-6 * (1.0 + z.abs().max().double_value(&[])), "gradient off by {d}");
        moved = moved.max(z.abs().max().double_value(&[]));
    }
    assert!(moved > 1e-6, "the router loss moves the attention adapters");
}

/// An evaluation of a mixture with its router loss, as TRL's: each batch's token-mean loss plus
/// `coef * aux` (no accumulation to divide by), weighted by rows, and `eval_aux_loss` the mean of
/// the batches' `aux`.
#[test]
fn evaluating_a_mixture_adds_each_batchs_router_loss() {
    use sft::train::Evaluator;
    use sft::train::router::RouterLoss;
    let _rng = rng_lock();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/families/mixtral/model");
    let model = CausalLm::load(&dir, &LoadOptions::default(), &mut |_, _| {}).unwrap();
    let (mut b1, n1) = batch(21, 3, 9);
    let seg = Tensor::zeros([3, 9], (Kind::Int64, tch::Device::Cpu));
    let _ = seg.narrow(0, 2, 1).narrow(1, 6, 3).fill_(-1);
    b1.segment_ids = Some(seg.shallow_clone());
    let b2 = batch(22, 2, 7);
    let eval = vec![(b1, n1), b2];
    let plain = sft::train::SftEval(&eval, None).evaluate(&model, 0, 0.0).unwrap();
    let routed = sft::train::SftEval(&eval, Some(0.25)).evaluate(&model, 0, 0.0).unwrap();
    // Each batch's aux on its own, its padding masked.
    let (experts, top_k) = model.routing().unwrap();
    // A batch's router loss under `mask` (and `scale`), from an evaluation's forward.
    let aux_of = |b: &DeviceBatch, mask: Option<Tensor>, scale: f64| {
        let r = RouterLoss { experts, top_k, mask, scale, value: std::cell::Cell::new(None) };
        let routed = sft::train::hidden_states_routed(
            &model,
            &b.input_ids,
            Some(&b.position_ids),
            b.segment_ids.as_ref(),
            Some(&r),
            false,
        );
        routed.unwrap().1.unwrap()
    };
    let aux: Vec<f64> = eval
        .iter()
        .map(|(b, _)| {
            aux_of(b, b.segment_ids.as_ref().map(|s| s.ge(0).to_kind(Kind::Float).reshape([-1])), 0.25)
        })
        .collect();
    assert!(aux[0] != aux[1]);
    let want = plain.eval_loss + 0.25 * (3.0 * aux[0] + 2.0 * aux[1]) / 5.0;
    assert!((routed.eval_loss - want).abs() < 1e-9, "{} vs {want}", routed.eval_loss);
    let mean = routed.metrics["eval_aux_loss"];
    assert!((mean - (aux[0] + aux[1]) / 2.0).abs() < 1e-12);
    // Padding is masked: the same rows without the mask give another aux.
    let all = aux_of(&eval[0].0, None, 1.0);
    assert!((all - aux[0]).abs() > 1e-6);
}
