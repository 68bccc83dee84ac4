//! The decoder pieces every supported family shares: RMSNorm, rotary embeddings, grouped-query
//! attention, the SwiGLU MLP and the pre-norm decoder layer. Each computes what transformers'
//! Llama modules compute, in the same order and dtypes, so logits agree within rounding.

use quant::linear::Linear;
use tch::{Kind, Tensor};

use crate::Error;
use crate::hf_config::RopeScaling;

/// Root-mean-square norm, computed in f32. Llama's casts back before its weight multiplies;
/// Gemma's (`offset`) multiplies by `1 + weight` in f32 and casts after.
pub(crate) struct RmsNorm {
    pub(crate) weight: Tensor,
    pub(crate) eps: f64,
    pub(crate) offset: bool,
}

impl RmsNorm {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor, Error> {
        let kind = x.f_kind()?;
        let h = x.f_to_kind(Kind::Float)?;
        let var = h.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
        let h = h.f_mul(&var.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        if self.offset {
            let scale = self.weight.f_to_kind(Kind::Float)?.f_add_scalar(1.0)?;
            return Ok(h.f_mul(&scale)?.f_to_kind(kind)?);
        }
        Ok(self.weight.f_mul(&h.f_to_kind(kind)?)?)
    }
}

/// `cap * tanh(x / cap)`: Gemma's soft-capping of attention scores and logits.
pub(crate) fn softcap(x: &Tensor, cap: f64) -> Result<Tensor, tch::TchError> {
    x.f_div_scalar(cap)?.f_tanh()?.f_mul_scalar(cap)
}

/// Rotary position embedding frequencies (f32, as transformers computes them).
pub(crate) struct Rope {
    inv_freq: Tensor,
    /// LongRoPE: the frequencies past `.1` positions, and the factor cos/sin are scaled by.
    long: Option<(Tensor, i64)>,
    attention_factor: f64,
}

impl Rope {
    /// Frequencies for the leading `dim` dimensions of each head (the rotary ones).
    pub(crate) fn new(dim: i64, theta: f64, scaling: &RopeScaling) -> Result<Self, Error> {
        let exps = Tensor::f_arange_start_step(0, dim, 2, (Kind::Int64, tch::Device::Cpu))?
            .f_to_kind(Kind::Float)?
            .f_div_scalar(dim as f64)?;
        let powers = Tensor::f_pow_scalar(theta, &exps)?;
        if let RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            attention_factor,
        } = scaling
        {
            // `1 / (factors * base^(2i/dim))`, the factors as an f32 tensor.
            let scaled = |f: &[f64]| -> Result<Tensor, tch::TchError> {
                let f: Vec<f32> = f.iter().map(|&x| x as f32).collect();
                Tensor::from_slice(&f).f_mul(&powers)?.f_reciprocal()
            };
            return Ok(Rope {
                inv_freq: scaled(short_factor)?,
                long: Some((scaled(long_factor)?, *original_max_position_embeddings as i64)),
                attention_factor: *attention_factor,
            });
        }
        let inv_freq = powers.f_reciprocal()?;
        let inv_freq = match *scaling {
            RopeScaling::Default | RopeScaling::LongRope { .. } => inv_freq,
            RopeScaling::Linear { factor } => inv_freq.f_div_scalar(factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let wavelen = inv_freq.f_reciprocal()?.f_mul_scalar(2.0 * std::f64::consts::PI)?;
                let scaled =
                    inv_freq.f_where_self(&wavelen.f_le(low_wavelen)?, &inv_freq.f_div_scalar(factor)?)?;
                let smooth = wavelen
                    .f_reciprocal()?
                    .f_mul_scalar(old)?
                    .f_sub_scalar(low_freq_factor)?
                    .f_div_scalar(high_freq_factor - low_freq_factor)?;
                let smoothed = smooth
                    .f_neg()?
                    .f_add_scalar(1.0)?
                    .f_mul(&scaled)?
                    .f_div_scalar(factor)?
                    .f_add(&smooth.f_mul(&scaled)?)?;
                let medium = wavelen.f_ge(high_wavelen)?.f_logical_and(&wavelen.f_le(low_wavelen)?)?;
                smoothed.f_where_self(&medium, &scaled)?
            }
        };
        Ok(Rope { inv_freq, long: None, attention_factor: 1.0 })
    }

    /// `(cos, sin)`, each `[B, T, dim]` in `kind`, for integer `positions [B, T]`. LongRoPE takes
    /// its long factors when the batch's largest position reaches past the pretraining length,
    /// as transformers decides per forward.
    pub(crate) fn cos_sin(&self, positions: &Tensor, kind: Kind) -> Result<(Tensor, Tensor), Error> {
        let inv = match &self.long {
            Some((long, original))
                if positions.numel() > 0 && positions.f_max()?.f_int64_value(&[])? + 1 > *original =>
            {
                long
            }
            _ => &self.inv_freq,
        };
        let inv = inv.f_to_device(positions.device())?;
        let freqs = positions.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?.f_mul(&inv)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        let (cos, sin) = (emb.f_cos()?, emb.f_sin()?);
        let (cos, sin) = if self.long.is_some() {
            (cos.f_mul_scalar(self.attention_factor)?, sin.f_mul_scalar(self.attention_factor)?)
        } else {
            (cos, sin)
        };
        Ok((cos.f_to_kind(kind)?, sin.f_to_kind(kind)?))
    }
}

