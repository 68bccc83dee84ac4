//! Putting adapters on a model's linears and keeping hold of them: the trainable tensors for the
//! optimizer, the train/eval switch, and PEFT's adapter directory (`adapter_config.json` +
//! `adapter_model.safetensors`) written and read.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use quant::linear::Linear;
use quant::state::RawTensor;
use tch::{Device, Kind, Tensor};

use crate::layer::{LoraLinear, Taken};
use crate::{CONFIG_FILE, Error, LoraConfig, TargetModules, WEIGHTS_FILE, init, target};

/// The prefix PEFT's `PeftModelForCausalLM` puts before module names in its state dict.
const KEY_PREFIX: &str = "base_model.model.";

/// One adapted module's trainable tensors (shallow copies: same storage and gradient as the
/// [`LoraLinear`]'s).
#[derive(Debug)]
pub struct AdapterModule {
    name: String,
    lora_a: Tensor,
    lora_b: Tensor,
}

impl AdapterModule {
    /// The module's name in the model (`model.layers.0.self_attn.q_proj`).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// A, `[r, in_features]`.
    pub fn lora_a(&self) -> &Tensor {
        &self.lora_a
    }
    /// B, `[out_features, r]`.
    pub fn lora_b(&self) -> &Tensor {
        &self.lora_b
    }
    /// The key PEFT saves A under (`base_model.model.<name>.lora_A.weight`).
    pub fn key_a(&self) -> String {
        format!("{KEY_PREFIX}{}.lora_A.weight", self.name)
    }
    /// The key PEFT saves B under.
    pub fn key_b(&self) -> String {
        format!("{KEY_PREFIX}{}.lora_B.weight", self.name)
    }
}

/// The adapters [`inject`] put on a model: their config, their tensors in module order, and the
/// train/eval flag every [`LoraLinear`] reads.
#[derive(Debug)]
pub struct Adapters {
    config: LoraConfig,
    modules: Vec<AdapterModule>,
    training: Arc<AtomicBool>,
}

/// Wrap each linear `cfg` targets in a [`LoraLinear`] with fresh A and B drawn from `seed` (per
/// module: the values depend only on the seed and the module's name), in training mode.
///
/// `linears` are the model's linears by module name (transformers' names); an untargeted one is
/// left as it is. Nothing is changed if an error is returned.
pub fn inject<'a>(
    linears: impl IntoIterator<Item = (String, &'a mut Box<dyn Linear>)>,
    cfg: &LoraConfig,
    seed: u64,
) -> Result<Adapters, Error> {
    inject_with(linears, cfg, Some(seed), true)
}

