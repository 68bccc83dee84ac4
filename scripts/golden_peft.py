# /// script
# requires-python = ">=3.11"
# dependencies = ["peft==0.21.2", "torch==2.11.0", "transformers==5.24.0", "safetensors==0.8.0", "bitsandbytes==0.50.2"]
# ///
"""Write golden LoRA adapters made by PEFT, for crates/lora/tests/peft.rs.

A tiny model of plain nn.Linear modules named as in a transformers decoder
(`model.layers.N.self_attn.q_proj`, ..., `model.layers.N.mlp.down_proj`) gets a LoRA adapter per
case through `get_peft_model`; A and B are filled with seeded random values (B non-zero, so the
adapter changes the output) and saved with `PeftModel.save_pretrained`. `base.safetensors` holds
the base weights, one input per module (`x.<module>`) and each case's output of every module in
eval mode (`<case>.<module>`), the untargeted ones included. Everything is seeded, so a rerun
gives the same files (the outputs up to the CPU's float rounding).

Three more kinds of case have their own folders, each with the adapter PEFT saved and an
`expected.safetensors` of what PEFT computed with it:
- DoRA (`use_dora=True`) on the toy with dense linears (`dora_dense`) and on a toy of bitsandbytes
  4-bit linears (`dora_4bit`, whose packed weights and absmax are stored, so nibble runs the same
  4-bit weights): outputs in eval mode, and for each adapted module, in both the eval path and the
  training path with dropout (seeded before each call), the output and the gradients of A, B, the
  magnitude and the input for a fixed upstream gradient.
- `modules_to_save` on the tiny transformers models of crates/model-loader/tests/golden: `lm_head`
  on the Llama, whose head is tied to its embeddings (`mts_llama`), and `lm_head` +
  `embed_tokens` with DoRA on the untied Qwen2 (`mts_qwen2_dora`): logits, the gradients of the
  trainable copies for a fixed upstream gradient, and PEFT's trainable-parameters line (metadata).

PEFT writes `target_modules` in Python set order, which changes with the hash seed; this script
rewrites that list sorted, in PEFT's own JSON layout, so the files are stable.

Regenerate (after `cargo xtask setup`, with the pinned reference stack):
    "$NIBBLE_PYTHON" scripts/golden_peft.py crates/lora/tests/golden/peft
"""

import json
import os
import pathlib
import sys
import warnings

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# save_pretrained looks up the base model's config.json on the Hub; the toy has none to find.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message="Could not find a config file in")

sys.path.insert(0, str(pathlib.Path(__file__).parent / "refcpu"))
import nibble_refcpu  # noqa: E402

# bitsandbytes' CPU paths as on the AVX2 host the committed files were made on, set before torch
# is imported (docs/reference-cpu-paths.md).
nibble_refcpu.apply(default="avx2")

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

LAYERS = 2
HIDDEN, KV, INTER = 16, 8, 24
# Module -> (out_features, in_features, bias), as in a Qwen2-like decoder with grouped KV heads.
SHAPES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN, True),
    "self_attn.k_proj": (KV, HIDDEN, True),
    "self_attn.v_proj": (KV, HIDDEN, True),
    "self_attn.o_proj": (HIDDEN, HIDDEN, False),
    "mlp.gate_proj": (INTER, HIDDEN, False),
    "mlp.up_proj": (INTER, HIDDEN, False),
    "mlp.down_proj": (HIDDEN, INTER, False),
}

# Case -> (LoraConfig arguments, adapter dtype). Each covers a way to name targets.
CASES = {
    "list_rslora": (
        dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "mlp.down_proj"], use_rslora=True),
        torch.float32,
    ),
    "regex_bf16": (
        dict(
            r=2,
            lora_alpha=16,
            target_modules=r"model\.layers\.1\.(self_attn\.(k|o)_proj|mlp\.up_proj)",
            init_lora_weights="gaussian",
        ),
        torch.bfloat16,
    ),
    "all_linear": (
        dict(r=8, lora_alpha=16, target_modules="all-linear", base_model_name_or_path="nibble/toy-decoder"),
        torch.float32,
    ),
}


class Block(nn.Module):
    def __init__(self, names):
        super().__init__()
        for name in names:
            out_f, in_f, bias = SHAPES[name]
            setattr(self, name.split(".")[1], nn.Linear(in_f, out_f, bias=bias))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Block([n for n in SHAPES if n.startswith("self_attn.")])
        self.mlp = Block([n for n in SHAPES if n.startswith("mlp.")])


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))


class Toy(nn.Module):
    """Only the decoder's linears, under transformers' names; there is no forward."""

    def __init__(self):
        super().__init__()
        self.model = Decoder()

    def prepare_inputs_for_generation(self, *args, **kwargs):
        # PeftModelForCausalLM (task_type CAUSAL_LM) looks this up when it wraps the model.
        return kwargs


def module_names():
    return [f"model.layers.{i}.{m}" for i in range(LAYERS) for m in SHAPES]


def toy(base):
    """The toy model with the base weights of `base` (a dict from base.safetensors)."""
    model = Toy()
    model.load_state_dict({k: v for k, v in base.items() if k.endswith((".weight", ".bias"))})
    return model