fn rotate_half(x: &Tensor) -> Result<Tensor, Error> {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.f_narrow(-1, 0, half)?;
    let x2 = x.f_narrow(-1, half, half)?;
    Ok(Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?)
}

/// `x * cos + rotate_half(x) * sin` for `x [B, H, T, D]` and `cos, sin [B, T, R]`: on the
/// leading `R` dimensions of each head, the rest passed through (partial rotary, Phi-4-mini).
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, Error> {
    let cos = cos.f_unsqueeze(1)?;
    let sin = sin.f_unsqueeze(1)?;
    let (d, r) = (x.size().last().copied().unwrap_or(0), cos.size().last().copied().unwrap_or(0));
    if r < d {
        let rot = x.f_narrow(-1, 0, r)?;
        let turned = rot.f_mul(&cos)?.f_add(&rotate_half(&rot)?.f_mul(&sin)?)?;
        return Ok(Tensor::f_cat(&[&turned, &x.f_narrow(-1, r, d - r)?], -1)?);
    }
    Ok(x.f_mul(&cos)?.f_add(&rotate_half(x)?.f_mul(&sin)?)?)
}

/// `[B, kv, T, D]` -> `[B, kv * rep, T, D]`, each key/value head repeated for its query group.
fn repeat_kv(x: &Tensor, rep: i64) -> Result<Tensor, Error> {
    let s = x.size();
    let (b, kv, t, d) = (s[0], s[1], s[2], s[3]);
    Ok(x.f_unsqueeze(2)?.f_expand([b, kv, rep, t, d], false)?.f_reshape([b, kv * rep, t, d])?)
}

/// What every layer of one forward pass shares: rotary tables, the attention mask and, where the
/// layers skip the batch's padding, where its real tokens sit on the grid.
pub(crate) struct DeviceContext {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// Boolean `[B, 1, T, T]` (true = may attend); `None` means plain causal.
    pub(crate) mask: Option<Tensor>,
    /// The sliding-window layers' own tables, for models that alternate (Gemma); `None` when
    /// every layer uses the ones above.
    pub(crate) sliding: Option<Box<DeviceContext>>,
    /// Where the layers run on the batch's tokens only (padding skipped): hidden states are
    /// `[1, N, hidden]` and attention alone works on the `[B, T]` grid.
    pub(crate) unpad: Option<Unpad>,
}

/// The real tokens of a padded `[rows, cols]` batch, in row-major order: the layers' linears,
/// norms and MLPs run on these `N` tokens only; attention scatters its queries, keys and values
/// back onto the grid (zeros at padding, which no real token attends) and gathers its output.
#[derive(Debug)]
pub(crate) struct Unpad {
    /// `[N]` flat grid positions (`row * cols + col`) of the real tokens.
    pub(crate) index: Tensor,
    pub(crate) rows: i64,
    pub(crate) cols: i64,
}

impl Unpad {
    fn to_device(&self, device: tch::Device) -> Result<Unpad, Error> {
        Ok(Unpad { index: self.index.f_to_device(device)?, rows: self.rows, cols: self.cols })
    }

    /// `[1, N, C]` -> `[rows, cols, C]`, zeros at padding.
    pub(crate) fn scatter_to_grid(&self, x: &Tensor) -> Result<Tensor, Error> {
        let c = x.size().last().copied().unwrap_or(0);
        let index = self.index.f_to_device(x.device())?;
        let grid = Tensor::f_zeros([self.rows * self.cols, c], (x.f_kind()?, x.device()))?;
        Ok(grid.f_index_copy(0, &index, &x.f_reshape([-1, c])?)?.f_view([self.rows, self.cols, c])?)
    }

    /// `[rows, cols, C]` -> `[1, N, C]`, the real tokens' rows.
    pub(crate) fn gather_real(&self, x: &Tensor) -> Result<Tensor, Error> {
        let c = x.size().last().copied().unwrap_or(0);
        let index = self.index.f_to_device(x.device())?;
        Ok(x.f_reshape([-1, c])?.f_index_select(0, &index)?.f_unsqueeze(0)?)
    }
}

impl DeviceContext {
    /// The same tables on `device` (shared, not copied, where they are already there).
    fn to_device(&self, device: tch::Device) -> Result<DeviceContext, Error> {
        Ok(DeviceContext {
            cos: self.cos.f_to_device(device)?,
            sin: self.sin.f_to_device(device)?,
            mask: self.mask.as_ref().map(|m| m.f_to_device(device)).transpose()?,
            sliding: self.sliding.as_ref().map(|s| s.to_device(device).map(Box::new)).transpose()?,
            unpad: self.unpad.as_ref().map(|u| u.to_device(device)).transpose()?,
        })
    }

    /// The tables of a layer that attends globally or within the sliding window.
    pub(crate) fn for_layer(&self, sliding: bool) -> &DeviceContext {
        match &self.sliding {
            Some(s) if sliding => s,
            _ => self,
        }
    }
}

/// Rotary tables and attention mask of one batch (and where its real tokens sit, when the layers
/// skip padding: [`LayerContext::pack`]), on every device a decoder layer computes on.
pub struct LayerContext {
    by_device: Vec<(tch::Device, DeviceContext)>,
}

impl LayerContext {
    /// `base` copied to each of `devices`.
    pub(crate) fn spread(base: DeviceContext, devices: &[tch::Device]) -> Result<Self, Error> {
        let mut by_device = Vec::with_capacity(devices.len());
        for &d in devices {
            by_device.push((d, base.to_device(d)?));
        }
        Ok(LayerContext { by_device })
    }

