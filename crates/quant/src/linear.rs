//! Linear layers behind one small trait ([`Linear`](crate::linear::Linear)), so that adapters
//! (`lora`) and model code can wrap or call any of them without knowing which:
//! [`Dense`](crate::linear::Dense) (plain weight), [`Linear4bit`](crate::linear::Linear4bit)
//! (a 4-bit weight that is dequantized on the fly in forward and again in backward, so no
//! dequantized copy stays alive between the two) and [`Linear8bit`](crate::linear::Linear8bit)
//! (bitsandbytes' `Linear8bitLt` with `has_fp16_weights=False`: LLM.int8()).
//!
//! # LLM.int8()
//!
//! An 8-bit layer keeps its weight as int8 codes with one f32 scale per row (`SCB`), and in
//! forward quantizes its input the same way, row by row, after moving aside the columns that
//! hold an outlier (`|x| >= threshold`, 6.0 by default): large activation features are few but
//! systematic in big models, and one of them would crush the int8 resolution of its whole row.
//! The int8 product (exact in int32) is scaled back by `SCA * SCB / 127^2`, and the outlier
//! columns are added in the input's own dtype against the dequantized weight columns. This is
//! bitsandbytes' `MatMul8bitLt` op for op (its torch backend's order of operations, so the CPU
//! numbers are its own), except where its paths disagree:
//!
//! - the product's scale is the f32 nearest `1/127^2` (CUDA's `6.200012e-05`); bitsandbytes'
//!   torch backend has `6.200124e-05`, 1.8e-5 too large, so its CPU outputs of the int8 part are
//!   that much larger than nibble's (and its CUDA ones);
//! - the int8 part is rounded once into the output dtype; the CUDA kernel writes it as float16
//!   first (its only output type), which an f32 or bf16 layer there does not undo;
//! - the int32 product is exact for any width; bitsandbytes' CPU fallback (CPUs without
//!   AVX-512) multiplies in f32, which rounds once a sum passes 2^24 (inputs wider than 1040).
//!
//! Activations are quantized from float16, as bitsandbytes casts them (the threshold is compared
//! in float16 too). The backward pass is the straight-through one bitsandbytes uses: the input
//! gradient is `grad_y @ W` with `W = code * (SCB / 127)` in the input's dtype, rebuilt from
//! the codes in backward so no dequantized copy lives between the passes; the weight never gets
//! a gradient.
//!
//! bitsandbytes runs a different forward on the CPU in training mode (`MatMul8bitFp`: dequantize
//! the weight, then a plain linear, no activation quantization);
//! [`Int8Matmul::Dequantized`](crate::linear::Int8Matmul::Dequantized) is that path, for matching
//! a CPU training run of the Python stack.

use tch::{Device, Kind, Tensor};

use crate::Error;
use crate::ops::{self, Absmax4, QuantizeOptions, Quantized4bit, Quantized8bit};

/// A linear layer `y = x W^T + b`, whatever W's storage.
pub trait Linear {
    /// Apply the layer to `x [..., in_features]`, giving `[..., out_features]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor, Error>;
    /// Input features (W's columns).
    fn in_features(&self) -> i64;
    /// Output features (W's rows).
    fn out_features(&self) -> i64;
    /// Where the weight lives, so wrappers (LoRA adapters) can put their own tensors beside it.
    fn device(&self) -> Device;
}

fn weight_dims(weight_shape: &[i64]) -> Result<(i64, i64), Error> {
    match weight_shape {
        [out, inp] => Ok((*out, *inp)),
        other => Err(Error::BadTensor {
            what: "weight",
            problem: format!("must be 2-D [out, in], got shape {other:?}"),
        }),
    }
}

/// An input's last dimension must be the layer's input features.
fn check_in_features(x: &Tensor, in_features: i64) -> Result<(), Error> {
    if x.size().last().copied() != Some(in_features) {
        return Err(Error::BadTensor {
            what: "input",
            problem: format!("last dimension must be {in_features}, got shape {:?}", x.size()),
        });
    }
    Ok(())
}

fn check_bias(bias: Option<&Tensor>, out_features: i64) -> Result<(), Error> {
    match bias {
        Some(b) if b.size() != [out_features] => Err(Error::BadTensor {
            what: "bias",
            problem: format!("must have shape [{out_features}], got {:?}", b.size()),
        }),
        _ => Ok(()),
    }
}

