"""Dump the argument fields of the pinned TRL (ModelConfig, ScriptArguments, SFTConfig, DPOConfig)
as JSON.

nibble's config crate embeds the output to know every key TRL accepts, its default and its
choices; tests compare nibble's typed defaults and enums against it.

Regenerate (after `cargo xtask setup`, with the pinned reference stack):
    "$NIBBLE_PYTHON" scripts/dump_trl_fields.py > crates/config/src/trl_fields.json
"""

import dataclasses
import enum
import json
import typing

import transformers
import trl
from trl import DPOConfig, ModelConfig, ScriptArguments, SFTConfig


def kind_of(tp) -> str:
    """Reduce a dataclass annotation to one of bool/int/float/str/list/dict/any."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        kinds = {kind_of(a) for a in args}
        if kinds == {"int", "float"}:
            return "float"
        return kinds.pop() if len(kinds) == 1 else "any"
    if origin in (list, tuple):
        return "list"
    if origin is dict or tp is dict:
        return "dict"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "str"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(tp, "any")


def default_of(f):
    if f.default is not dataclasses.MISSING:
        d = f.default
    elif f.default_factory is not dataclasses.MISSING:
        d = f.default_factory()
    else:
        return None
    if isinstance(d, enum.Enum):
        d = d.value
    try:
        json.dumps(d)
        return d
    except TypeError:
        return None


def choices_of(f, tp):
    choices = f.metadata.get("choices")
    if choices is None:
        for a in [tp, *typing.get_args(tp)]:
            if isinstance(a, type) and issubclass(a, enum.Enum):
                choices = [m.value for m in a]
                break
    return sorted(str(c) for c in choices) if choices is not None else None


def dump(cls):
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints.get(f.name, f.type)
        rows.append(
            {
                "name": f.name,
                "kind": kind_of(tp),
                "default": default_of(f),
                "choices": choices_of(f, tp),
            }
        )
    return rows


print(
    json.dumps(
        {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "groups": {
                "model": dump(ModelConfig),
                "data": dump(ScriptArguments),
                "training": dump(SFTConfig),
                "dpo": dump(DPOConfig),
            },
        },
        indent=1,
    )
)