    /// The tables for a layer computing on `device`.
    pub(crate) fn on(&self, device: tch::Device) -> Result<&DeviceContext, Error> {
        self.by_device.iter().find(|(d, _)| *d == device).map(|(_, c)| c).ok_or_else(|| {
            Error::BadInput(format!(
                "this batch context was not built for {device:?} (built by another model?)"
            ))
        })
    }

    fn unpad(&self) -> Option<&Unpad> {
        self.by_device.first().and_then(|(_, c)| c.unpad.as_ref())
    }

    /// The layers' input from the embeddings `[B, T, hidden]`: unchanged, or `[1, N, hidden]`
    /// (the real tokens) where this context skips padding.
    pub fn pack(&self, h: &Tensor) -> Result<Tensor, Error> {
        match self.unpad() {
            None => Ok(h.shallow_clone()),
            Some(u) => u.gather_real(h),
        }
    }

    /// The last layer's output back on the batch's `[B, T, hidden]` grid (zeros at padding where
    /// this context skips padding); the inverse of [`Self::pack`].
    pub fn unpack(&self, h: &Tensor) -> Result<Tensor, Error> {
        match self.unpad() {
            None => Ok(h.shallow_clone()),
            Some(u) => u.scatter_to_grid(h),
        }
    }
}

/// Causal attention, restricted to the same segment (packed sequences) and to the sliding window.
pub(crate) fn attention_mask(
    segment_ids: Option<&Tensor>,
    seq: i64,
    window: Option<u64>,
    device: tch::Device,
) -> Result<Option<Tensor>, Error> {
    let window = window.filter(|&w| (w as i64) < seq);
    if segment_ids.is_none() && window.is_none() {
        return Ok(None);
    }
    let idx = Tensor::f_arange(seq, (Kind::Int64, device))?;
    let q = idx.f_unsqueeze(1)?;
    let k = idx.f_unsqueeze(0)?;
    let mut allowed = k.f_le_tensor(&q)?;
    if let Some(w) = window {
        allowed = allowed.f_logical_and(&q.f_sub(&k)?.f_lt(w as i64)?)?;
    }
    let mut allowed = allowed.f_unsqueeze(0)?;
    if let Some(seg) = segment_ids {
        let same = seg.f_unsqueeze(2)?.f_eq_tensor(&seg.f_unsqueeze(1)?)?;
        allowed = allowed.f_logical_and(&same)?;
    }
    Ok(Some(allowed.f_unsqueeze(1)?))
}

/// How attention scores are formed where families differ.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ScoreOptions {
    /// The scores' scale (`None`: `head_dim^-1/2`).
    pub(crate) scale: Option<f64>,
    /// Soft-capping of the scores (Gemma 2).
    pub(crate) softcap: Option<f64>,
    /// Materialised scores and softmax (transformers' eager attention, the only one Gemma 2
    /// runs) instead of scaled-dot-product attention.
    pub(crate) eager: bool,
}

/// Query, key and value projections: three linears, or one whose output holds q, k and v in
/// that order (Phi-3's `qkv_proj`).
pub(crate) enum Qkv {
    Separate { q_proj: Box<dyn Linear>, k_proj: Box<dyn Linear>, v_proj: Box<dyn Linear> },
    Fused { qkv_proj: Box<dyn Linear> },
}

/// Grouped-query self-attention with rotary embeddings and, for Qwen3, RMSNorm on q and k.
pub(crate) struct Attention {
    pub(crate) qkv: Qkv,
    pub(crate) o_proj: Box<dyn Linear>,
    pub(crate) q_norm: Option<RmsNorm>,
    pub(crate) k_norm: Option<RmsNorm>,
    pub(crate) heads: i64,
    pub(crate) kv_heads: i64,
    pub(crate) head_dim: i64,
    pub(crate) scores: ScoreOptions,
}

impl Attention {
    /// `[B, T, heads * head_dim]` projections as `[B, heads, T, head_dim]`, normed per head.
    fn heads_of(&self, y: &Tensor, norm: Option<&RmsNorm>, heads: i64) -> Result<Tensor, Error> {
        let (b, t) = (y.size()[0], y.size()[1]);
        let mut h = y.f_view([b, t, heads, self.head_dim])?;
        if let Some(n) = norm {
            h = n.forward(&h)?;
        }
        Ok(h.f_transpose(1, 2)?)
    }

    /// q, k, v as `[B, heads, T, head_dim]` (projected from the real tokens alone and scattered
    /// onto the batch's grid where the layers skip padding).
    fn project_qkv(&self, x: &Tensor, unpad: Option<&Unpad>) -> Result<(Tensor, Tensor, Tensor), Error> {
        let (ys, norms) =
            ([self.heads, self.kv_heads, self.kv_heads], [self.q_norm.as_ref(), self.k_norm.as_ref(), None]);
        let outs: [Tensor; 3] = match &self.qkv {
            Qkv::Separate { q_proj, k_proj, v_proj } => {
                [q_proj.forward(x)?, k_proj.forward(x)?, v_proj.forward(x)?]
            }
            Qkv::Fused { qkv_proj } => {
                let y = qkv_proj.forward(x)?;
                let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
                [y.f_narrow(-1, 0, q)?, y.f_narrow(-1, q, kv)?, y.f_narrow(-1, q + kv, kv)?]
            }
        };
        // A slice of the fused output splits its last dimension into heads as a view, as there.
        let [q, k, v] = match unpad {
            Some(u) => {
                let [q, k, v] = outs;
                [u.scatter_to_grid(&q)?, u.scatter_to_grid(&k)?, u.scatter_to_grid(&v)?]
            }
            None => outs,
        };
        Ok((
            self.heads_of(&q, norms[0], ys[0])?,
            self.heads_of(&k, norms[1], ys[1])?,
            self.heads_of(&v, norms[2], ys[2])?,
        ))
    }