/// A plain linear layer: `x.linear(weight, bias)` (libtorch's `at::linear`).
#[derive(Debug)]
pub struct Dense {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`, if any.
    pub bias: Option<Tensor>,
}

impl Dense {
    /// A dense layer from a `[out, in]` weight and an optional `[out]` bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self, Error> {
        let (out, _) = weight_dims(&weight.size())?;
        check_bias(bias.as_ref(), out)?;
        Ok(Dense { weight, bias })
    }
}

impl Linear for Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor, Error> {
        let kind = self.weight.f_kind()?;
        if x.f_kind()? == kind && ops::matmul_in_f32(kind, self.weight.device()) {
            if self.weight.requires_grad() || self.bias.as_ref().is_some_and(Tensor::requires_grad) {
                // Trainable (modules_to_save): plain ops, so autograd grads the weight too.
                let f = Kind::Float;
                let b = self.bias.as_ref().map(|b| b.f_to_kind(f)).transpose()?;
                return Ok(x
                    .f_to_kind(f)?
                    .f_linear(&self.weight.f_to_kind(f)?, b.as_ref())?
                    .f_to_kind(kind)?);
            }
            return ops::dense_upcast_linear(x, &self.weight, self.bias.as_ref());
        }
        Ok(x.f_linear(&self.weight, self.bias.as_ref())?)
    }
    fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }
    fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }
    fn device(&self) -> Device {
        self.weight.device()
    }
}

/// A linear layer with a 4-bit weight (bitsandbytes' `Linear4bit`): computes in `compute_dtype`,
/// returns the input's dtype (as bitsandbytes does), gives exact input gradients, and never grads
/// the weight.
#[derive(Debug)]
pub struct Linear4bit {
    weight: Quantized4bit,
    bias: Option<Tensor>,
    compute_dtype: Kind,
    out_features: i64,
    in_features: i64,
    /// Where the layer computes when that is not where its weight is stored (CPU offload).
    exec_device: Option<Device>,
}

impl Linear4bit {
    /// A layer from an already quantized `[out, in]` weight, an optional `[out]` bias, and the
    /// compute dtype (Float, Half or BFloat16).
    pub fn new(weight: Quantized4bit, bias: Option<Tensor>, compute_dtype: Kind) -> Result<Self, Error> {
        let (out_features, in_features) = weight_dims(&weight.shape)?;
        check_bias(bias.as_ref(), out_features)?;
        if !matches!(compute_dtype, Kind::Float | Kind::Half | Kind::BFloat16) {
            return Err(Error::BadTensor {
                what: "compute dtype",
                problem: format!("{compute_dtype:?} is not supported (use Float, Half or BFloat16)"),
            });
        }
        Ok(Linear4bit { weight, bias, compute_dtype, out_features, in_features, exec_device: None })
    }

    /// Compute on `device` while the 4-bit weight stays where it is (CPU offload of a layer that
    /// runs on a GPU): the bias moves to `device`, adapters built beside the layer go there
    /// ([`Linear::device`]), and each product copies the packed codes and scales to the input's
    /// device (a quarter of the bf16 bytes), keeping no copy between forward and backward.
    pub fn with_exec_device(mut self, device: Device) -> Result<Self, Error> {
        self.bias = self.bias.map(|b| b.f_to_device(device)).transpose()?;
        self.exec_device = (device != self.weight.packed.device()).then_some(device);
        Ok(self)
    }

    /// Quantize a dense `[out, in]` weight and build the layer.
    pub fn quantize(
        weight: &Tensor,
        bias: Option<Tensor>,
        opts: QuantizeOptions,
        compute_dtype: Kind,
    ) -> Result<Self, Error> {
        weight_dims(&weight.size())?;
        Linear4bit::new(Quantized4bit::quantize(weight, opts)?, bias, compute_dtype)
    }

    /// The quantized weight.
    pub fn weight(&self) -> &Quantized4bit {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The dtype the layer computes in (and returns).
    pub fn compute_dtype(&self) -> Kind {
        self.compute_dtype
    }
}

impl Linear for Linear4bit {
    fn forward(&self, x: &Tensor) -> Result<Tensor, Error> {
        check_in_features(x, self.in_features)?;
        // Casts are tracked by autograd, so gradients flow back in the caller's dtype.
        let input_kind = x.f_kind()?;
        // 16-bit compute on a CPU without native 16-bit GEMMs: the matmuls run in f32 on the
        // weight's 16-bit values (dequantized straight into f32) and the result is rounded to the
        // compute dtype, so only the summation order differs from torch's 16-bit GEMMs.
        // The product runs on x's device; a weight stored elsewhere is streamed there.
        let device = x.device();
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            crate::cuda::register_kernels();
        }
        let upcast = ops::matmul_in_f32(self.compute_dtype, device);
        let run_kind = if upcast { Kind::Float } else { self.compute_dtype };
        let x = x.f_to_kind(self.compute_dtype)?.f_to_kind(run_kind)?;
        let bias =
            self.bias.as_ref().map(|b| b.f_to_kind(self.compute_dtype)?.f_to_kind(run_kind)).transpose()?;
        // With double quantization the f32 absmax (1/16 of the packed bytes at blocksize 64) is
        // rebuilt per call; the Function saves it, never the dequantized weight.
        let absmax = match &self.weight.absmax {
            Absmax4::Plain(a) => a.shallow_clone(),
            Absmax4::Nested { .. } => self.weight.absmax_f32()?,
        };
        let y = ops::linear4bit_forward(
            &x,
            &self.weight.packed,
            &absmax,
            bias.as_ref(),
            self.out_features,
            self.in_features,
            self.weight.blocksize,
            self.weight.quant_type,
            upcast.then_some(self.compute_dtype),
        )?;
        Ok(y.f_to_kind(self.compute_dtype)?.f_to_kind(input_kind)?)
    }
    fn in_features(&self) -> i64 {
        self.in_features
    }
    fn out_features(&self) -> i64 {
        self.out_features
    }
    fn device(&self) -> Device {
        self.exec_device.unwrap_or_else(|| self.weight.packed.device())
    }
}

/// How an 8-bit layer multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Int8Matmul {
    /// LLM.int8(): int8 x int8 product plus the outlier columns in floating point
    /// (bitsandbytes' `MatMul8bitLt`: on GPUs always, on the CPU in eval mode).
    #[default]
    Decomposed,
    /// Dequantize the weight and run a plain linear (bitsandbytes' `MatMul8bitFp`, what it runs
    /// on the CPU in training mode).
    Dequantized,
}

/// Options of an 8-bit layer (bitsandbytes' defaults: threshold 6.0, decomposed matmul).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Int8Options {
    /// Input columns holding a value with `|x| >= threshold` are computed in floating point
    /// (`llm_int8_threshold`); 0 turns the decomposition off.
    pub threshold: f32,
    /// Which forward to run.
    pub matmul: Int8Matmul,
}

impl Default for Int8Options {
    fn default() -> Self {
        Int8Options { threshold: 6.0, matmul: Int8Matmul::Decomposed }
    }
}

/// A linear layer with a row-wise int8 weight (bitsandbytes' `Linear8bitLt` with
/// `has_fp16_weights=False`): computes and returns in the input's dtype, gives input gradients
/// through the dequantized weight, and never grads the weight.
#[derive(Debug)]
pub struct Linear8bit {
    weight: Quantized8bit,
    bias: Option<Tensor>,
    options: Int8Options,
    out_features: i64,
    in_features: i64,
}

impl Linear8bit {
    /// A layer from an already quantized `[out, in]` weight and an optional `[out]` bias.
    pub fn new(weight: Quantized8bit, bias: Option<Tensor>, options: Int8Options) -> Result<Self, Error> {
        let (out_features, in_features) = weight_dims(&weight.codes.size())?;
        if weight.codes.f_kind()? != Kind::Int8 {
            return Err(Error::BadTensor {
                what: "weight",
                problem: format!("codes must be Int8, got {:?}", weight.codes.kind()),
            });
        }
        if weight.scb.size() != [out_features] || weight.scb.f_kind()? != Kind::Float {
            return Err(Error::BadTensor {
                what: "SCB",
                problem: format!(
                    "must be Float [{out_features}], got {:?} {:?}",
                    weight.scb.kind(),
                    weight.scb.size()
                ),
            });
        }
        check_bias(bias.as_ref(), out_features)?;
        if !options.threshold.is_finite() || options.threshold < 0.0 {
            return Err(Error::BadTensor {
                what: "threshold",
                problem: format!("must be finite and >= 0, got {}", options.threshold),
            });
        }
        Ok(Linear8bit { weight, bias, options, out_features, in_features })
    }

    /// Quantize a dense `[out, in]` weight (through float16, as bitsandbytes) and build the layer.
    pub fn quantize(weight: &Tensor, bias: Option<Tensor>, options: Int8Options) -> Result<Self, Error> {
        weight_dims(&weight.size())?;
        Linear8bit::new(Quantized8bit::quantize(weight)?, bias, options)
    }

    /// The quantized weight.
    pub fn weight(&self) -> &Quantized8bit {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The layer's options.
    pub fn options(&self) -> Int8Options {
        self.options
    }
}

impl Linear for Linear8bit {
    fn forward(&self, x: &Tensor) -> Result<Tensor, Error> {
        check_in_features(x, self.in_features)?;
        let kind = x.f_kind()?;
        if !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16) {
            return Err(Error::BadTensor {
                what: "input",
                problem: format!("dtype {kind:?} is not supported (use Float, Half or BFloat16)"),
            });
        }
        // bitsandbytes casts the bias to the input's dtype; the cast is tracked by autograd.
        let bias = self.bias.as_ref().map(|b| b.f_to_kind(kind)).transpose()?;
        // Compared with the float16 activations in float16, as torch compares them.
        let threshold = f64::from(self.options.threshold);
        let mode = match self.options.matmul {
            Int8Matmul::Decomposed => 0,
            Int8Matmul::Dequantized => 1,
        };
        // Float matmuls of a 16-bit input in f32 where the CPU has no native 16-bit GEMMs.
        let mode = mode | if ops::matmul_in_f32(kind, x.device()) { 2 } else { 0 };
        ops::linear8bit_forward(x, &self.weight, bias.as_ref(), threshold, mode)
    }
    fn in_features(&self) -> i64 {
        self.in_features
    }
    fn out_features(&self) -> i64 {
        self.out_features
    }
    fn device(&self) -> Device {
        self.weight.codes.device()
    }
}
