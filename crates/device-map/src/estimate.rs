//! How much memory a QLoRA run needs, from the model's shape and the recipe's settings, before
//! anything loads: base weights (4.127 bit/param with double quantization, 4.5 without),
//! unquantized embeddings/norms/head, LoRA weights with their gradients and AdamW states, and
//! activations for the batch and length with or without gradient checkpointing.
//!
//! Activations are an estimate of what autograd keeps, per token and per decoder layer, for a
//! Llama-shaped block with memory-efficient attention (no `seq x seq` score matrix is stored):
//! the inputs of both norms and of every linear, q/k/v, the attention output and log-sum-exp,
//! the MLP's gate, up and their product. With checkpointing, only each layer's input is kept,
//! plus one layer's full set (the last layer's, kept through the head, or the one recomputed).
//! The loss keeps fp32 logits and their grad.
//!
//! On top of that block, what nibble's CPU path keeps (measured against the RSS of runs in
//! docs/benchmarks.md): each adapter's `r`-wide intermediate, and with LoRA dropout its dropped
//! input in the adapter dtype (without dropout an adapter keeps the 16-bit input the block
//! already keeps, not PEFT's fp32 copy); the attention probabilities `[batch, heads, seq, seq]`
//! when attention runs with an explicit mask (packed sequences); f32 copies of q/k/v (and f32
//! probabilities) when 16-bit matmuls run in f32; and the process's own footprint before
//! loading. The loss runs over chunks of positions (`logits_chunk_bytes` of f32 logits at a
//! time), so logits cost a few chunks, not `tokens x vocab`.
//!
//! A mixture of experts on a CPU with native 16-bit GEMMs also keeps compiled GEMM kernels per
//! shape (oneDNN's primitive cache, about `gemm_kernel_bytes` each): its per-expert row counts
//! vary every step, so nibble pads them to [`expert_rows_bucket`]'s few sizes, and the estimate
//! counts every bucket a micro-batch can reach.

use std::fmt;

use crate::format_bytes;

/// The dimensions of a decoder-only transformer (from its `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// Vocabulary size.
    pub vocab: u64,
    /// Hidden size.
    pub hidden: u64,
    /// MLP intermediate size.
    pub intermediate: u64,
    /// Decoder layers.
    pub layers: u64,
    /// Attention heads.
    pub heads: u64,
    /// Key/value heads (GQA).
    pub kv_heads: u64,
    /// Size of one head.
    pub head_dim: u64,
    /// Whether the output head shares the embedding matrix.
    pub tied_embeddings: bool,
    /// q/k/v and gate/up are one linear each (Phi-3's `qkv_proj`, `gate_up_proj`).
    pub fused_projections: bool,
    /// A mixture of experts in place of every layer's MLP (Mixtral, Qwen3-MoE).
    pub moe: Option<MoeShape>,
}

/// The experts of a mixture-of-experts layer: `experts` SwiGLU MLPs of width `intermediate`,
/// `top_k` of them per token, chosen by a router (`experts x hidden`, unquantized).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeShape {
    /// Experts per layer.
    pub experts: u64,
    /// Experts each token goes through.
    pub top_k: u64,
    /// Each expert's MLP width.
    pub intermediate: u64,
}

/// nibble's one table of a decoder block's linear layers: each one's transformers path inside
/// the layer (`model.layers.N.` + path), in the order transformers creates them. The loader, the
/// exporter, the estimate and the run plan all read it.
pub const DECODER_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// A block's linear layers where q/k/v and gate/up are fused (Phi-3), in transformers' order.
pub const FUSED_DECODER_LINEARS: [&str; 4] =
    ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"];

/// A mixture-of-experts block's linear layers outside the experts: its attention's.
pub const ATTENTION_LINEARS: [&str; 4] =
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"];

/// The linear layers of one of `s`'s blocks as adapters see them: [`DECODER_LINEARS`],
/// [`FUSED_DECODER_LINEARS`], or for a mixture of experts [`ATTENTION_LINEARS`] (its experts are
/// parameters of one module in transformers, which PEFT's `target_modules` do not reach).
pub fn decoder_linears(s: &ModelShape) -> &'static [&'static str] {
    if s.fused_projections {
        &FUSED_DECODER_LINEARS
    } else if s.moe.is_some() {
        &ATTENTION_LINEARS
    } else {
        &DECODER_LINEARS
    }
}