    /// Attention over the cached keys/values (if any) plus this call's; the new ones are appended
    /// to the cache. With a cache, `ctx`'s mask must cover `[new, cached + new]` positions. Where
    /// `ctx` skips padding, `x` and the output are `[1, N, hidden]` (no cache then).
    pub(crate) fn forward_cached(
        &self,
        x: &Tensor,
        ctx: &DeviceContext,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor, Error> {
        let unpad = ctx.unpad.as_ref();
        if unpad.is_some() && cache.is_some() {
            return Err(Error::BadInput("a key/value cache needs the padded layout".into()));
        }
        let (b, t) = match unpad {
            Some(u) => (u.rows, u.cols),
            None => (x.size()[0], x.size()[1]),
        };
        let (q, k, v) = self.project_qkv(x, unpad)?;
        let kind = q.f_kind()?;
        let (cos, sin) = (ctx.cos.f_to_kind(kind)?, ctx.sin.f_to_kind(kind)?);
        let q = apply_rope(&q, &cos, &sin)?;
        let mut k = apply_rope(&k, &cos, &sin)?;
        let mut v = v;
        let mut past = 0;
        if let Some(c) = cache {
            if let (Some(pk), Some(pv)) = (&c.k, &c.v) {
                past = pk.size()[2];
                k = Tensor::f_cat(&[pk, &k], 2)?;
                v = Tensor::f_cat(&[pv, &v], 2)?;
            }
            c.k = Some(k.shallow_clone());
            c.v = Some(v.shallow_clone());
        }
        // Without a mask, new queries see all cached keys and are causal among themselves; the
        // plain causal flag says exactly that only when nothing is cached.
        // 16-bit attention on a CPU without native 16-bit GEMMs runs in f32 (as the linears do,
        // see `quant::ops::matmul_in_f32`) and is rounded back.
        let upcast = quant::ops::matmul_in_f32(kind, q.device());
        let f32_of = |t: &Tensor| if upcast { t.f_to_kind(Kind::Float) } else { Ok(t.shallow_clone()) };
        // Grouped-query attention as transformers' sdpa path runs it: sdpa's own `enable_gqa`
        // only without a mask (and head dims up to 256); with one, keys and values repeated per
        // query group first. The forward is the same either way; the key/value gradients are
        // not (repeated heads' gradients are summed after rounding), and in bf16 that shows.
        let rep = self.heads / self.kv_heads;
        if self.scores.eager {
            let out = self.eager(&q, &k, &v, ctx.mask.as_ref(), past, upcast)?;
            return self.output(&out, b, t, unpad);
        }
        let causal = ctx.mask.is_none() && t > 1 && past == 0;
        if ctx.mask.is_none()
            && !upcast
            && quant::ops::attention_fits(quant::ops::CpuMatmul::current(), kind, q.device(), self.head_dim)
        {
            // The same attention as the sdpa call below, every product a native bf16 dot product
            // instead of torch's CPU flash kernel (see `quant::ops::attention`).
            let scale = self.scale();
            let out = quant::ops::attention(&q, &k, &v, causal, scale)?;
            return self.output(&out, b, t, unpad);
        }
        let repeat = rep > 1 && (ctx.mask.is_some() || self.head_dim > 256);
        let (k, v) = if repeat { (repeat_kv(&k, rep)?, repeat_kv(&v, rep)?) } else { (k, v) };
        let out = Tensor::f_scaled_dot_product_attention(
            &f32_of(&q)?,
            &f32_of(&k)?,
            &f32_of(&v)?,
            ctx.mask.as_ref(), // boolean
            0.0,
            causal,
            self.scores.scale,
            rep > 1 && !repeat,
        )?
        .f_to_kind(kind)?;
        self.output(&out, b, t, unpad)
    }

    /// `o_proj` of the heads' outputs `[B, heads, T, head_dim]`, on the real tokens only where
    /// the layers skip padding.
    fn output(&self, out: &Tensor, b: i64, t: i64, unpad: Option<&Unpad>) -> Result<Tensor, Error> {
        let out = out.f_transpose(1, 2)?.f_contiguous()?.f_view([b, t, self.heads * self.head_dim])?;
        let out = match unpad {
            Some(u) => u.gather_real(&out)?,
            None => out,
        };
        Ok(self.o_proj.forward(&out)?)
    }
}

impl Attention {
    /// The scores' scale: the model's, or `head_dim^-1/2` (what sdpa takes for `None`).
    fn scale(&self) -> f64 {
        self.scores.scale.unwrap_or(1.0 / (self.head_dim as f64).sqrt())
    }