/// Wrap the linears a PEFT adapter directory targets and load its tensors, in eval mode, with
/// Float adapters (PEFT's default); for another dtype, [`LoraConfig::read`] the directory, set
/// `dtype`, [`inject`], then [`Adapters::load_into`].
pub fn inject_from<'a>(
    linears: impl IntoIterator<Item = (String, &'a mut Box<dyn Linear>)>,
    dir: &Path,
) -> Result<Adapters, Error> {
    let cfg = LoraConfig::read(dir)?;
    let mut linears: Vec<(String, &'a mut Box<dyn Linear>)> = linears.into_iter().collect();
    // Check the file against the targets before touching the model.
    let names: Vec<String> = linears.iter().map(|(n, _)| n.clone()).collect();
    let selected = target::select(&names, &cfg)?;
    let shapes: Vec<(String, i64, i64)> = linears
        .iter()
        .zip(&selected)
        .filter(|(_, s)| **s)
        .map(|((n, l), _)| (n.clone(), l.in_features(), l.out_features()))
        .collect();
    let tensors = read_weights(dir, &cfg, &shapes)?;
    let mut adapters = inject_with(linears.drain(..), &cfg, None, false)?;
    adapters.copy_in(&tensors)?;
    Ok(adapters)
}

fn inject_with<'a>(
    linears: impl IntoIterator<Item = (String, &'a mut Box<dyn Linear>)>,
    cfg: &LoraConfig,
    seed: Option<u64>,
    training: bool,
) -> Result<Adapters, Error> {
    cfg.validate()?;
    if !cfg.modules_to_save.is_empty() {
        tracing::warn!(
            modules = ?cfg.modules_to_save,
            "modules_to_save is recorded in adapter_config.json, but those modules are not trained or saved yet"
        );
    }
    let linears: Vec<(String, &'a mut Box<dyn Linear>)> = linears.into_iter().collect();
    let names: Vec<String> = linears.iter().map(|(n, _)| n.clone()).collect();
    let selected = target::select(&names, cfg)?;
    let training = Arc::new(AtomicBool::new(training));
    let r = cfg.r;
    // Make every tensor first, so an error leaves the model untouched.
    let mut made = Vec::new();
    for ((name, slot), _) in linears.into_iter().zip(&selected).filter(|(_, s)| **s) {
        let (inp, out, device) = (slot.in_features(), slot.out_features(), slot.device());
        let (a, b) = match seed {
            Some(seed) => init::initial(cfg.init, seed, &name, r, inp as usize, out as usize),
            None => (vec![0.0; r * inp as usize], vec![0.0; out as usize * r]),
        };
        let param = |v: Vec<f32>, shape: [i64; 2]| -> Result<Tensor, Error> {
            let t = Tensor::f_from_slice(&v)?.f_view(shape)?.f_to_kind(cfg.dtype)?.f_to_device(device)?;
            Ok(t.set_requires_grad(true))
        };
        let lora_a = param(a, [r as i64, inp])?;
        let lora_b = param(b, [out, r as i64])?;
        made.push((name, slot, lora_a, lora_b));
    }
    let mut modules = Vec::with_capacity(made.len());
    for (name, slot, lora_a, lora_b) in made {
        let module = AdapterModule { name, lora_a: lora_a.shallow_clone(), lora_b: lora_b.shallow_clone() };
        let base = std::mem::replace(slot, Box::new(Taken));
        *slot = Box::new(LoraLinear::new(base, lora_a, lora_b, cfg.scaling(), cfg.dropout, training.clone()));
        modules.push(module);
    }
    let adapters = Adapters { config: cfg.clone(), modules, training };
    tracing::info!(
        modules = adapters.modules.len(),
        r = cfg.r,
        alpha = cfg.alpha,
        scaling = cfg.scaling(),
        trainable = adapters.num_trainable(),
        "LoRA adapters injected"
    );
    Ok(adapters)
}

impl Adapters {
    /// The settings the adapters were made with.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Every adapted module, in the order the model offered them.
    pub fn modules(&self) -> &[AdapterModule] {
        &self.modules
    }

    /// The tensors to optimize (A then B per module), sharing storage and gradients with the
    /// model's layers.
    pub fn parameters(&self) -> Vec<Tensor> {
        self.modules.iter().flat_map(|m| [m.lora_a.shallow_clone(), m.lora_b.shallow_clone()]).collect()
    }

    /// [`Adapters::parameters`] with the keys PEFT saves them under, for checkpoints.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.modules
            .iter()
            .flat_map(|m| [(m.key_a(), m.lora_a.shallow_clone()), (m.key_b(), m.lora_b.shallow_clone())])
            .collect()
    }

    /// Turn dropout on (training) or off (evaluation) in every adapted layer.
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    /// Whether dropout is on.
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// The number of trainable elements (A and B of every module).
    pub fn num_trainable(&self) -> u64 {
        self.modules.iter().map(|m| (m.lora_a.numel() + m.lora_b.numel()) as u64).sum()
    }

    /// PEFT's `print_trainable_parameters` line:
    /// `trainable params: 1,024 || all params: 1,001,024 || trainable%: 0.1023`.
    ///
    /// `base_params` is the model's own parameter count, without adapters, counted as PEFT
    /// counts it: a 4-bit weight (bitsandbytes `Params4bit`) at its unpacked element count
    /// (packed bytes x 2), its quantization state not at all. The adapters are added to it.
    pub fn trainable_report(&self, base_params: u64) -> String {
        let trainable = self.num_trainable();
        let all = base_params + trainable;
        let percent = if all == 0 { f64::NAN } else { 100.0 * trainable as f64 / all as f64 };
        format!(
            "trainable params: {} || all params: {} || trainable%: {percent:.4}",
            thousands(trainable),
            thousands(all)
        )
    }

    /// `target_modules` as PEFT records it once resolved against a model: all-linear becomes
    /// the list of the adapted modules' full names.
    fn written_targets(&self) -> TargetModules {
        match &self.config.target_modules {
            TargetModules::AllLinear => {
                TargetModules::List(self.modules.iter().map(|m| m.name.clone()).collect())
            }
            other => other.clone(),
        }
    }

    /// Write `dir/adapter_config.json` and `dir/adapter_model.safetensors` as
    /// `PeftModel.save_pretrained` does (keys without the adapter name, tensors in the adapter
    /// dtype, `inference_mode: true`); each file atomically, with the same bytes for the same
    /// adapters. Creates `dir` if needed.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_owned(), source })?;
        let mut tensors = Vec::with_capacity(2 * self.modules.len());
        for (key, t) in self.named_parameters() {
            tensors.push(raw_tensor(key, &t)?);
        }
        let meta = BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
        quant::file::write(&dir.join(WEIGHTS_FILE), &tensors, &meta)?;
        let text = self.config.to_json_with(&self.written_targets(), true);
        write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())?;
        tracing::info!(dir = %dir.display(), modules = self.modules.len(), "LoRA adapter saved");
        Ok(())
    }

    /// Load A and B from a PEFT adapter directory into these adapters (e.g. to resume). The
    /// directory's r, alpha and rsLoRA must equal this config's; its tensors must be exactly
    /// this set's (with or without the `.default` adapter name), in F32, F16 or BF16, each of
    /// its module's shape. Nothing is changed if an error is returned.
    pub fn load_into(&mut self, dir: &Path) -> Result<(), Error> {
        let file_cfg = LoraConfig::read(dir)?;
        let path = dir.join(CONFIG_FILE);
        let mismatch = |what: &str, file: String, ours: String| Error::Config {
            path: path.clone(),
            problem: format!("{what} is {file}, but these adapters have {ours}"),
        };
        if file_cfg.r != self.config.r {
            return Err(mismatch("r", file_cfg.r.to_string(), self.config.r.to_string()));
        }
        if file_cfg.alpha != self.config.alpha {
            return Err(mismatch("lora_alpha", file_cfg.alpha.to_string(), self.config.alpha.to_string()));
        }
        if file_cfg.use_rslora != self.config.use_rslora {
            return Err(mismatch(
                "use_rslora",
                file_cfg.use_rslora.to_string(),
                self.config.use_rslora.to_string(),
            ));
        }
        let shapes: Vec<(String, i64, i64)> =
            self.modules.iter().map(|m| (m.name.clone(), m.lora_a.size()[1], m.lora_b.size()[0])).collect();
        let tensors = read_weights(dir, &self.config, &shapes)?;
        self.copy_in(&tensors)
    }

    /// Copy checked tensors (A, B per module, in module order) into the parameters.
    fn copy_in(&mut self, tensors: &[(Tensor, Tensor)]) -> Result<(), Error> {
        tch::no_grad(|| -> Result<(), Error> {
            for (m, (a, b)) in self.modules.iter_mut().zip(tensors) {
                m.lora_a.f_copy_(a)?;
                m.lora_b.f_copy_(b)?;
            }
            Ok(())
        })
    }
}