/// The last part of a [`DECODER_LINEARS`] path: the module name PEFT's targets match.
pub fn module_name(path: &'static str) -> &'static str {
    path.rsplit_once('.').map_or(path, |(_, name)| name)
}

/// The linear layers of a decoder block, by PEFT module name, with (in, out) features, in
/// [`decoder_linears`] order.
pub fn block_linears(s: &ModelShape) -> Vec<(&'static str, u64, u64)> {
    let q = s.heads * s.head_dim;
    let kv = s.kv_heads * s.head_dim;
    let features: &[(u64, u64)] = if s.fused_projections {
        &[(s.hidden, q + 2 * kv), (q, s.hidden), (s.hidden, 2 * s.intermediate), (s.intermediate, s.hidden)]
    } else {
        &[
            (s.hidden, q),
            (s.hidden, kv),
            (s.hidden, kv),
            (q, s.hidden),
            (s.hidden, s.intermediate),
            (s.hidden, s.intermediate),
            (s.intermediate, s.hidden),
        ]
    };
    decoder_linears(s).iter().zip(features).map(|(path, &(i, o))| (module_name(path), i, o)).collect()
}

impl ModelShape {
    /// Parameters in the decoder blocks' linear layers (what 4-bit quantization stores), every
    /// expert's included.
    pub fn linear_params(&self) -> u64 {
        let experts = self.moe.map_or(0, |m| m.experts * 3 * self.hidden * m.intermediate);
        self.layers * (block_linears(self).iter().map(|(_, i, o)| i * o).sum::<u64>() + experts)
    }

    /// Parameters kept unquantized: embeddings, the head (unless tied), all norms and routers.
    pub fn other_params(&self) -> u64 {
        let emb = self.vocab * self.hidden;
        let head = if self.tied_embeddings { 0 } else { emb };
        let router = self.moe.map_or(0, |m| m.experts * self.hidden);
        emb + head + self.layers * (2 * self.hidden + router) + self.hidden
    }
}

/// How the base weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseWeights {
    /// 4-bit with blocksize 64; `double_quant` quantizes the block scales too.
    FourBit {
        /// Double quantization of the absmax values.
        double_quant: bool,
    },
    /// LLM.int8: one byte per weight plus one f32 scale per row.
    EightBit,
    /// Unquantized, in the compute dtype.
    Dense,
}

impl BaseWeights {
    /// Storage bits per linear parameter.
    pub fn bits_per_param(self, dtype_bytes: u64) -> f64 {
        match self {
            // 4 bits, one 8-bit code per 64 values, one f32 per 256 codes.
            BaseWeights::FourBit { double_quant: true } => 4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0),
            // 4 bits and one f32 absmax per 64 values.
            BaseWeights::FourBit { double_quant: false } => 4.0 + 32.0 / 64.0,
            BaseWeights::EightBit => 8.0,
            BaseWeights::Dense => 8.0 * dtype_bytes as f64,
        }
    }
}

/// The run settings that drive memory.
#[derive(Debug, Clone, PartialEq)]
pub struct RunShape {
    /// How base weights are stored.
    pub base: BaseWeights,
    /// Bytes per element of the compute dtype (2 for bf16/fp16, 4 for fp32).
    pub dtype_bytes: u64,
    /// LoRA rank (0: no adapter).
    pub lora_r: u64,
    /// Which block linears get adapters (PEFT names such as `q_proj`).
    pub lora_targets: Vec<String>,
    /// Adapter parameters per decoder layer outside its linears (a mixture's router and expert
    /// banks, PEFT's `target_parameters`).
    pub lora_param_params: u64,
    /// Bytes per adapter parameter (4 for fp32 adapters, 2 for bf16); the optimizer's moments
    /// take the same.
    pub adapter_bytes: u64,
    /// LoRA dropout is on (each adapter then keeps its own dropped copy of its input).
    pub lora_dropout: bool,
    /// Sequences per micro-batch.
    pub batch: u64,
    /// Tokens per sequence.
    pub seq: u64,
    /// Recompute each decoder layer in backward.
    pub gradient_checkpointing: bool,
    /// Attention keeps its `seq x seq` probabilities (an explicit mask, as for packed sequences).
    pub attention_scores: bool,
    /// 16-bit matmuls run in f32 (nibble's `cpu_matmul` on CPUs without 16-bit GEMMs).
    pub matmul_in_f32: bool,
    /// Most bytes of f32 logits the loss materialises at once (0: all `tokens x vocab`).
    pub logits_chunk_bytes: u64,
    /// The process before loading anything (runtime libraries, tokenizer), bytes.
    pub runtime: u64,
    /// Bytes a CPU GEMM library keeps per distinct GEMM shape it has run (oneDNN's cached
    /// primitives for native 16-bit GEMMs; 0 where nothing is kept per shape: f32 GEMMs, CUDA).
    pub gemm_kernel_bytes: u64,
    /// Most GEMM kernels that library keeps at once (its cache's capacity in entries).
    pub gemm_kernel_cache: u64,
}

