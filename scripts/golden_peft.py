# /// script
# requires-python = ">=3.11"
# dependencies = ["peft==0.21.2", "torch==2.11.0", "transformers==5.24.0", "safetensors==0.8.0"]
# ///
"""Write golden LoRA adapters made by PEFT, for crates/lora/tests/peft.rs.

A tiny model of plain nn.Linear modules named as in a transformers decoder
(`model.layers.N.self_attn.q_proj`, ..., `model.layers.N.mlp.down_proj`) gets a LoRA adapter per
case through `get_peft_model`; A and B are filled with seeded random values (B non-zero, so the
adapter changes the output) and saved with `PeftModel.save_pretrained`. `base.safetensors` holds
the base weights, one input per module (`x.<module>`) and each case's output of every module in
eval mode (`<case>.<module>`), the untargeted ones included. Everything is seeded, so a rerun
gives the same files (the outputs up to the CPU's float rounding).

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


def main():
    out_dir = pathlib.Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    base = make_base()
    tensors = dict(base)
    for name, (kwargs, dtype) in CASES.items():
        tensors.update(make_case(name, kwargs, dtype, base, out_dir))
    save_file(tensors, out_dir / "base.safetensors", metadata={"peft": __import__("peft").__version__})


if __name__ == "__main__":
    main()
