//! The main job: load the model (4-bit while loading), wrap its linears with LoRA, tokenize the
//! data, train, and leave a PEFT adapter in `output_dir`. Under torchrun's variables (or `sft
//! launch`) the job runs as one rank of a data-parallel group (`dist`): rank 0 alone writes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use lora::Adapters;
use model_loader::CausalLm;
use report::{EvalLog, Reporter, TrainLog};
use sft::train::dpo::{Dpo, DpoEval};
use sft::train::{Checkpoint, Event, Outcome, Progress, Trainer, checkpoint};

use crate::plan::{Machine, RunPlan};
use crate::prefs::{self, PreferenceData};
use crate::prepare::{self, TrainData};

/// The run's data: SFT's token rows, or DPO's preference pairs.
#[allow(clippy::large_enum_variant, reason = "one value per run")]
enum RunData {
    Sft(TrainData),
    /// Training pairs, and eval pairs when the data has an eval split.
    Dpo(PreferenceData, Option<PreferenceData>),
}

impl RunData {
    /// Rows (SFT) or pairs (DPO).
    fn len(&self) -> usize {
        match self {
            RunData::Sft(d) => d.len(),
            RunData::Dpo(d, _) => d.len(),
        }
    }

    fn batch_size(&self) -> usize {
        match self {
            RunData::Sft(d) => d.batch_size(),
            RunData::Dpo(d, _) => d.batch_size(),
        }
    }

    fn batches_per_epoch(&self) -> usize {
        match self {
            RunData::Sft(d) => d.batches_per_epoch(),
            RunData::Dpo(d, _) => d.batches_per_epoch(),
        }
    }

    fn batches_per_rank(&self, world: usize) -> usize {
        match self {
            RunData::Sft(d) => d.batches_per_rank(world),
            RunData::Dpo(d, _) => d.batches_per_rank(world),
        }
    }
}

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

/// This process's place among the ranks training together (one rank without torchrun).
struct Ranks {
    group: Option<dist::ProcessGroup>,
    rank: usize,
    world: usize,
}

impl Ranks {
    /// Meet the other ranks (torchrun's variables); `ddp_timeout` bounds the rendezvous and every
    /// collective, so a dead or hung peer is an error, not a hang. GPUs sum over NCCL, CPUs over Gloo.
    fn join(plan: &RunPlan, machine: &Machine) -> Result<Ranks> {
        let timeout = plan.training.ddp_timeout;
        let backend = if plan.device.is_cuda() { dist::Backend::Nccl } else { dist::Backend::Gloo };
        let group = machine
            .dist
            .clone()
            .map(|env| dist::ProcessGroup::with_backend(env, timeout, backend))
            .transpose()
            .context("joining the other ranks")?;
        let (rank, world) = group.as_ref().map_or((0, 1), |g| (g.rank(), g.world_size()));
        if group.is_some() {
            tracing::info!("rank {rank} of {world} ({backend:?} on {:?}, timeout {timeout:?})", plan.device);
        }
        Ok(Ranks { group, rank, world })
    }

    /// Rank 0 writes the outputs, logs and evaluates.
    fn main(&self) -> bool {
        self.rank == 0
    }

    /// Wait for every rank (no-op alone).
    fn barrier(&self, what: &str) -> Result<()> {
        match &self.group {
            Some(g) => g.barrier().with_context(|| format!("waiting for {what}")),
            None => Ok(()),
        }
    }
}

/// Say how 16-bit matmuls will run, once.
fn announce_precision(plan: &RunPlan) {
    let opts = &plan.load;
    if opts.compute_dtype != opts.dtype {
        tracing::info!(
            "mixed precision: 4-bit linears compute in {:?}, the rest in {:?}",
            opts.compute_dtype,
            opts.dtype
        );
    }
    if let Some(kind) =
        [opts.dtype, opts.compute_dtype].into_iter().find(|k| quant::ops::matmul_in_f32(*k, plan.device))
    {
        tracing::info!(
            "this CPU has no native {kind:?} GEMMs: matmuls and attention run in f32 and are rounded to \
             {kind:?} (cpu_matmul: {}; `native` keeps torch's 16-bit kernels)",
            format!("{:?}", plan.cpu_matmul).to_lowercase()
        );
    }
}