/// The estimate, by component, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Quantized (or dense) decoder linears.
    pub base_linears: u64,
    /// Embeddings, head and norms in the compute dtype.
    pub unquantized: u64,
    /// Adapter weights.
    pub lora_weights: u64,
    /// Adapter gradients.
    pub lora_grads: u64,
    /// AdamW's two moments per adapter parameter, in fp32.
    pub optimizer: u64,
    /// What autograd keeps across all decoder layers at the end of the forward pass.
    pub activations: u64,
    /// One chunk's fp32 logits, log-probabilities and their gradients for the loss (and a slab
    /// of the head's f32 weight when 16-bit matmuls run in f32).
    pub logits: u64,
    /// The process before loading (runtime libraries).
    pub runtime: u64,
    /// GEMM kernels a CPU library keeps for a mixture's per-expert row counts.
    pub gemm_kernels: u64,
}

impl Estimate {
    /// Sum of all parts.
    pub fn total(&self) -> u64 {
        self.base_linears
            + self.unquantized
            + self.lora_weights
            + self.lora_grads
            + self.optimizer
            + self.activations
            + self.logits
            + self.runtime
            + self.gemm_kernels
    }

    /// Each component with a name, for display.
    pub fn parts(&self) -> [(&'static str, u64); 9] {
        [
            ("base weights (decoder linears)", self.base_linears),
            ("embeddings, head, norms", self.unquantized),
            ("LoRA weights", self.lora_weights),
            ("LoRA gradients", self.lora_grads),
            ("AdamW states", self.optimizer),
            ("activations", self.activations),
            ("logits (fp32) and their grad", self.logits),
            ("runtime (process before loading)", self.runtime),
            ("GEMM kernels (expert row sizes)", self.gemm_kernels),
        ]
    }
}

impl fmt::Display for Estimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kernels = self.parts().len() - 1;
        // Kernels cached per expert row size appear only where a mixture keeps them.
        for (i, (name, b)) in self.parts().into_iter().enumerate() {
            if i == kernels && b == 0 {
                continue;
            }
            writeln!(f, "  {name:<32} {:>12}", format_bytes(b))?;
        }
        write!(f, "  {:<32} {:>12}", "total", format_bytes(self.total()))
    }
}

/// The model as the planner places it, in forward order, with each module's bytes on its device
/// for a training run: the embedding, each decoder layer (its linears as stored, its norms in the
/// compute dtype, and its adapters with their gradients and AdamW states), the final norm and the
/// head (none of its own when tied: it shares the embedding's matrix). Names are transformers'
/// module paths (`model.embed_tokens`, `model.layers.N`, `model.norm`, `lm_head`).
pub fn modules(model: &ModelShape, run: &RunShape) -> Vec<crate::Module> {
    let per_layer_params = model.linear_params() / model.layers.max(1);
    let stored = per_layer_params as f64 * run.base.bits_per_param(run.dtype_bytes) / 8.0;
    let router = model.moe.map_or(0, |m| m.experts * model.hidden);
    let layer = stored.ceil() as u64
        + (2 * model.hidden + router) * run.dtype_bytes
        + layer_adapter_params(model, run) * 4 * run.adapter_bytes;
    let module = |name: String, bytes: u64| crate::Module { name, bytes };
    let embed = model.vocab * model.hidden * run.dtype_bytes;
    let mut out = Vec::with_capacity(model.layers as usize + 3);
    out.push(module("model.embed_tokens".into(), embed));
    out.extend((0..model.layers).map(|i| module(format!("model.layers.{i}"), layer)));
    out.push(module("model.norm".into(), model.hidden * run.dtype_bytes));
    out.push(module("lm_head".into(), if model.tied_embeddings { 0 } else { embed }));
    out
}