    /// transformers' eager attention: keys and values repeated per group, `q k^T * scale`
    /// (soft-capped), the mask added as the dtype's lowest value, softmax in f32 rounded to the
    /// dtype, times `v`. With `upcast` each product runs in f32 and is rounded once (see
    /// `quant::ops::matmul_in_f32`).
    fn eager(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        past: i64,
        upcast: bool,
    ) -> Result<Tensor, Error> {
        let kind = q.f_kind()?;
        let rep = self.heads / self.kv_heads;
        let (k, v) = if rep > 1 {
            (repeat_kv(k, rep)?, repeat_kv(v, rep)?)
        } else {
            (k.shallow_clone(), v.shallow_clone())
        };
        let product = |a: &Tensor, b: &Tensor| -> Result<Tensor, tch::TchError> {
            if upcast {
                a.f_to_kind(Kind::Float)?.f_matmul(&b.f_to_kind(Kind::Float)?)?.f_to_kind(kind)
            } else {
                a.f_matmul(b)
            }
        };
        let scale = self.scale();
        let mut w = product(q, &k.f_transpose(2, 3)?)?.f_mul_scalar(scale)?;
        if let Some(cap) = self.scores.softcap {
            w = softcap(&w, cap)?;
        }
        let (t, total) = (q.size()[2], k.size()[2]);
        let causal;
        let allowed = match mask {
            Some(m) => Some(m),
            None if t > 1 && past == 0 => {
                causal = Tensor::f_ones([t, total], (Kind::Bool, q.device()))?.f_tril(0)?;
                Some(&causal)
            }
            None => None,
        };
        if let Some(m) = allowed {
            let lowest = Tensor::f_scalar_tensor(lowest_value(kind), (kind, q.device()))?;
            let zero = Tensor::f_zeros([], (kind, q.device()))?;
            w = w.f_add(&zero.f_where_self(m, &lowest)?)?;
        }
        let p = w.f_softmax(-1, Kind::Float)?.f_to_kind(kind)?;
        Ok(product(&p, &v)?)
    }
}

/// The lowest finite value of a floating dtype (`torch.finfo(dtype).min`), which transformers
/// adds at masked positions.
fn lowest_value(kind: Kind) -> f64 {
    match kind {
        Kind::BFloat16 => -3.389_531_389_251_535_5e38,
        Kind::Half => -65504.0,
        Kind::Double => f64::MIN,
        _ => f64::from(f32::MIN),
    }
}

/// One layer's keys and values so far (`[B, kv_heads, T, head_dim]`), for incremental decoding.
#[derive(Default)]
pub(crate) struct KvCache {
    pub(crate) k: Option<Tensor>,
    pub(crate) v: Option<Tensor>,
}

/// The gate and up projections: two linears, or one whose output holds gate then up (Phi-3's
/// `gate_up_proj`).
pub(crate) enum GateUp {
    Separate { gate_proj: Box<dyn Linear>, up_proj: Box<dyn Linear> },
    Fused { gate_up_proj: Box<dyn Linear> },
}

/// `down(act(gate(x)) * up(x))`: SwiGLU (silu) or, for Gemma, GeGLU (gelu, tanh approximation).
pub(crate) struct Mlp {
    pub(crate) gate_up: GateUp,
    pub(crate) down_proj: Box<dyn Linear>,
    pub(crate) gelu: bool,
}

/// An update added to a projection's output, from that projection's input (a LoRA of a
/// mixture's expert bank).
type Update<'a> = &'a dyn Fn(&Tensor) -> Result<Tensor, tch::TchError>;

impl Mlp {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor, Error> {
        self.forward_with(x, None, None)
    }

    /// The MLP with `gate_up` added to the gate and up outputs (`[.., 2 * intermediate]`, gate
    /// rows then up) and `down` to the down projection's.
    fn forward_with(
        &self,
        x: &Tensor,
        gate_up: Option<Update<'_>>,
        down: Option<Update<'_>>,
    ) -> Result<Tensor, Error> {
        let (mut g, mut u) = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => (gate_proj.forward(x)?, up_proj.forward(x)?),
            GateUp::Fused { gate_up_proj } => {
                let y = gate_up_proj.forward(x)?;
                let half = y.size().last().copied().unwrap_or(0) / 2;
                (y.f_narrow(-1, 0, half)?, y.f_narrow(-1, half, half)?)
            }
        };
        if let Some(update) = gate_up {
            let d = update(x)?;
            let inter = g.size().last().copied().unwrap_or(0);
            g = g.f_add(&d.f_narrow(-1, 0, inter)?)?;
            u = u.f_add(&d.f_narrow(-1, inter, inter)?)?;
        }
        let g = if self.gelu { g.f_gelu("tanh")? } else { g.f_silu()? };
        let z = g.f_mul(&u)?;
        let y = self.down_proj.forward(&z)?;
        match down {
            None => Ok(y),
            Some(update) => Ok(y.f_add(&update(&z)?)?),
        }
    }
}

/// A top-k mixture of SwiGLU experts in place of the MLP (Mixtral, Qwen3-MoE), computed as
/// transformers 5 computes it: the router's logits in the model's dtype, softmax in f32, the top
/// `k` (renormalised where the family does), then expert by expert in index order only the tokens
/// routed to it (gathered, through the expert, weighted, added back in place).
pub(crate) struct Experts {
    /// `[experts, hidden]`, unquantized (transformers 5's router is not a linear module).
    pub(crate) router: quant::linear::Dense,
    /// LoRA updates on the router's weight and the expert banks (PEFT's `target_parameters`).
    pub(crate) lora: ExpertLora,
    /// Each expert's gate/up/down (separate linears, SwiGLU).
    pub(crate) experts: Vec<Mlp>,
    pub(crate) top_k: i64,
    pub(crate) norm_topk_prob: bool,
    /// Weight each expert's output in f32 (Mixtral) or round the weights to the dtype first.
    pub(crate) weights_in_f32: bool,
}