/// The model as the plan loads it (4-bit while loading), with a progress bar over its layers.
fn load_model(plan: &RunPlan) -> Result<CausalLm> {
    let (dir, cfg, opts) = (&plan.model_dir, &plan.model_config, &plan.load);
    let pb = bar(cfg.shape.layers, "loading");
    let model = CausalLm::load(dir, opts, &mut |done, _| pb.set_position(done as u64))
        .with_context(|| format!("loading {}", dir.display()))?;
    pb.finish_and_clear();
    let linears = if opts.quantize_8bit.is_some() {
        "8-bit linears"
    } else if opts.quantize.is_some() || cfg.prequantized {
        "quantized linears"
    } else {
        "dense linears"
    };
    tracing::info!(
        "loaded {:?} from {} ({} layers, {linears}, dtype {:?})",
        cfg.architecture,
        dir.display(),
        cfg.shape.layers,
        opts.dtype
    );
    Ok(model)
}

/// The plan's adapter on `model`, from `lora_init_adapter` when given.
fn inject(plan: &RunPlan, model: &mut CausalLm) -> Result<Adapters> {
    let params = model.num_parameters();
    let (linears, tensors) = model.adaptable_mut();
    let mut adapters = lora::inject_with_modules(linears, tensors, &plan.lora, plan.training.seed)?;
    if !plan.lora.target_parameters.is_empty() {
        let made = adapters.add_params(&sft::params::slots(model), Some(plan.training.seed))?;
        sft::params::install(model, made)?;
    }
    if let Some(init) = &plan.lora_init_adapter {
        adapters
            .load_into(init)
            .with_context(|| format!("lora_init_adapter: starting from {}", init.display()))?;
        tracing::info!("adapter initialised from {}", init.display());
    }
    tracing::info!("{}", adapters.trainable_report(params));
    Ok(adapters)
}

/// The checkpoint the plan resumes from: the adapter copied into the tensors the optimizer will
/// hold, and the optimizer state and progress it saved.
fn resume_from(ck: &Path, adapters: &mut Adapters) -> Result<Checkpoint> {
    adapters.load_into(ck).with_context(|| format!("loading the adapter of {}", ck.display()))?;
    Ok(Checkpoint::load(ck)?)
}

/// Print each log and eval line, and hand it to the reporter (rank 0).
fn on_event<'r>(
    pb: &'r ProgressBar,
    reporter: &'r mut Option<Reporter>,
    total_steps: u64,
) -> impl FnMut(Event<'_>) + 'r {
    move |e| match e {
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
    }
}

/// What a finished run leaves in `out` besides what the reporter writes: the adapter, the trainer
/// state, the tokenizer files (and the recipe's chat template, as TRL saves it).
fn write_outputs(
    plan: &RunPlan,
    adapters: &Adapters,
    progress: &Progress,
    info: &sft::train::state::StateInfo,
    out: &Path,
) -> Result<()> {
    adapters.save(out).with_context(|| format!("saving the adapter to {}", out.display()))?;
    // transformers' TrainerState shape (`TrainerState.load_from_json` reads it).
    let state = sft::train::state::to_json(progress, info, None);
    report::write_atomic(&out.join("trainer_state.json"), serde_json::to_string_pretty(&state)?.as_bytes())?;
    let setup = plan.data.as_ref().context("a training plan has a data section")?;
    report::copy_tokenizer_files(&setup.tokenizer_dir, out)?;
    if let Some(t) = &plan.training.chat_template {
        report::write_atomic(&out.join("chat_template.jinja"), t.as_bytes())?;
    }
    Ok(())
}

/// How the main job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Every step trained and the outputs written.
    Done,
    /// Stopped by SIGINT or SIGTERM after saving a checkpoint to resume from.
    Interrupted,
}

