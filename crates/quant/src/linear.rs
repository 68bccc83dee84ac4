//! Linear layers behind one small trait ([`Linear`](crate::linear::Linear)), so that adapters
//! (`lora`) and model code can wrap or call any of them without knowing which:
//! [`Dense`](crate::linear::Dense) (plain weight) and [`Linear4bit`](crate::linear::Linear4bit)
//! (a 4-bit weight that is dequantized on the fly in forward and again in backward, so no
//! dequantized copy stays alive between the two).

use tch::{Device, Kind, Tensor};

use crate::Error;
use crate::ops::{self, Absmax4, QuantizeOptions, Quantized4bit};

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
        Ok(Linear4bit { weight, bias, compute_dtype, out_features, in_features })
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
        let last = x.size().last().copied();
        if last != Some(self.in_features) {
            return Err(Error::BadTensor {
                what: "input",
                problem: format!("last dimension must be {}, got shape {:?}", self.in_features, x.size()),
            });
        }
        // Casts are tracked by autograd, so gradients flow back in the caller's dtype.
        let input_kind = x.f_kind()?;
        let x = x.f_to_kind(self.compute_dtype)?;
        let bias = self.bias.as_ref().map(|b| b.f_to_kind(self.compute_dtype)).transpose()?;
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
        )?;
        Ok(y.f_to_kind(input_kind)?)
    }
    fn in_features(&self) -> i64 {
        self.in_features
    }
    fn out_features(&self) -> i64 {
        self.out_features
    }
    fn device(&self) -> Device {
        self.weight.packed.device()
    }
}