/// A LoRA update on a parameter, in PEFT's `ParamWrapper` layout: for a 2-D weight
/// `scaling * B A`; for expert `e` of a bank of `experts`, `scaling * B[:, e::E] A[e*r..(e+1)*r]`.
pub struct ParamLora {
    /// A, `[experts * r, in]`.
    pub a: Tensor,
    /// B, `[out, experts * r]`.
    pub b: Tensor,
    /// The update's factor.
    pub scaling: f64,
    /// Experts in the bank (`None`: a 2-D weight).
    pub experts: Option<i64>,
    /// Read at each forward: off computes the base alone (a DPO reference).
    pub enabled: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ParamLora {
    fn on(&self) -> bool {
        self.enabled.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Expert `e`'s `(A_e, B_e)`.
    fn of_expert(&self, e: i64) -> Result<(Tensor, Tensor), tch::TchError> {
        let n = self.experts.unwrap_or(1);
        let r = self.a.size()[0] / n;
        let cols = Tensor::f_arange_start_step(e, n * r, n, (Kind::Int64, self.b.device()))?;
        Ok((self.a.f_narrow(0, e * r, r)?, self.b.f_index_select(1, &cols)?))
    }

    /// Expert `e`'s update as a function of its rows, when `lora` is there and on.
    fn of(
        lora: Option<&ParamLora>,
        e: i64,
    ) -> Option<impl Fn(&Tensor) -> Result<Tensor, tch::TchError> + '_> {
        lora.filter(|l| l.on()).map(move |l| move |x: &Tensor| l.update(x, e))
    }

    /// The update for inputs `x [n, in]` through expert `e`'s factors, in `x`'s dtype: computed
    /// in the factors' dtype, as a LoRA linear computes.
    fn update(&self, x: &Tensor, e: i64) -> Result<Tensor, tch::TchError> {
        let (a, b) = self.of_expert(e)?;
        let kind = x.f_kind()?;
        x.f_to_kind(a.f_kind()?)?
            .f_matmul(&a.f_transpose(0, 1)?)?
            .f_matmul(&b.f_transpose(0, 1)?)?
            .f_mul_scalar(self.scaling)?
            .f_to_kind(kind)
    }
}

/// A mixture's LoRA updates (each `None` when not adapted).
#[derive(Default)]
pub(crate) struct ExpertLora {
    pub(crate) router: Option<ParamLora>,
    pub(crate) gate_up: Option<ParamLora>,
    pub(crate) down: Option<ParamLora>,
}

impl Experts {
    /// The router's logits `[tokens, experts]` for `h [tokens, hidden]`; with a LoRA update, over
    /// the merged weight `W + scaling * B A` (PEFT's `ParamWrapper` merges before the product).
    fn route(&self, h: &Tensor) -> Result<Tensor, Error> {
        match self.lora.router.as_ref().filter(|l| l.on()) {
            None => Ok(self.router.forward(h)?),
            Some(l) => {
                let w = &self.router.weight;
                let delta = l.b.f_matmul(&l.a)?.f_mul_scalar(l.scaling)?.f_to_kind(w.f_kind()?)?;
                let merged = quant::linear::Dense::new(w.f_add(&delta)?, None)
                    .map_err(|source| Error::Quant { name: "router".into(), source })?;
                Ok(merged.forward(h)?)
            }
        }
    }