/// The main job, as `plan` resolved it: data -> model -> adapters -> trainer -> outputs.
pub fn train(plan: &RunPlan, machine: &Machine) -> Result<Ended> {
    tracing::info!(device = ?plan.device, "training device");
    if let Some(why) =
        crate::plan::unused_gpu(Path::new("/"), cfg!(feature = "cuda"), tch::Cuda::is_available())
    {
        tracing::warn!("{why}");
    }
    plan.cpu_matmul.set();
    announce_precision(plan);
    tch::manual_seed(plan.training.seed as i64);
    let ranks = Ranks::join(plan, machine)?;
    let main = ranks.main();

    // Data first, a bad row failing before minutes of loading; rank 0 fills the cache, the others read it.
    if !main {
        ranks.barrier("rank 0 to prepare the data")?;
    }
    let setup = plan.data.as_ref().context("a training plan has a data section")?;
    let mut data = match &plan.dpo {
        Some(_) => {
            let (train, eval) = prefs::preferences(setup)?;
            RunData::Dpo(train, eval)
        }
        None => RunData::Sft(prepare::dataset(setup)?),
    };
    if main {
        ranks.barrier("the other ranks")?;
    }
    if data.batches_per_epoch() == 0 {
        bail!("the training set ({} rows) gives no batch of {}", data.len(), data.batch_size());
    }

    let mut model = load_model(plan)?;
    let mut adapters = inject(plan, &mut model)?;
    // DPO's reference, as TRL 1.16 makes it under PEFT: a frozen copy of the adapter the run starts
    // from (`lora_init_adapter`, e.g. the SFT adapter), else the base with the adapter off.
    // TRL copies it in the file's dtype before casting the trained adapter to bf16 (QLoRA), so
    // the reference computes in f32 then.
    let initial =
        match (&plan.dpo, &plan.lora_init_adapter) {
            (Some(_), Some(dir)) => Some(adapters.file_values(dir).with_context(|| {
                format!("reading the starting adapter {} for the reference", dir.display())
            })?),
            _ => None,
        };
    if let (RunData::Dpo(train, eval), Some(dpo)) = (&mut data, plan.dpo.as_ref().filter(|d| d.precompute)) {
        // As TRL: `precompute_ref_batch_size`, else each set's own batch size.
        let cache = plan.data.as_ref().and_then(|d| d.cache_dir.clone());
        for pairs in std::iter::once(train).chain(eval.as_mut()) {
            let pb = bar(pairs.len() as u64, "reference");
            let pass = prefs::ReferencePass {
                initial: initial.as_deref(),
                ld_alpha: dpo.objective.ld_alpha,
                batch_size: dpo.precompute_batch_size.unwrap_or(pairs.batch_size()),
                padding_free: pairs.padding_free(),
            };
            // Cached beside the tokenized pairs, keyed by what the pass depends on.
            let key = cache
                .as_deref()
                .map(|dir| {
                    prefs::reference_key(pairs.rows_key(), &plan.model_dir, &plan.load, &pass)
                        .map(|k| (dir, k))
                })
                .transpose()?;
            pairs.precompute_reference(&model, &adapters, &pass, key, &|n| pb.set_position(n))?;
            pb.finish_and_clear();
        }
        tracing::info!("reference log-probs precomputed");
    }
    let out = make_output_dir(plan, main)?;
    let resumed =
        plan.resume.as_deref().map(|ck| resume_from(ck, &mut adapters).map(|c| (ck, c))).transpose()?;
    if let Some(g) = &ranks.group {
        // Every rank starts from rank 0's adapter (as DDP broadcasts its parameters).
        tch::no_grad(|| -> Result<()> {
            for mut p in adapters.parameters() {
                g.broadcast(&mut p, 0).context("sharing rank 0's initial adapter")?;
            }
            Ok(())
        })?;
    }

    // Micro-batches this rank trains on per epoch (all of them in one process).
    let per_epoch = data.batches_per_rank(ranks.world);
    let steps_per_epoch = per_epoch.div_ceil(plan.grad_accum) as u64;
    let topts = plan.training.options(steps_per_epoch, plan.grad_accum, out.clone())?;
    let total_steps = topts.total_steps;
    let mut trainer = Trainer::new(&model, adapters.parameters(), topts)?;
    trainer.group = ranks.group.as_ref();
    if let Some((ck, mut c)) = resumed {
        c.place(steps_per_epoch, plan.grad_accum, ranks.world as u64);
        let from_trainer = c.origin == sft::train::state::Origin::Transformers;
        match (&c.optimizer_problem, trainer.optimizer.load_state(&c.optimizer, c.optimizer_step)) {
            (None, Ok(())) => {}
            (Some(problem), _) => {
                tracing::warn!("resuming with a fresh optimizer (AdamW's moments at zero): {problem}")
            }
            (None, Err(problem)) if from_trainer => tracing::warn!(
                "resuming with a fresh optimizer (AdamW's moments at zero): the Trainer's optimizer.pt does not fit these adapters: {problem}"
            ),
            (None, Err(problem)) => bail!("{}: {problem}", ck.display()),
        }
        trainer.progress = c.progress;
        tracing::info!(
            "resumed from {} at step {}{}",
            ck.display(),
            trainer.progress.global_step,
            if from_trainer {
                format!(
                    " (a Trainer checkpoint: epoch {}, micro-batch {} of the Trainer's order)",
                    trainer.progress.epoch, trainer.progress.batch_in_epoch
                )
            } else {
                String::new()
            }
        );
    }
    tracing::info!(
        "training: {} rows, {per_epoch} micro-batches of {} per epoch{}, {} accumulation -> {total_steps} steps ({} warmup)",
        data.len(),
        data.batch_size(),
        if ranks.world > 1 { format!(" on each of {} ranks", ranks.world) } else { String::new() },
        plan.grad_accum,
        trainer.opts.schedule.warmup()
    );

    let (rank, world, data_seed) = (ranks.rank, ranks.world, plan.training.data_seed);
    // Rank 0 alone evaluates (over the whole eval set).
    let eval = match &data {
        RunData::Sft(d) if main => d.eval_batches(),
        _ => Vec::new(),
    };
    let has_eval = match &data {
        RunData::Sft(_) => !eval.is_empty(),
        RunData::Dpo(_, e) => e.as_ref().is_some_and(|e| e.len() > 0),
    };
    if main && trainer.opts.eval_steps.is_some() && !has_eval {
        tracing::warn!("eval_strategy is set but the data has no eval split; not evaluating");
    }
    let mut ro = plan.report.clone();
    ro.resume_from_step = plan.resume.is_some().then_some(trainer.progress.global_step);
    let mut reporter = if main { Some(Reporter::new(&out, ro)?) } else { None };
    if let Some(d) = reporter.as_ref().and_then(Reporter::logging_dir) {
        tracing::info!("TensorBoard: tensorboard --logdir {}", d.display());
    }
    // Ctrl-C (SIGINT) or SIGTERM (a scheduler ending the job): finish the current step, save a
    // checkpoint, exit cleanly.
    let stop = trainer.stop.clone();
    if let Err(e) = ctrlc::set_handler(move || stop.store(true, std::sync::atomic::Ordering::SeqCst)) {
        tracing::debug!("no Ctrl-C handler: {e}");
    }
    let pb = bar(total_steps, "training");
    pb.set_position(trainer.progress.global_step);
    let save = |d: &Path| adapters.save(d).map_err(|e| e.to_string());
    // DPOConfig's `disable_dropout` keeps the adapters' dropout off (PEFT's modules set to p = 0).
    adapters.set_training(!plan.dpo.as_ref().is_some_and(|d| d.disable_dropout));
    let mut events = on_event(&pb, &mut reporter, total_steps);
    let outcome = match (&data, &plan.dpo) {
        (RunData::Dpo(pairs, eval_pairs), Some(dpo)) => {
            let objective = Dpo {
                objective: dpo.objective.clone(),
                adapters: &adapters,
                initial,
                router_aux_loss_coef: trainer.router_aux_loss_coef(),
            };
            let mut epoch_batches = |epoch: u64| pairs.epoch_shard(epoch, data_seed, rank, world);
            // Rank 0 alone evaluates (over the whole eval set, in order).
            let batches = match eval_pairs {
                Some(e) if main => e.epoch_shard(0, data_seed, 0, 1),
                _ => Vec::new(),
            };
            let eval = DpoEval { dpo: &objective, batches };
            trainer.train_objective(&objective, &mut epoch_batches, &eval, &save, &mut events)?
        }
        (RunData::Sft(rows), _) => {
            let mut epoch_batches = |epoch: u64| rows.epoch_shard(epoch, data_seed, rank, world);
            trainer.train(&mut epoch_batches, &eval, &save, &mut events)?
        }
        (RunData::Dpo(..), None) => unreachable!("preference data is read for a DPO plan only"),
    };
    drop(events);
    pb.finish_and_clear();
    adapters.set_training(false);
    if let Outcome::Interrupted(dir) = outcome {
        tracing::warn!(
            "interrupted at step {}: checkpoint saved in {}; continue with --resume_from_checkpoint {}",
            trainer.progress.global_step,
            dir.display(),
            dir.display()
        );
        return Ok(Ended::Interrupted);
    }

    // `load_best_model_at_end`: the run ends on the best checkpoint's adapter, as the Trainer's.
    if let Some(best) = trainer.opts.best.as_ref().filter(|b| b.load_at_end)
        && let Some(dir) = trainer.progress.best_model_checkpoint.clone()
    {
        tracing::info!(
            "loading the best adapter from {dir} ({} {})",
            best.metric,
            trainer.progress.best_metric.unwrap_or(f64::NAN)
        );
        adapters.load_into(Path::new(&dir)).with_context(|| format!("loading the best checkpoint {dir}"))?;
    }

    // Rank 0 writes the outputs while the others wait.
    if let Some(reporter) = reporter {
        write_outputs(plan, &adapters, &trainer.progress, &trainer.opts.state, &out)?;
        let mut summary = plan.summary.clone();
        summary.set_run_length(total_steps, data.len() as u64);
        let done = reporter.finish(&summary)?;
        tracing::info!(
            "adapter written to {} (train_loss {:.4}; {} files: adapter, tokenizer, recipe.yaml, metrics, loss.png, README.md)",
            out.display(),
            done.metrics.get("train_loss").copied().unwrap_or(f64::NAN),
            done.files.len()
        );
    }
    ranks.barrier("every rank to finish")?;
    if let RunData::Sft(rows) = &data
        && let Some(prompt) = rows.sample_prompt.as_deref().filter(|_| main)
    {
        sample(&model, &rows.tokenizer, prompt)?;
    }
    Ok(Ended::Done)
}

/// Print a short greedy generation from the trained model, so a run ends showing what it learned.
fn sample(model: &CausalLm, tok: &data::Tokenizer, prompt: &str) -> Result<()> {
    let ids: Vec<i64> =
        tok.encode(prompt, false).map_err(anyhow::Error::msg)?.into_iter().map(i64::from).collect();
    let mut stop: Vec<i64> = tok.eos_token_id().map(i64::from).into_iter().collect();
    stop.extend(tok.token_to_id("<|im_end|>").map(i64::from));
    // KV-cached: each new token runs one position through the model, not the whole sequence.
    let sampling = model_loader::Sampling { max_new_tokens: 48, stop_ids: stop, ..Default::default() };
    let new = model.generate(&ids, &sampling)?.tokens;
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