def make_base():
    g = torch.Generator().manual_seed(0)
    base = {}
    for name in module_names():
        out_f, in_f, bias = SHAPES[name.split(".", 3)[3]]
        base[f"{name}.weight"] = torch.randn(out_f, in_f, generator=g) * 0.2
        if bias:
            base[f"{name}.bias"] = torch.randn(out_f, generator=g) * 0.1
        base[f"x.{name}"] = torch.randn(2, 3, in_f, generator=g)
    return base


def sort_targets(path):
    """Rewrite a PEFT adapter_config.json with `target_modules` sorted, keeping PEFT's layout."""
    config = json.loads(path.read_text())
    if isinstance(config["target_modules"], list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def peft_model(kwargs, base):
    """`get_peft_model` on the toy; like a transformers model, it carries the base model's id
    (PEFT takes `base_model_name_or_path` from the model's `name_or_path`)."""
    kwargs = dict(kwargs)
    model = toy(base)
    model.name_or_path = kwargs.pop("base_model_name_or_path", None)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **kwargs))


def make_case(name, kwargs, dtype, base, out_dir):
    torch.manual_seed(0)  # PEFT's own init draws from the global generator; overwritten below
    model = peft_model(kwargs, base)
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    with torch.no_grad():
        for key, param in sorted(model.named_parameters()):
            if ".lora_" in key:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.lora_A.to(dtype)
            module.lora_B.to(dtype)
    model.eval()
    outputs = {}
    with torch.no_grad():
        for module in module_names():
            layer = model.base_model.model.get_submodule(module)
            outputs[f"{name}.{module}"] = layer(base[f"x.{module}"]).contiguous()
    model.save_pretrained(out_dir / name)
    (out_dir / name / "README.md").unlink()  # the model card PEFT writes beside the adapter
    sort_targets(out_dir / name / "adapter_config.json")
    return outputs


# ---------------------------------------------------------------------------------------------
# DoRA

# Case -> LoraConfig arguments; the dense case runs on the toy above, the 4-bit one on `toy4`.
DORA_CASES = {
    "dora_dense": dict(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "o_proj", "mlp.down_proj"], use_dora=True
    ),
    "dora_4bit": dict(r=2, lora_alpha=6, lora_dropout=0.2, target_modules=["q_proj", "down_proj"], use_dora=True),
}

# The 4-bit toy: one layer; in_features multiples of the blocksize and out_features not multiples
# of 32, away from the bitsandbytes CPU kernels' known quirks (see REFERENCE.md).
SHAPES4 = {
    "self_attn.q_proj": (40, 64, True),
    "self_attn.v_proj": (24, 64, False),
    "mlp.down_proj": (40, 128, False),
}


def module_names4():
    return [f"model.layers.0.{m}" for m in SHAPES4]


class Toy4(nn.Module):
    """bitsandbytes 4-bit linears (NF4, blocksize 64, no double quant, f32 compute) under
    transformers' names."""

    is_loaded_in_4bit = True  # PeftModel dispatches to its bitsandbytes LoRA layers on this

    def __init__(self, base4):
        import bitsandbytes as bnb

        super().__init__()
        layer = nn.Module()
        layer.self_attn, layer.mlp = nn.Module(), nn.Module()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([layer])
        for name in module_names4():
            out_f, in_f, bias = SHAPES4[name.split(".", 3)[3]]
            linear = bnb.nn.Linear4bit(
                in_f, out_f, bias=bias, compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4"
            )
            linear.weight = bnb.nn.Params4bit(
                base4[f"{name}.weight"].clone(),
                requires_grad=False,
                compress_statistics=False,
                quant_type="nf4",
                blocksize=64,
            )
            if bias:
                linear.bias = nn.Parameter(base4[f"{name}.bias"].clone())
            parent, child = name.rsplit(".", 1)
            # Moving to the CPU quantizes the weight.
            self.get_submodule(parent).add_module(child, linear.to("cpu"))
        # Eval-mode outputs on the path every CPU takes: on an AVX512-BF16 host bitsandbytes would
        # repack these weights for its fused kernel (and assert out_features % 32 == 0).
        nibble_refcpu.portable_4bit(self)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return kwargs


def make_base4():
    g = torch.Generator().manual_seed(4)
    base = {}
    for name in module_names4():
        out_f, in_f, bias = SHAPES4[name.split(".", 3)[3]]
        base[f"{name}.weight"] = torch.randn(out_f, in_f, generator=g) * 0.2
        if bias:
            base[f"{name}.bias"] = torch.randn(out_f, generator=g) * 0.1
        base[f"x.{name}"] = torch.randn(2, 3, in_f, generator=g)
    return base


def toy4(base4):
    """The 4-bit toy quantized from the f32 weights of `base4`; adds the packed weights and
    absmax (`<module>.packed`, `<module>.absmax`) to `base4`."""
    model = Toy4(base4)
    for name in module_names4():
        w = model.get_submodule(name).weight
        base4[f"{name}.packed"] = w.data.clone()
        base4[f"{name}.absmax"] = w.quant_state.absmax.clone()
    return model