    /// Expert `e`'s SwiGLU on its gathered rows, with the banks' LoRA updates.
    fn expert(&self, e: usize, x: &Tensor) -> Result<Tensor, Error> {
        let (gate_up, down) = (self.lora.gate_up.as_ref(), self.lora.down.as_ref());
        let (gate_up, down) = (ParamLora::of(gate_up, e as i64), ParamLora::of(down, e as i64));
        self.experts[e].forward_with(
            x,
            gate_up.as_ref().map(|f| f as Update<'_>),
            down.as_ref().map(|f| f as Update<'_>),
        )
    }

    /// The mixture's output and the router's logits `[tokens, experts]` (in the model's dtype;
    /// the load-balancing loss reads them).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor), Error> {
        let shape = x.size();
        let hidden = shape.last().copied().unwrap_or(0);
        let h = x.f_reshape([-1, hidden])?;
        let logits = self.route(&h)?;
        let probs = logits.f_softmax(-1, Kind::Float)?;
        let (mut top, index) = probs.f_topk(self.top_k, -1, true, true)?;
        if self.norm_topk_prob {
            top = top.f_div(&top.f_sum_dim_intlist(&[-1i64][..], true, Kind::Float)?)?;
        }
        if !self.weights_in_f32 {
            top = top.f_to_kind(logits.f_kind()?)?;
        }
        let pad = h.device() == tch::Device::Cpu;
        Ok((self.mix(&h, &top, &index, pad)?.f_reshape(&shape)?, logits))
    }

    /// The experts' weighted outputs for `h [tokens, hidden]` routed by `index [tokens, k]`
    /// with weights `top`. With `pad`, each expert's gathered rows are padded (repeating its first
    /// row, whose copies' outputs are dropped) to device-map's row bucket: a CPU GEMM library
    /// compiles and keeps kernels per shape, and routed counts change every step.
    fn mix(&self, h: &Tensor, top: &Tensor, index: &Tensor, pad: bool) -> Result<Tensor, Error> {
        let kind = h.f_kind()?;
        let mut out = h.f_zeros_like()?;
        // `[k, tokens]` choices, read row-major per expert as `torch.where` reads its mask.
        let choices = index.f_transpose(0, 1)?.f_contiguous()?;
        for e in 0..self.experts.len() {
            let hit = choices.f_eq(e as i64)?.f_nonzero()?;
            let rows = hit.size()[0];
            if rows == 0 {
                continue;
            }
            let (slot, token) = (hit.f_select(1, 0)?, hit.f_select(1, 1)?);
            let padded =
                if pad { device_map::estimate::expert_rows_bucket(rows as u64) as i64 } else { rows };
            let y = if padded == rows {
                self.expert(e, &h.f_index_select(0, &token)?)?
            } else {
                let fill = token.f_narrow(0, 0, 1)?.f_expand([padded - rows], false)?;
                let gather = Tensor::f_cat(&[&token, &fill], 0)?;
                self.expert(e, &h.f_index_select(0, &gather)?)?.f_narrow(0, 0, rows)?
            };
            let w = top.f_index_select(0, &token)?.f_gather(1, &slot.f_unsqueeze(1)?, false)?;
            let y = y.f_mul(&w)?.f_to_kind(kind)?;
            out = out.f_index_add(0, &token, &y)?;
        }
        Ok(out)
    }
}

/// What follows attention in a decoder layer: one MLP, or a mixture of experts.
pub(crate) enum FeedForward {
    Mlp(Mlp),
    Experts(Experts),
}

impl FeedForward {
    /// The output and, for a mixture, the router's logits.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>), Error> {
        match self {
            FeedForward::Mlp(m) => Ok((m.forward(x)?, None)),
            FeedForward::Experts(e) => e.forward(x).map(|(y, logits)| (y, Some(logits))),
        }
    }
}

/// A pre-norm decoder layer: `x + attn(norm(x))`, then `h + mlp(norm(h))`. Gemma's also norms
/// each sub-block's output (`post_attention_layernorm` then normalises the attention output, and
/// `pre_`/`post_feedforward_layernorm` wrap the MLP).
pub(crate) struct DecoderLayer {
    pub(crate) input_layernorm: RmsNorm,
    pub(crate) self_attn: Attention,
    pub(crate) post_attention_layernorm: RmsNorm,
    pub(crate) mlp: FeedForward,
    pub(crate) feedforward_norms: Option<(RmsNorm, RmsNorm)>,
    /// Attends within the sliding window only (its tables from `DeviceContext::for_layer`).
    pub(crate) sliding: bool,
}

impl DecoderLayer {
    /// The layer's output and, for a mixture of experts, its router's logits.
    pub(crate) fn forward(&self, x: &Tensor, ctx: &DeviceContext) -> Result<(Tensor, Option<Tensor>), Error> {
        self.forward_routed(x, ctx, None)
    }

