//! The main job: load the model (4-bit while loading), wrap its linears with LoRA, tokenize the
//! data, train, and leave a PEFT adapter in `output_dir`. Under torchrun's variables (or `sft
//! launch`) the job runs as one rank of a data-parallel group (`dist`): rank 0 alone writes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use config::Recipe;
use indicatif::{ProgressBar, ProgressStyle};
use model_loader::CausalLm;
use report::{EvalLog, Reporter, RunSummary, TrainLog};
use sft::train::{AdamWConfig, Checkpoint, Event, Outcome, Schedule, TrainOptions, Trainer, checkpoint};

use crate::plan::{Machine, RunPlan};
use crate::prepare;

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::new(len)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

/// Make the plan's output directory: a fresh run that replaces a previous one (the plan allowed
/// it: `overwrite_output_dir`) removes its checkpoints first. Only rank 0 (`main`) writes.
fn make_output_dir(plan: &RunPlan, main: bool) -> Result<PathBuf> {
    let dir = plan.output_dir.clone();
    if !main {
        return Ok(dir);
    }
    if plan.replaces_previous {
        for (_, ck) in checkpoint::list(&dir)? {
            std::fs::remove_dir_all(&ck).with_context(|| format!("removing {}", ck.display()))?;
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating output_dir {}", dir.display()))?;
    Ok(dir)
}

/// Eval cadence from `eval_strategy` / `eval_steps` (which defaults to `logging_steps`).
fn eval_steps(recipe: &Recipe, logging_steps: u64, steps_per_epoch: u64, total: u64) -> Option<u64> {
    let t = &recipe.training;
    match t.eval_strategy {
        config::types::Interval::No => None,
        config::types::Interval::Epoch => Some(steps_per_epoch),
        config::types::Interval::Steps => Some(match t.eval_steps {
            Some(f) if f < 1.0 => (f * total as f64).ceil() as u64,
            Some(f) => f as u64,
            None => logging_steps,
        }),
    }
}

/// The main job, as `plan` resolved it.
pub fn train(plan: &RunPlan, machine: &Machine) -> Result<()> {
    let recipe = &plan.recipe;
    let (dir, cfg, device) = (&plan.model_dir, &plan.model_config, plan.device);
    tracing::info!(?device, "training device");
    plan.cpu_matmul.set();
    let opts = &plan.load;
    if opts.compute_dtype != opts.dtype {
        tracing::info!(
            "mixed precision: 4-bit linears compute in {:?}, the rest in {:?}",
            opts.compute_dtype,
            opts.dtype
        );
    }
    for kind in [opts.dtype, opts.compute_dtype] {
        if quant::ops::matmul_in_f32(kind, device) {
            tracing::info!(
                "this CPU has no native {kind:?} GEMMs: matmuls and attention run in f32 and are rounded to \
                 {kind:?} (cpu_matmul: {}; `native` keeps torch's 16-bit kernels)",
                recipe.training.cpu_matmul
            );
            break;
        }
    }
    tch::manual_seed(recipe.training.seed as i64);
    // Several ranks (torchrun's variables): meet the others first; `ddp_timeout` bounds the
    // rendezvous and every collective, so a dead or hung peer is an error, not a hang. Ranks on
    // GPUs sum over NCCL, CPU ranks over Gloo.
    let timeout = Duration::from_secs(u64::try_from(recipe.training.ddp_timeout).unwrap_or(0).max(1));
    let backend = if device.is_cuda() { dist::Backend::Nccl } else { dist::Backend::Gloo };
    let group = machine
        .dist
        .clone()
        .map(|env| dist::ProcessGroup::with_backend(env, timeout, backend))
        .transpose()
        .context("joining the other ranks")?;
    let (rank, world) = group.as_ref().map_or((0, 1), |g| (g.rank(), g.world_size()));
    let main = rank == 0;
    if let Some(g) = &group {
        tracing::info!("rank {rank} of {world} ({backend:?} on {device:?}, timeout {timeout:?})");
        // Rank 0 tokenizes (and fills the cache) first; the others then read the cache.
        if !main {
            g.barrier().context("waiting for rank 0 to prepare the data")?;
        }
    }

    // Data first: a bad row should fail before minutes of loading.
    let setup = plan.data.as_ref().context("a training plan has a data section")?;
    let data = prepare::dataset(setup)?;
    if let Some(g) = group.as_ref().filter(|_| main) {
        g.barrier().context("waiting for the other ranks")?;
    }

    let pb = bar(cfg.shape.layers, "loading");
    let mut model = CausalLm::load(dir, opts, &mut |done, _| pb.set_position(done as u64))
        .with_context(|| format!("loading {}", dir.display()))?;
    pb.finish_and_clear();
    tracing::info!(
        "loaded {:?} from {} ({} layers, {}, dtype {:?})",
        cfg.architecture,
        dir.display(),
        cfg.shape.layers,
        if opts.quantize_8bit.is_some() {
            "8-bit linears"
        } else if opts.quantize.is_some() || cfg.prequantized {
            "quantized linears"
        } else {
            "dense linears"
        },
        opts.dtype
    );
    let (linears, tensors) = model.adaptable_mut();
    let mut adapters = lora::inject_with_modules(linears, tensors, &plan.lora, recipe.training.seed)?;
    if let Some(init) = &plan.lora_init_adapter {
        adapters
            .load_into(init)
            .with_context(|| format!("lora_init_adapter: starting from {}", init.display()))?;
        tracing::info!("adapter initialised from {}", init.display());
    }
    tracing::info!("{}", adapters.trainable_report(model.num_parameters()));

    let resume = plan.resume.clone();
    let out = make_output_dir(plan, main)?;
    let t = &recipe.training;
    let ga = plan.grad_accum;
    if data.batches_per_epoch() == 0 {
        bail!("the training set ({} rows) gives no batch of {}", data.len(), data.batch_size());
    }
    // Micro-batches this rank trains on per epoch (all of them in one process).
    let per_epoch = data.batches_per_rank(world);
    let steps_per_epoch = per_epoch.div_ceil(ga) as u64;
    let total_steps = if t.max_steps > 0 {
        t.max_steps as u64
    } else {
        (t.num_train_epochs * steps_per_epoch as f64).ceil() as u64
    };
    let schedule = Schedule::new(
        &t.lr_scheduler_type,
        t.lr_scheduler_kwargs.as_ref(),
        t.learning_rate,
        t.warmup_steps,
        total_steps,
    )?;
    let save_steps = match t.save_strategy {
        config::types::SaveStrategy::Steps => Some(if t.save_steps < 1.0 {
            (t.save_steps * total_steps as f64).ceil() as u64
        } else {
            t.save_steps as u64
        }),
        config::types::SaveStrategy::Epoch => Some(steps_per_epoch),
        // `best` is refused when the run is planned.
        config::types::SaveStrategy::No | config::types::SaveStrategy::Best => None,
    };
    let logging_steps = match t.logging_strategy {
        config::types::Interval::No => 0,
        config::types::Interval::Epoch => steps_per_epoch,
        config::types::Interval::Steps if t.logging_steps < 1.0 => {
            (t.logging_steps * total_steps as f64).ceil() as u64
        }
        config::types::Interval::Steps => t.logging_steps as u64,
    };
    let topts = TrainOptions {
        total_steps,
        grad_accum: ga,
        learning_rate: t.learning_rate,
        schedule,
        adam: AdamWConfig {
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_epsilon,
            weight_decay: t.weight_decay,
        },
        max_grad_norm: t.max_grad_norm,
        logging_steps,
        logging_first_step: t.logging_first_step,
        save_steps,
        save_total_limit: t.save_total_limit.map(|l| l.max(1) as usize),
        output_dir: out.clone(),
        gradient_checkpointing: t.gradient_checkpointing,
        seed: t.seed,
        eval_steps: eval_steps(recipe, logging_steps, steps_per_epoch, total_steps),
        eval_on_start: t.eval_on_start,
        neftune_noise_alpha: t.neftune_noise_alpha.filter(|a| *a > 0.0),
    };
    if let Some(ck) = &resume {
        // Copied into the same tensors the optimizer holds.
        adapters.load_into(ck).with_context(|| format!("loading the adapter of {}", ck.display()))?;
    }
    if let Some(g) = &group {
        // Every rank starts from rank 0's adapter (as DDP broadcasts its parameters).
        tch::no_grad(|| -> Result<()> {
            for mut p in adapters.parameters() {
                g.broadcast(&mut p, 0).context("sharing rank 0's initial adapter")?;
            }
            Ok(())
        })?;
    }
    let mut trainer = Trainer::new(&model, adapters.parameters(), topts)?;
    trainer.group = group.as_ref();
    if let Some(ck) = &resume {
        let c = Checkpoint::load(ck)?;
        trainer.optimizer.load_state(&c.optimizer, c.optimizer_step).map_err(anyhow::Error::msg)?;
        trainer.progress = c.progress;
        tracing::info!("resumed from {} at step {}", ck.display(), trainer.progress.global_step);
    }
    tracing::info!(
        "training: {} rows, {} micro-batches of {} per epoch{}, {} accumulation -> {} steps ({} warmup)",
        data.len(),
        per_epoch,
        data.batch_size(),
        if world > 1 { format!(" on each of {world} ranks") } else { String::new() },
        ga,
        total_steps,
        trainer.opts.schedule.warmup()
    );
    let pb = bar(total_steps, "training");
    pb.set_position(trainer.progress.global_step);
    let save = |d: &Path| adapters.save(d).map_err(|e| e.to_string());
    // transformers seeds the sampler with data_seed when set.
    let data_seed = recipe.training.data_seed.unwrap_or(recipe.training.seed);
    let mut epoch_batches = |epoch: u64| data.epoch_shard(epoch, data_seed, rank, world);
    // Rank 0 alone evaluates (over the whole eval set).
    let eval = if main { data.eval_batches() } else { Vec::new() };
    if main && trainer.opts.eval_steps.is_some() && eval.is_empty() {
        tracing::warn!("eval_strategy is set but the data has no eval split; not evaluating");
    }
    let mut ro = plan.report.clone();
    ro.resume_from_step = resume.is_some().then_some(trainer.progress.global_step);
    let mut reporter = if main { Some(Reporter::new(&out, ro)?) } else { None };
    if let Some(d) = reporter.as_ref().and_then(Reporter::logging_dir) {
        tracing::info!("TensorBoard: tensorboard --logdir {}", d.display());
    }
    let mut on_event = |e: Event<'_>| match e {
        Event::Train(e) => {
            pb.set_position(e.step);
            let line = TrainLog::from(e);
            pb.suspend(|| tracing::info!("{}", report::format_log_line(&line, total_steps)));
            if let Some(Err(err)) = reporter.as_mut().map(|r| r.log_train(&line)) {
                tracing::warn!("{err}");
            }
        }
        Event::Eval(e) => {
            pb.suspend(|| {
                tracing::info!(
                    "eval at step {}: loss {:.4} acc {:.3} ({:.1}s)",
                    e.step,
                    e.eval_loss,
                    e.eval_mean_token_accuracy,
                    e.eval_runtime
                )
            });
            if let Some(Err(err)) = reporter.as_mut().map(|r| r.log_eval(&EvalLog::from(e))) {
                tracing::warn!("{err}");
            }
        }
        Event::Saved(dir) => pb.suspend(|| tracing::info!("checkpoint saved: {}", dir.display())),
    };
    // Ctrl-C (SIGINT) or SIGTERM (a scheduler ending the job): finish the current step, save a
    // checkpoint, exit cleanly.
    let stop = trainer.stop.clone();
    if let Err(e) = ctrlc::set_handler(move || stop.store(true, std::sync::atomic::Ordering::SeqCst)) {
        tracing::debug!("no Ctrl-C handler: {e}");
    }
    adapters.set_training(true);
    let outcome = trainer.train(&mut epoch_batches, &eval, &save, &mut on_event)?;
    pb.finish_and_clear();
    if let Outcome::Interrupted(dir) = outcome {
        tracing::warn!(
            "interrupted at step {}: checkpoint saved in {}; continue with --resume_from_checkpoint {}",
            trainer.progress.global_step,
            dir.display(),
            dir.display()
        );
        return Ok(());
    }
    adapters.set_training(false);
    let Some(reporter) = reporter else {
        // Not rank 0: wait until rank 0 has written the outputs, then leave.
        if let Some(g) = &group {
            g.barrier().context("waiting for rank 0 to write the adapter")?;
        }
        return Ok(());
    };
    adapters.save(&out).with_context(|| format!("saving the adapter to {}", out.display()))?;
    let state = serde_json::json!({
        "global_step": trainer.progress.global_step,
        "num_tokens": trainer.progress.num_tokens,
        "log_history": trainer.progress.log_history,
        "eval_history": trainer.progress.eval_history,
    });
    report::write_atomic(&out.join("trainer_state.json"), serde_json::to_string_pretty(&state)?.as_bytes())?;
    report::copy_tokenizer_files(&setup.tokenizer_dir, &out)?;
    if let Some(t) = &recipe.training.chat_template {
        // TRL saves the tokenizer with the recipe's template.
        report::write_atomic(&out.join("chat_template.jinja"), t.as_bytes())?;
    }
    let done = reporter.finish(&RunSummary::from_recipe(recipe, total_steps, data.len() as u64))?;
    tracing::info!(
        "adapter written to {} (train_loss {:.4}; {} files: adapter, tokenizer, recipe.yaml, metrics, loss.png, README.md)",
        out.display(),
        done.metrics.get("train_loss").copied().unwrap_or(f64::NAN),
        done.files.len()
    );
    if let Some(g) = &group {
        g.barrier().context("waiting for the other ranks to finish")?;
    }
    if let Some(prompt) = &data.sample_prompt {
        adapters.set_training(false);
        sample(&model, &data.tokenizer, prompt)?;
    }
    Ok(())
}

/// Print a short greedy generation from the trained model, so a run ends showing what it learned.
fn sample(model: &CausalLm, tok: &data::Tokenizer, prompt: &str) -> Result<()> {
    let ids: Vec<i64> =
        tok.encode(prompt, false).map_err(anyhow::Error::msg)?.into_iter().map(i64::from).collect();
    let mut stop: Vec<i64> = tok.eos_token_id().map(i64::from).into_iter().collect();
    stop.extend(tok.token_to_id("<|im_end|>").map(i64::from));
    let new = model.generate_greedy(&ids, 48, &stop)?;
    let new_u32: Vec<u32> = new.iter().map(|&t| t as u32).collect();
    let text = tok.inner().decode(&new_u32, true).map_err(|e| anyhow::anyhow!("decoding the sample: {e}"))?;
    #[allow(clippy::print_stdout)]
    {
        println!(
            "sample from the trained adapter:\n--- prompt ---\n{}\n--- generated ---\n{}",
            prompt.trim_end(),
            text.trim()
        );
    }
    Ok(())
}