/// Bytes of f32 head weight nibble's frozen 16-bit linears upcast at once (quant's
/// `DenseUpcastFn` slab).
const HEAD_SLAB_BYTES: u64 = 8 << 20;

/// Elements autograd keeps per token in one decoder layer (see the module docs).
fn saved_per_token(s: &ModelShape) -> u64 {
    let q = s.heads * s.head_dim;
    let kv = s.kv_heads * s.head_dim;
    // norm 1 input + output, q/k/v, attention output (o_proj input), log-sum-exp per head,
    // norm 2 input + output, gate, up, silu(gate) * up (down_proj input).
    let attention = 2 * s.hidden + q + 2 * kv + q + s.heads + 2 * s.hidden;
    match s.moe {
        None => attention + 3 * s.intermediate,
        // Only the routed copies: per token and chosen expert its gathered input, gate, up,
        // silu(gate) * up and output; the router's logits and probabilities (f32, as two of the
        // dtype's elements each at most).
        Some(m) => attention + m.top_k * (2 * s.hidden + 3 * m.intermediate) + 4 * m.experts,
    }
}

/// The decoder linears of one block that carry a LoRA adapter (none without LoRA).
fn adapted_linears(model: &ModelShape, run: &RunShape) -> impl Iterator<Item = (&'static str, u64, u64)> {
    let linears = if run.lora_r == 0 { Vec::new() } else { block_linears(model) };
    linears.into_iter().filter(|(name, ..)| run.lora_targets.iter().any(|t| t == name))
}

/// Adapter parameters of one decoder layer: r * (in + out) per adapted linear.
fn layer_adapter_params(model: &ModelShape, run: &RunShape) -> u64 {
    adapted_linears(model, run).map(|(_, i, o)| run.lora_r * (i + o)).sum::<u64>() + run.lora_param_params
}

/// Estimate memory for a model and run.
pub fn estimate(model: &ModelShape, run: &RunShape) -> Estimate {
    let base_linears =
        (model.linear_params() as f64 * run.base.bits_per_param(run.dtype_bytes) / 8.0).ceil() as u64;
    let unquantized = model.other_params() * run.dtype_bytes;
    let lora_params = model.layers * layer_adapter_params(model, run);
    let tokens = run.batch * run.seq;
    // Each adapted linear keeps its r-wide intermediate, and with dropout its dropped input.
    let lora_saved: u64 = adapted_linears(model, run)
        .map(|(_, i, _)| tokens * (if run.lora_dropout { i } else { 0 } + run.lora_r) * run.adapter_bytes)
        .sum();
    let upcast = run.matmul_in_f32 && run.dtype_bytes < 4;
    let score_bytes = if upcast { 4 } else { run.dtype_bytes };
    let scores =
        if run.attention_scores { run.batch * model.heads * run.seq * run.seq * score_bytes } else { 0 };
    let qkv_f32 = if upcast {
        tokens * (model.heads * model.head_dim + 2 * model.kv_heads * model.head_dim) * 4
    } else {
        0
    };
    let per_layer = tokens * saved_per_token(model) * run.dtype_bytes + lora_saved + scores + qkv_f32;
    let activations = if run.gradient_checkpointing {
        model.layers * tokens * model.hidden * run.dtype_bytes + per_layer
    } else {
        model.layers * per_layer
    };
    Estimate {
        base_linears,
        unquantized,
        lora_weights: lora_params * run.adapter_bytes,
        lora_grads: lora_params * run.adapter_bytes,
        // AdamW's two moments, in the adapters' dtype (torch's `zeros_like`).
        optimizer: lora_params * 2 * run.adapter_bytes,
        activations,
        logits: {
            let all = tokens * model.vocab * 4;
            let chunk = if run.logits_chunk_bytes == 0 { all } else { all.min(run.logits_chunk_bytes) };
            // f32 logits, log-probabilities, their gradient and the 16-bit logits' gradient;
            // with f32 matmuls the head's weight is upcast one slab at a time.
            4 * chunk + if upcast { (model.vocab * model.hidden * 4).min(HEAD_SLAB_BYTES) } else { 0 }
        },
        runtime: run.runtime,
        gemm_kernels: gemm_kernels(model, run),
    }
}