def fill_adapter(model, g):
    """Values from generator `g` in every trainable tensor, as if trained: A and B random, the
    DoRA magnitude scaled by 1 + 0.2 * noise, modules_to_save copies moved by 0.05 * noise."""
    with torch.no_grad():
        for key, param in sorted(model.named_parameters()):
            if ".lora_magnitude_vector" in key:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=g))
            elif ".lora_" in key:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
            elif ".modules_to_save." in key:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)


def dora_adapted(model):
    return sorted(n for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer))


def dora_expected(model, names, inputs):
    """Eval outputs of every module; for each adapted one, in eval and in train mode (dropout,
    seeded per call), the output and the gradients of A, B, magnitude and input for a fixed
    upstream gradient (`g.<module>`)."""
    out = {}
    inner = model.base_model.model
    model.eval()
    with torch.no_grad():
        for name in names:
            out[f"eval.{name}"] = inner.get_submodule(name)(inputs[f"x.{name}"]).contiguous()
    g = torch.Generator().manual_seed(11)
    for i, name in enumerate(dora_adapted(model)):
        layer = inner.get_submodule(name)
        upstream = torch.randn(out[f"eval.{name}"].shape, generator=g)
        out[f"g.{name}"] = upstream
        for mode in ["eval", "train"]:
            model.train(mode == "train")
            x = inputs[f"x.{name}"].clone().requires_grad_(True)
            params = {
                "A": layer.lora_A["default"].weight,
                "B": layer.lora_B["default"].weight,
                "m": layer.lora_magnitude_vector["default"].weight,
            }
            for p in params.values():
                p.grad = None
            torch.manual_seed(1000 + i)
            y = layer(x)
            (y * upstream).sum().backward()
            out[f"{mode}.y.{name}"] = y.detach().contiguous()
            out[f"{mode}.x_grad.{name}"] = x.grad.contiguous()
            for k, p in params.items():
                out[f"{mode}.{k}_grad.{name}"] = p.grad.contiguous()
    model.eval()
    return out


def make_dora_case(name, out_dir, base, base4):
    torch.manual_seed(0)
    kwargs = dict(DORA_CASES[name])
    if name == "dora_4bit":
        model = toy4(base4)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **kwargs))
        names, inputs = module_names4(), base4
    else:
        model = peft_model(kwargs, base)
        names, inputs = module_names(), base
    fill_adapter(model, torch.Generator().manual_seed(sum(map(ord, name))))
    expected = dora_expected(model, names, inputs)
    model.save_pretrained(out_dir / name)
    (out_dir / name / "README.md").unlink()
    sort_targets(out_dir / name / "adapter_config.json")
    return expected


# ---------------------------------------------------------------------------------------------
# modules_to_save on tiny transformers models

MODEL_GOLDEN = pathlib.Path(__file__).resolve().parent.parent / "crates/model-loader/tests/golden"

MTS_CASES = {
    "mts_llama": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    "mts_qwen2_dora": (
        "qwen2",
        dict(
            r=2,
            lora_alpha=4,
            target_modules=["k_proj", "down_proj"],
            modules_to_save=["lm_head", "embed_tokens"],
            use_dora=True,
        ),
    ),
}


def tiny_model(family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL_GOLDEN / family, dtype=torch.float32)
    model.name_or_path = None  # no machine-specific path in adapter_config.json
    return model


def trainable_line(model):
    trainable, total = model.get_nb_trainable_parameters()
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def make_mts_case(name, out_dir):
    family, kwargs = MTS_CASES[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied-embeddings warning for the Llama
        model = get_peft_model(tiny_model(family), LoraConfig(task_type="CAUSAL_LM", **kwargs))
    line = trainable_line(model)
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    fill_adapter(model, g)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 7), generator=g)
    upstream = torch.randn(2, 7, vocab, generator=g)
    model.eval()
    logits = model(input_ids=ids).logits
    (logits * upstream).sum().backward()
    expected = {"input_ids": ids, "upstream": upstream, "logits": logits.detach().contiguous()}
    for key, param in model.named_parameters():
        if ".modules_to_save." in key:
            short = key.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
            expected[f"grad.{short}"] = param.grad.contiguous()
    model.save_pretrained(out_dir / name)
    (out_dir / name / "README.md").unlink()
    sort_targets(out_dir / name / "adapter_config.json")
    return expected, {"trainable": line}


def main():
    out_dir = pathlib.Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    base = make_base()
    tensors = dict(base)
    for name, (kwargs, dtype) in CASES.items():
        tensors.update(make_case(name, kwargs, dtype, base, out_dir))
    save_file(tensors, out_dir / "base.safetensors", metadata={"peft": __import__("peft").__version__})
    base4 = make_base4()
    for name in DORA_CASES:
        expected = make_dora_case(name, out_dir, base, base4)
        if name == "dora_4bit":
            expected.update(base4)
        save_file(expected, out_dir / name / "expected.safetensors")
    for name in MTS_CASES:
        expected, meta = make_mts_case(name, out_dir)
        save_file(expected, out_dir / name / "expected.safetensors", metadata=meta)


if __name__ == "__main__":
    main()
