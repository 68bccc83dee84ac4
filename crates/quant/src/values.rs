//! The values a user types for quantization (on `quant`'s and `sft quantize`'s command lines),
//! parsed by one set of rules so both tools accept and refuse the same spellings.

use crate::QuantType;

/// `nf4` / `fp4`.
pub fn quant_type(v: &str) -> Result<QuantType, String> {
    v.parse::<QuantType>().map_err(|_| format!("`{v}` is not nf4 or fp4"))
}

/// A blocksize bitsandbytes supports (a power of two, 32..4096).
pub fn blocksize(v: &str) -> Result<usize, String> {
    let b: usize = v.parse().map_err(|_| format!("`{v}` is not a number"))?;
    crate::codec::check_blocksize(b).map_err(|e| e.to_string())?;
    Ok(b)
}

/// A floating dtype as torch names it (`bfloat16`, `float16`, `float32`), from its short or long
/// spelling (`bf16`, `fp16` / `f16`, `fp32` / `f32`, or torch's own name).
pub fn float_dtype(v: &str) -> Result<&'static str, String> {
    Ok(match v {
        "bf16" | "bfloat16" => "bfloat16",
        "fp16" | "f16" | "float16" => "float16",
        "fp32" | "f32" | "float32" => "float32",
        other => return Err(format!("unknown dtype `{other}` (bf16, fp16 or fp32)")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_parse_and_the_rest_is_refused_with_the_value() {
        assert_eq!(quant_type("nf4"), Ok(QuantType::Nf4));
        assert_eq!(quant_type("fp4"), Ok(QuantType::Fp4));
        assert!(quant_type("int4").expect_err("refused").contains("int4"));
        assert_eq!(blocksize("128"), Ok(128));
        assert!(blocksize("100").is_err());
        assert!(blocksize("x").expect_err("refused").contains("`x`"));
        assert_eq!(float_dtype("bf16"), Ok("bfloat16"));
        assert_eq!(float_dtype("float16"), Ok("float16"));
        assert_eq!(float_dtype("f32"), Ok("float32"));
        assert!(float_dtype("int8").expect_err("refused").contains("int8"));
    }
}