    pub(crate) fn forward_cached(
        &self,
        x: &Tensor,
        ctx: &DeviceContext,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor, Error> {
        Ok(self.forward_routed(x, ctx, cache)?.0)
    }

    fn forward_routed(
        &self,
        x: &Tensor,
        ctx: &DeviceContext,
        cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, Option<Tensor>), Error> {
        let ctx = ctx.for_layer(self.sliding);
        let a = self.self_attn.forward_cached(&self.input_layernorm.forward(x)?, ctx, cache)?;
        let Some((pre, post)) = &self.feedforward_norms else {
            let h = x.f_add(&a)?;
            let (m, logits) = self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?;
            return Ok((h.f_add(&m)?, logits));
        };
        let h = x.f_add(&self.post_attention_layernorm.forward(&a)?)?;
        let (m, logits) = self.mlp.forward(&pre.forward(&h)?)?;
        Ok((h.f_add(&post.forward(&m)?)?, logits))
    }

    /// The layer's linears by their transformers names relative to the layer.
    pub(crate) fn linears_mut(&mut self) -> Vec<(&'static str, &mut Box<dyn Linear>)> {
        use device_map::estimate::{ATTENTION_LINEARS, DECODER_LINEARS, FUSED_DECODER_LINEARS};
        let a = &mut self.self_attn;
        // In device-map's table order (the names come from there).
        let mut slots: Vec<&mut Box<dyn Linear>> = Vec::with_capacity(7);
        match &mut a.qkv {
            Qkv::Separate { q_proj, k_proj, v_proj } => slots.extend([q_proj, k_proj, v_proj]),
            Qkv::Fused { qkv_proj } => slots.push(qkv_proj),
        }
        slots.push(&mut a.o_proj);
        // A mixture's experts are not offered (transformers keeps them as one module's
        // parameters, out of reach of PEFT's `target_modules`).
        let names: &[&'static str] = match &mut self.mlp {
            FeedForward::Experts(_) => &ATTENTION_LINEARS,
            FeedForward::Mlp(m) => {
                match &mut m.gate_up {
                    GateUp::Separate { gate_proj, up_proj } => slots.extend([gate_proj, up_proj]),
                    GateUp::Fused { gate_up_proj } => slots.push(gate_up_proj),
                }
                slots.push(&mut m.down_proj);
                if slots.len() == 7 { &DECODER_LINEARS } else { &FUSED_DECODER_LINEARS }
            }
        };
        names.iter().copied().zip(slots).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(out: i64, inp: i64) -> Box<dyn Linear> {
        let w = Tensor::randn([out, inp], (Kind::Float, tch::Device::Cpu)) * 0.1;
        Box::new(quant::linear::Dense::new(w, None).expect("dense"))
    }

    /// Padding each expert's rows to its bucket changes no routed token's output nor the input's
    /// gradient: the padded copies' outputs are dropped before the weighting.
    #[test]
    fn padded_expert_rows_give_the_unpadded_mixture() {
        tch::manual_seed(0);
        let (hidden, width, n_experts, tokens) = (8, 12, 4, 150);
        let experts = (0..n_experts)
            .map(|_| Mlp {
                gate_up: GateUp::Separate { gate_proj: dense(width, hidden), up_proj: dense(width, hidden) },
                down_proj: dense(hidden, width),
                gelu: false,
            })
            .collect();
        let router = quant::linear::Dense::new(
            Tensor::randn([n_experts, hidden], (Kind::Float, tch::Device::Cpu)),
            None,
        )
        .expect("router");
        let moe = Experts {
            router,
            lora: ExpertLora::default(),
            experts,
            top_k: 2,
            norm_topk_prob: true,
            weights_in_f32: true,
        };
        let h = Tensor::randn([tokens, hidden], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let probs = moe.route(&h).expect("route").softmax(-1, Kind::Float);
        let (top, index) = probs.topk(2, -1, true, true);
        // At least one expert gets a row count that pads (150 * 2 / 4 = 75 rows on average).
        let rows = |e: i64| index.eq(e).sum(Kind::Int64).int64_value(&[]) as u64;
        assert!((0..n_experts).any(|e| device_map::estimate::expert_rows_bucket(rows(e)) != rows(e)));
        let run = |pad: bool| {
            let y = moe.mix(&h, &top.detach(), &index, pad).expect("mix");
            let g = Tensor::randn_like(&y);
            let dh = Tensor::run_backward(&[y.f_mul(&g).expect("mul").sum(Kind::Float)], &[&h], false, false);
            (y.detach(), dh[0].shallow_clone())
        };
        let ((y0, g0), (y1, g1)) = {
            tch::manual_seed(1);
            let a = run(false);
            tch::manual_seed(1);
            (a, run(true))
        };
        let close = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        assert!(close(&y0, &y1) < 1e-6, "outputs differ by {}", close(&y0, &y1));
        assert!(close(&g0, &g1) < 1e-6, "input gradients differ by {}", close(&g0, &g1));
    }

    /// Unmasked bf16 attention runs nibble's kernel where it fits (and torch's sdpa under
    /// `cpu_matmul: native`): the layer's output is the kernel's on its own projections, and
    /// within bf16 rounding of torch's grouped-query sdpa.
    #[test]
    fn unmasked_bf16_attention_takes_the_kernel_where_it_fits() {
        tch::manual_seed(3);
        let (hidden, heads, kv_heads, head_dim, t) = (64, 4, 2, 16, 20);
        let bf = |out: i64, inp: i64| -> Box<dyn Linear> {
            let w =
                (Tensor::randn([out, inp], (Kind::Float, tch::Device::Cpu)) * 0.2).to_kind(Kind::BFloat16);
            Box::new(quant::linear::Dense::new(w, None).expect("dense"))
        };
        let attn = Attention {
            qkv: Qkv::Separate {
                q_proj: bf(heads * head_dim, hidden),
                k_proj: bf(kv_heads * head_dim, hidden),
                v_proj: bf(kv_heads * head_dim, hidden),
            },
            o_proj: bf(hidden, heads * head_dim),
            q_norm: None,
            k_norm: None,
            heads,
            kv_heads,
            head_dim,
            scores: ScoreOptions { scale: None, softcap: None, eager: false },
        };
        // Rotation by zero angles: the tables leave q and k as projected.
        let table = |v: f64| Tensor::full([1, t, head_dim], v, (Kind::BFloat16, tch::Device::Cpu));
        let ctx = DeviceContext { cos: table(1.0), sin: table(0.0), mask: None, sliding: None, unpad: None };
        let x = Tensor::randn([2, t, hidden], (Kind::Float, tch::Device::Cpu)).to_kind(Kind::BFloat16);
        let got = attn.forward_cached(&x, &ctx, None).expect("attention");
        let (q, k, v) = attn.project_qkv(&x, None).expect("projections");
        let scale = 1.0 / (head_dim as f64).sqrt();
        let sdpa =
            Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, Some(scale), true);
        let sdpa = attn.output(&sdpa, 2, t, None).expect("output");
        let policy = quant::ops::CpuMatmul::current();
        let want = if quant::ops::attention_fits(policy, Kind::BFloat16, tch::Device::Cpu, head_dim) {
            let out = quant::ops::attention(&q, &k, &v, true, scale).expect("kernel");
            attn.output(&out, 2, t, None).expect("output")
        } else {
            sdpa.shallow_clone()
        };
        assert!(got.equal(&want), "the layer's attention is not the path it should take");
        let (g, w) = (got.to_kind(Kind::Float), sdpa.to_kind(Kind::Float));
        let off = (&g - &w).abs().max().double_value(&[]) / w.abs().max().double_value(&[]);
        assert!(off < 2e-2, "off torch's sdpa by {off}");
    }
}