/// Row counts below which an expert's GEMMs run unpadded (decoding and small batches see few
/// distinct counts anyway).
const UNPADDED_EXPERT_ROWS: u64 = 16;

/// Significant bits an expert's padded row count keeps: four sizes per octave, at most 25% (on
/// average about 10%) more rows than routed.
const EXPERT_ROW_BITS: u32 = 3;

/// The row count an expert's GEMMs run with on a CPU for `rows` routed rows: a mixture's
/// per-expert counts change every step, and CPU GEMM libraries compile and keep kernels per shape,
/// so unpadded counts grow memory step after step; padded to a few sizes they repeat.
pub fn expert_rows_bucket(rows: u64) -> u64 {
    if rows <= UNPADDED_EXPERT_ROWS {
        return rows;
    }
    let shift = (u64::BITS - rows.leading_zeros()).saturating_sub(EXPERT_ROW_BITS);
    rows.div_ceil(1 << shift) << shift
}

/// Distinct padded row counts of `1..=rows` (the buckets an expert can see in a micro-batch of
/// `rows` tokens: each token goes to an expert at most once).
fn expert_row_buckets(rows: u64) -> u64 {
    let (mut count, mut size) = (0, 0);
    while size < rows {
        size = expert_rows_bucket(size + 1);
        count += 1;
    }
    count
}