/// Read `dir/adapter_model.safetensors` for modules `(name, in, out)`: every tensor taken, shapes
/// and dtypes checked; returned as Float CPU tensors in module order.
fn read_weights(
    dir: &Path,
    cfg: &LoraConfig,
    modules: &[(String, i64, i64)],
) -> Result<Vec<(Tensor, Tensor)>, Error> {
    let path = dir.join(WEIGHTS_FILE);
    let (raw, _) = quant::file::read(&path)?;
    let index: HashMap<&str, usize> =
        modules.iter().enumerate().map(|(i, (n, _, _))| (n.as_str(), i)).collect();
    let mut found: Vec<[Option<&RawTensor>; 2]> = vec![[None, None]; modules.len()];
    for t in &raw {
        let unexpected =
            |why: &str| Error::UnexpectedTensor { path: path.clone(), key: t.name.clone(), why: why.into() };
        let rest = t
            .name
            .strip_prefix(KEY_PREFIX)
            .ok_or_else(|| unexpected("PEFT's keys start with `base_model.model.`"))?;
        let parsed = [(".lora_A", 0), (".lora_B", 1)].into_iter().find_map(|(part, which)| {
            let stem = rest.strip_suffix(".weight")?;
            let stem = stem.strip_suffix(".default").unwrap_or(stem);
            stem.strip_suffix(part).map(|module| (module, which))
        });
        let (module, which) =
            parsed.ok_or_else(|| unexpected("not a LoRA A or B weight (`<module>.lora_A.weight`)"))?;
        let i =
            *index.get(module).ok_or_else(|| unexpected("its module is not among the targeted linears"))?;
        if found[i][which].replace(t).is_some() {
            return Err(unexpected("the same weight appears twice (with and without `.default`)"));
        }
    }
    let r = cfg.r as i64;
    let mut out = Vec::with_capacity(modules.len());
    for ((name, inp, outf), pair) in modules.iter().zip(&found) {
        let mut two = Vec::with_capacity(2);
        let wanted = [
            ("A", [r, *inp], format!("[r, in_features] = [{r}, {inp}]")),
            ("B", [*outf, r], format!("[out_features, r] = [{outf}, {r}]")),
        ];
        for (which, (ab, expected, dims)) in wanted.into_iter().enumerate() {
            let key = format!("{KEY_PREFIX}{name}.lora_{ab}.weight");
            let t = pair[which].ok_or_else(|| Error::MissingTensor { path: path.clone(), key })?;
            let bad = |problem: String| Error::BadTensor { path: path.clone(), key: t.name.clone(), problem };
            let kind = match t.dtype.as_str() {
                "F32" => Kind::Float,
                "F16" => Kind::Half,
                "BF16" => Kind::BFloat16,
                other => return Err(bad(format!("dtype {other} (expected F32, F16 or BF16)"))),
            };
            let shape: Vec<i64> = t.shape.iter().map(|d| *d as i64).collect();
            if shape != expected {
                return Err(bad(format!("shape {shape:?}, expected {dims}")));
            }
            two.push(Tensor::f_from_data_size(&t.data, &shape, kind)?);
        }
        let b = two.pop().ok_or_else(|| Error::Torch("B not read".into()))?;
        let a = two.pop().ok_or_else(|| Error::Torch("A not read".into()))?;
        out.push((a, b));
    }
    tracing::debug!(file = %path.display(), tensors = raw.len(), "LoRA adapter weights read");
    Ok(out)
}