/// Kernels a CPU GEMM library keeps for a mixture's expert GEMMs: every row bucket a
/// micro-batch can reach, times the distinct GEMMs an expert runs per row count (gate/up and down
/// forward, and their input gradients; with 16-bit expert adapters, their products too).
fn gemm_kernels(model: &ModelShape, run: &RunShape) -> u64 {
    if model.moe.is_none() || run.gemm_kernel_bytes == 0 {
        return 0;
    }
    let per_bucket = 4 + if run.lora_param_params > 0 && run.adapter_bytes < 4 { 12 } else { 0 };
    let entries = (expert_row_buckets(run.batch * run.seq) * per_bucket).min(run.gemm_kernel_cache);
    entries * run.gemm_kernel_bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama2_7b() -> ModelShape {
        ModelShape {
            vocab: 32000,
            hidden: 4096,
            intermediate: 11008,
            layers: 32,
            heads: 32,
            kv_heads: 32,
            head_dim: 128,
            tied_embeddings: false,
            fused_projections: false,
            moe: None,
        }
    }

    /// A mixture of experts stores every expert in 4 bits and keeps its router; adapters see its
    /// attention; activations count only each token's routed experts.
    #[test]
    fn experts_are_stored_and_only_routed_tokens_kept() {
        // Mixtral 8x7B: 46.7B parameters, 45.1B of them in the linears.
        let mixtral = ModelShape {
            intermediate: 14336,
            kv_heads: 8,
            moe: Some(MoeShape { experts: 8, top_k: 2, intermediate: 14336 }),
            ..llama2_7b()
        };
        let total = mixtral.linear_params() + mixtral.other_params();
        assert!((46.6e9..46.8e9).contains(&(total as f64)), "{total}");
        let names: Vec<&str> = block_linears(&mixtral).iter().map(|l| l.0).collect();
        assert_eq!(names, ["q_proj", "k_proj", "v_proj", "o_proj"]);
        let dense = ModelShape { moe: None, ..mixtral };
        // Two of eight experts' activations per token, not eight.
        assert!(saved_per_token(&mixtral) < saved_per_token(&dense) * 3);
        assert!(saved_per_token(&mixtral) > saved_per_token(&dense));
        // The device map's layers hold every expert (plus norms, routers and adapters: < 1%).
        let layers: u64 = modules(&mixtral, &qlora(true)).iter().skip(1).take(32).map(|m| m.bytes).sum();
        let e = estimate(&mixtral, &qlora(true));
        assert!(layers >= e.base_linears && layers < e.base_linears + e.base_linears / 100, "{layers} {e:?}");
        // Where the GEMM library keeps no kernels per shape, a mixture costs none; where it does,
        // every reachable row bucket's (4 x 2048 tokens: 16 unpadded counts, 4 per octave above).
        assert_eq!(e.gemm_kernels, 0);
        let cached = estimate(&mixtral, &RunShape { gemm_kernel_bytes: 1000, ..qlora(true) });
        assert_eq!(cached.gemm_kernels, (16 + 4 * 9) * 4 * 1000);
        // No more than the cache holds.
        let small = RunShape { gemm_kernel_bytes: 1000, gemm_kernel_cache: 100, ..qlora(true) };
        assert_eq!(estimate(&mixtral, &small).gemm_kernels, 100 * 1000);
        assert_eq!(estimate(&dense, &RunShape { gemm_kernel_bytes: 1000, ..qlora(true) }).gemm_kernels, 0);
    }

    /// Padded expert row counts cover the routed rows with at most 25% more, take four sizes per
    /// octave above 16, and are counted as the padding produces them.
    #[test]
    fn expert_rows_pad_to_few_sizes() {
        let sizes: Vec<u64> = (1..=100).map(expert_rows_bucket).collect();
        for (n, &b) in (1..).zip(&sizes) {
            assert!(b >= n && b * 4 <= n * 5 + 4, "{n} -> {b}");
            assert_eq!(expert_rows_bucket(b), b, "a bucket is its own bucket");
        }
        let mut distinct = sizes.clone();
        distinct.dedup();
        let above: Vec<u64> = distinct.iter().copied().filter(|&b| b > 16).collect();
        assert_eq!(above, [20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112]);
        assert_eq!(expert_row_buckets(100), distinct.len() as u64);
        assert_eq!(expert_row_buckets(16), 16);
        assert_eq!(expert_row_buckets(1024), 16 + 4 * 6);
        assert_eq!(expert_row_buckets(1025), 16 + 4 * 6 + 1);
    }

    /// Fusing q/k/v and gate/up changes the names, not the parameters.
    #[test]
    fn fused_projections_hold_the_same_parameters() {
        let m = llama2_7b();
        let fused = ModelShape { fused_projections: true, ..m };
        assert_eq!(fused.linear_params(), m.linear_params());
        let names: Vec<&str> = block_linears(&fused).iter().map(|l| l.0).collect();
        assert_eq!(names, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]);
        assert_eq!(block_linears(&fused)[0], ("qkv_proj", 4096, 3 * 4096));
    }

    #[test]
    fn modules_add_up_to_the_weight_parts_of_the_estimate() {
        let m = llama2_7b();
        let run = qlora(true);
        let ms = modules(&m, &run);
        assert_eq!(ms.len(), 32 + 3);
        assert_eq!(ms[0].name, "model.embed_tokens");
        assert_eq!(ms[1].name, "model.layers.0");
        assert_eq!(ms[33].name, "model.norm");
        assert_eq!(ms[34].name, "lm_head");
        let e = estimate(&m, &run);
        let total: u64 = ms.iter().map(|x| x.bytes).sum();
        let weights = e.base_linears + e.unquantized + e.lora_weights + e.lora_grads + e.optimizer;
        // Rounding: each layer's 4-bit bytes are rounded up on their own.
        assert!(total >= weights && total - weights <= 32, "{total} vs {weights}");
        let mut tied = m;
        tied.tied_embeddings = true;
        assert_eq!(modules(&tied, &run)[34].bytes, 0);
    }

    fn qlora(checkpointing: bool) -> RunShape {
        RunShape {
            base: BaseWeights::FourBit { double_quant: true },
            dtype_bytes: 2,
            lora_r: 16,
            lora_targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
                .map(String::from)
                .to_vec(),
            lora_param_params: 0,
            adapter_bytes: 4,
            lora_dropout: false,
            batch: 4,
            seq: 2048,
            gradient_checkpointing: checkpointing,
            attention_scores: false,
            matmul_in_f32: false,
            logits_chunk_bytes: 0,
            runtime: 0,
            gemm_kernel_bytes: 0,
            gemm_kernel_cache: 1024,
        }
    }

    #[test]
    fn bits_per_param_match_the_qlora_paper() {
        assert!((BaseWeights::FourBit { double_quant: true }.bits_per_param(2) - 4.127).abs() < 1e-3);
        assert_eq!(BaseWeights::FourBit { double_quant: false }.bits_per_param(2), 4.5);
    }

    #[test]
    fn llama2_7b_qlora_weights_are_about_3_9_gb() {
        let m = llama2_7b();
        assert_eq!(m.linear_params(), 6_476_005_376);
        let e = estimate(&m, &qlora(true));
        // 6,476,005,376 params * 4.126953125 bits / 8 = 3.34 GB of 4-bit weights.
        assert_eq!(e.base_linears, 3_340_771_328);
        assert_eq!(e.unquantized, (2 * 32000 * 4096 + 65 * 4096) * 2);
        // r=16 on all seven linears: 39,976,960 adapter parameters (PEFT reports the same).
        assert_eq!(e.lora_weights, 39_976_960 * 4);
        assert_eq!(e.optimizer, 39_976_960 * 8);
    }

    #[test]
    fn adapter_inputs_scores_and_f32_copies_are_counted() {
        let m = ModelShape {
            vocab: 100,
            hidden: 8,
            intermediate: 16,
            layers: 2,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            tied_embeddings: true,
            fused_projections: false,
            moe: None,
        };
        let plain = RunShape {
            base: BaseWeights::FourBit { double_quant: true },
            dtype_bytes: 2,
            lora_r: 0,
            lora_targets: vec![],
            lora_param_params: 0,
            adapter_bytes: 4,
            lora_dropout: false,
            batch: 3,
            seq: 5,
            gradient_checkpointing: false,
            attention_scores: false,
            matmul_in_f32: false,
            logits_chunk_bytes: 0,
            runtime: 7,
            gemm_kernel_bytes: 0,
            gemm_kernel_cache: 1024,
        };
        let base = estimate(&m, &plain);
        assert_eq!(base.runtime, 7);
        assert_eq!(base.total(), estimate(&m, &RunShape { runtime: 0, ..plain.clone() }).total() + 7);
        let tokens = 15;
        // r=2 on q_proj (in 8) and down_proj (in 16): the r-wide intermediate, fp32, per layer
        // (the 16-bit inputs are the block's own); with dropout also each dropped fp32 input.
        let lora =
            RunShape { lora_r: 2, lora_targets: vec!["q_proj".into(), "down_proj".into()], ..plain.clone() };
        assert_eq!(estimate(&m, &lora).activations - base.activations, 2 * tokens * (2 + 2) * 4);
        let dropout = RunShape { lora_dropout: true, ..lora.clone() };
        let lora_saved = tokens * ((8 + 2) + (16 + 2)) * 4;
        assert_eq!(estimate(&m, &dropout).activations - base.activations, 2 * lora_saved);
        // Probabilities [3, 2, 5, 5] per layer in the compute dtype, f32 when upcast.
        let scores = RunShape { attention_scores: true, ..plain.clone() };
        assert_eq!(estimate(&m, &scores).activations - base.activations, 2 * 3 * 2 * 25 * 2);
        // Upcast: f32 q (2 x 4) and k, v (1 x 4 each) per token, plus f32 probabilities, and an
        // f32 copy of the head.
        let up = RunShape { attention_scores: true, matmul_in_f32: true, ..plain.clone() };
        assert_eq!(estimate(&m, &up).activations - base.activations, 2 * (3 * 2 * 25 * 4 + tokens * 16 * 4));
        assert_eq!(estimate(&m, &up).logits - base.logits, 100 * 8 * 4);
        // Whole logits: four f32 [tokens, vocab] buffers; chunked: four chunks.
        assert_eq!(base.logits, 4 * tokens * 100 * 4);
        let chunked = RunShape { logits_chunk_bytes: 1000, ..plain.clone() };
        assert_eq!(estimate(&m, &chunked).logits, 4 * 1000);
        // An fp32 run is not upcast.
        let f32_run = RunShape { dtype_bytes: 4, matmul_in_f32: true, ..plain };
        let f32_plain = RunShape { matmul_in_f32: false, ..f32_run.clone() };
        assert_eq!(estimate(&m, &f32_run), estimate(&m, &f32_plain));
    }

    #[test]
    fn checkpointing_cuts_activations_by_about_the_layer_count() {
        let m = llama2_7b();
        let with = estimate(&m, &qlora(true)).activations;
        let without = estimate(&m, &qlora(false)).activations;
        assert!(without > 10 * with, "{without} vs {with}");
        assert!(with > 0);
    }
}