/// A tensor's bytes as a safetensors entry (moved to the CPU, made contiguous).
fn raw_tensor(name: String, t: &Tensor) -> Result<RawTensor, Error> {
    let dtype = match t.kind() {
        Kind::Float => "F32",
        Kind::BFloat16 => "BF16",
        Kind::Half => "F16",
        other => return Err(Error::Torch(format!("{name}: cannot save dtype {other:?}"))),
    };
    let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
    let numel = t.numel();
    let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel)?;
    Ok(RawTensor {
        name,
        dtype: dtype.to_owned(),
        shape: t.size().iter().map(|d| *d as usize).collect(),
        data,
    })
}

/// Write a file through a temporary beside it, synced, then renamed into place.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp: PathBuf = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|source| Error::Io { path: path.to_owned(), source })
}

/// `1234567` -> `1,234,567` (Python's `{:,d}`).
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LoraInit;
    use quant::linear::Dense;

    fn dense(out: i64, inp: i64, seed: i64) -> Box<dyn Linear> {
        let w = Tensor::arange(out * inp, (Kind::Float, Device::Cpu))
            .view([out, inp])
            .f_mul_scalar(0.37)
            .and_then(|t| t.f_add_scalar(seed as f64))
            .and_then(|t| t.f_sin())
            .expect("weight");
        let b = Tensor::arange(out, (Kind::Float, Device::Cpu)).f_mul_scalar(0.1).expect("bias");
        Box::new(Dense::new(w, Some(b)).expect("dense"))
    }

    fn model() -> Vec<(String, Box<dyn Linear>)> {
        let mut v = Vec::new();
        for l in 0..2 {
            v.push((format!("model.layers.{l}.self_attn.q_proj"), dense(8, 8, 1 + l)));
            v.push((format!("model.layers.{l}.self_attn.v_proj"), dense(4, 8, 3 + l)));
            v.push((format!("model.layers.{l}.mlp.down_proj"), dense(8, 12, 5 + l)));
        }
        v
    }

    fn offer(m: &mut [(String, Box<dyn Linear>)]) -> Vec<(String, &mut Box<dyn Linear>)> {
        m.iter_mut().map(|(n, l)| (n.clone(), l)).collect()
    }

    fn list(keys: &[&str]) -> TargetModules {
        TargetModules::List(keys.iter().map(|s| s.to_string()).collect())
    }

    fn input(rows: i64, inp: i64) -> Tensor {
        Tensor::arange(rows * inp, (Kind::Float, Device::Cpu)).view([rows, inp]).f_cos().expect("x")
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).abs().max().double_value(&[]);
        d / b.abs().max().double_value(&[]).max(1e-30)
    }

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nibble-lora-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn zero_b_adapter_is_the_identity_at_init() {
        let mut m = model();
        let x = input(3, 8);
        let before = m[0].1.forward(&x).expect("base");
        let a = inject(offer(&mut m), &LoraConfig::new(4, 8.0, list(&["q_proj"])), 0).expect("inject");
        assert_eq!(a.modules().len(), 2);
        let after = m[0].1.forward(&x).expect("adapted");
        assert!(after.equal(&before));
        assert!(a.modules()[0].lora_a().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn forward_equals_manual_math_and_scaling() {
        for rslora in [false, true] {
            let mut m = model();
            // m[2] is layer 0's down_proj, made from seed 5.
            let w = dense(8, 12, 5);
            let mut cfg = LoraConfig::new(4, 6.0, list(&["down_proj"]));
            cfg.init = LoraInit::False;
            cfg.use_rslora = rslora;
            let a = inject(offer(&mut m), &cfg, 42).expect("inject");
            let scaling = if rslora { 3.0 } else { 1.5 };
            assert_eq!(cfg.scaling(), scaling);
            let x = input(5, 12);
            let (la, lb) = (a.modules()[0].lora_a(), a.modules()[0].lora_b());
            let manual = w.forward(&x).expect("base") + x.matmul(&la.tr()).matmul(&lb.tr()) * scaling;
            let got = m[2].1.forward(&x).expect("adapted");
            assert!(max_rel(&got, &manual) < 1e-6, "rslora {rslora}");
            assert!(!got.allclose(&w.forward(&x).expect("base"), 1e-3, 1e-3, false));
        }
    }

    #[test]
    fn grads_reach_a_and_b_only() {
        let mut m = model();
        let mut cfg = LoraConfig::new(2, 4.0, list(&["q_proj"]));
        cfg.init = LoraInit::False;
        let a = inject(offer(&mut m), &cfg, 1).expect("inject");
        let x = input(3, 8).set_requires_grad(true);
        m[0].1.forward(&x).expect("forward").sum(Kind::Float).backward();
        for p in a.parameters().iter().take(2) {
            let g = p.grad();
            assert!(g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        }
        for p in a.parameters().iter().skip(2) {
            assert!(!p.grad().defined(), "the other layer's adapter took no part");
        }
        assert!(x.grad().defined(), "the input gets its gradient through base and adapter");
        // The frozen base weight stays without gradient.
        let w = Tensor::ones([8, 8], (Kind::Float, Device::Cpu));
        let base: Box<dyn Linear> = Box::new(Dense::new(w.shallow_clone(), None).expect("dense"));
        let mut one = vec![("q_proj".to_owned(), base)];
        let a = inject(offer(&mut one), &cfg, 1).expect("inject");
        one[0].1.forward(&input(2, 8)).expect("forward").sum(Kind::Float).backward();
        assert!(!w.grad().defined());
        assert!(a.parameters().iter().all(|p| p.grad().defined()));
    }

    #[test]
    fn dropout_only_while_training() {
        let mut m = model();
        let mut cfg = LoraConfig::new(4, 8.0, list(&["q_proj"]));
        cfg.init = LoraInit::False;
        cfg.dropout = 0.5;
        let a = inject(offer(&mut m), &cfg, 3).expect("inject");
        assert!(a.is_training());
        let x = input(16, 8);
        let y1 = m[0].1.forward(&x).expect("train");
        let y2 = m[0].1.forward(&x).expect("train");
        assert!(!y1.equal(&y2), "dropout draws a new mask each call");
        a.set_training(false);
        let y3 = m[0].1.forward(&x).expect("eval");
        assert!(y3.equal(&m[0].1.forward(&x).expect("eval")));
    }

    #[test]
    fn bf16_adapter_on_a_4bit_base_computes_in_bf16_and_returns_the_base_dtype() {
        let w = Tensor::arange(64 * 64, (Kind::Float, Device::Cpu)).view([64, 64]).f_sin().expect("w");
        let base =
            quant::linear::Linear4bit::quantize(&w, None, Default::default(), Kind::Float).expect("4bit");
        let mut one: Vec<(String, Box<dyn Linear>)> =
            vec![("model.layers.0.mlp.up_proj".into(), Box::new(base))];
        let mut cfg = LoraConfig::new(8, 16.0, TargetModules::AllLinear);
        cfg.dtype = Kind::BFloat16;
        cfg.init = LoraInit::False;
        let a = inject(offer(&mut one), &cfg, 9).expect("inject");
        assert_eq!(a.modules()[0].lora_a().kind(), Kind::BFloat16);
        let x = input(4, 64);
        let y = one[0].1.forward(&x).expect("forward");
        assert_eq!(y.kind(), Kind::Float);
        y.sum(Kind::Float).backward();
        assert_eq!(a.modules()[0].lora_b().grad().kind(), Kind::BFloat16);
    }

    #[test]
    fn dora_is_refused_before_anything_changes() {
        let mut m = model();
        let mut cfg = LoraConfig::new(4, 8.0, TargetModules::AllLinear);
        cfg.use_dora = true;
        let err = inject(offer(&mut m), &cfg, 0).expect_err("dora");
        assert_eq!(err.to_string(), "use_dora = true (DoRA) is not supported yet");
        let err =
            inject(offer(&mut m), &LoraConfig::new(4, 8.0, list(&["o_proj"])), 0).expect_err("no o_proj");
        assert!(err.to_string().contains("entry `o_proj` matches none of the 6 linear layers"), "{err}");
        // The model still computes with its plain layers.
        assert!(m[0].1.forward(&input(1, 8)).is_ok());
    }

    #[test]
    fn report_matches_peft_format() {
        let mut m = model();
        let a =
            inject(offer(&mut m), &LoraConfig::new(8, 16.0, TargetModules::AllLinear), 0).expect("inject");
        // q: 8*(8+8), v: 8*(8+4), down: 8*(12+8), twice.
        assert_eq!(a.num_trainable(), 2 * (128 + 96 + 160));
        assert_eq!(
            a.trainable_report(1_234_000),
            "trainable params: 768 || all params: 1,234,768 || trainable%: 0.0622"
        );
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(7_241_732_096), "7,241,732,096");
    }

    #[test]
    fn save_then_load_restores_the_tensors_and_is_deterministic() {
        let dir = temp("rt");
        let mut m = model();
        let mut cfg = LoraConfig::new(4, 8.0, TargetModules::AllLinear);
        cfg.init = LoraInit::False;
        let a = inject(offer(&mut m), &cfg, 5).expect("inject");
        a.save(&dir).expect("save");
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).expect("read");
        a.save(&dir).expect("save again");
        assert_eq!(std::fs::read(dir.join(WEIGHTS_FILE)).expect("read"), bytes);
        let written = LoraConfig::read(&dir).expect("config");
        let mut names: Vec<String> = m.iter().map(|(n, _)| n.clone()).collect();
        names.sort();
        assert_eq!(written.target_modules, TargetModules::List(names));
        let mut m2 = model();
        let b = inject_from(offer(&mut m2), &dir).expect("load");
        assert!(!b.is_training());
        for (x, y) in a.parameters().iter().zip(b.parameters()) {
            assert!(x.equal(&y));
        }
        let x = input(2, 12);
        assert!(m[2].1.forward(&x).expect("a").equal(&m2[2].1.forward(&x).expect("b")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Rewrite the adapter file of `dir` through `edit` on its tensors.
    fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Vec<RawTensor>)) {
        let path = dir.join(WEIGHTS_FILE);
        let (mut t, meta) = quant::file::read(&path).expect("read");
        edit(&mut t);
        quant::file::write(&path, &t, &meta).expect("write");
    }

    fn saved(tag: &str) -> (PathBuf, Adapters) {
        let dir = temp(tag);
        let mut m = model();
        let mut cfg = LoraConfig::new(4, 8.0, list(&["q_proj", "v_proj"]));
        cfg.init = LoraInit::False;
        let a = inject(offer(&mut m), &cfg, 5).expect("inject");
        a.save(&dir).expect("save");
        (dir, a)
    }

    fn load_err(dir: &Path) -> String {
        let mut m = model();
        inject_from(offer(&mut m), dir).expect_err("must fail").to_string()
    }

    #[test]
    fn keys_with_the_default_adapter_name_load() {
        let (dir, a) = saved("default");
        edit_weights(&dir, |t| {
            for x in t.iter_mut() {
                x.name = x.name.replace(".weight", ".default.weight");
            }
        });
        let mut m = model();
        let b = inject_from(offer(&mut m), &dir).expect("load");
        for (x, y) in a.parameters().iter().zip(b.parameters()) {
            assert!(x.equal(&y));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_missing_and_misshapen_tensors_are_named() {
        let (dir, _) = saved("bad");
        let file = dir.join(WEIGHTS_FILE).display().to_string();
        let key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";

        edit_weights(&dir, |t| {
            let mut extra = t[0].clone();
            extra.name = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight".into();
            t.push(extra);
        });
        let err = load_err(&dir);
        assert_eq!(
            err,
            format!(
                "{file}: unexpected tensor `base_model.model.model.layers.0.mlp.down_proj.lora_A.weight` (its module is not among the targeted linears)"
            )
        );

        edit_weights(&dir, |t| t.retain(|x| !x.name.contains("down_proj") && x.name != key));
        assert_eq!(load_err(&dir), format!("{file}: missing tensor `{key}`"));

        let (dir, _) = saved("bad");
        edit_weights(&dir, |t| {
            let x = t.iter_mut().find(|x| x.name == key).expect("key");
            x.shape = vec![2, 8];
        });
        assert_eq!(
            load_err(&dir),
            format!("{file}: tensor `{key}`: shape [2, 8], expected [out_features, r] = [4, 4]")
        );

        let (dir, _) = saved("bad");
        edit_weights(&dir, |t| {
            t.push(RawTensor {
                name: "lm_head.weight".into(),
                dtype: "F32".into(),
                shape: vec![1],
                data: vec![0; 4],
            })
        });
        assert!(
            load_err(&dir)
                .contains("unexpected tensor `lm_head.weight` (PEFT's keys start with `base_model.model.`)")
        );

        let (dir, _) = saved("bad");
        edit_weights(&dir, |t| {
            let x = t.iter_mut().find(|x| x.name == key).expect("key");
            x.dtype = "I32".into();
        });
        assert!(load_err(&dir).contains("dtype I32 (expected F32, F16 or BF16)"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn load_into_checks_the_config_and_changes_nothing_on_error() {
        let (dir, a) = saved("into");
        let mut m = model();
        let mut cfg = a.config().clone();
        cfg.alpha = 16.0;
        let mut b = inject(offer(&mut m), &cfg, 77).expect("inject");
        let before: Vec<Tensor> = b.parameters().iter().map(|p| p.copy()).collect();
        let err = b.load_into(&dir).expect_err("alpha differs").to_string();
        assert!(err.ends_with("adapter_config.json: lora_alpha is 8, but these adapters have 16"), "{err}");
        assert!(before.iter().zip(b.parameters()).all(|(x, y)| x.equal(&y)));
        let mut m = model();
        let mut b = inject(offer(&mut m), a.config(), 77).expect("inject");
        b.load_into(&dir).expect("load");
        assert!(a.parameters().iter().zip(b.parameters()).all(|(x, y)| x.equal(&y)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
