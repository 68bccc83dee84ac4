# /// script
# requires-python = ">=3.11"
# dependencies = ["transformers==5.24.0", "jinja2", "pyyaml"]
# ///
"""Render chat templates of several real-world styles with transformers, as golden data for
nibble's template engine (crates/data/src/template.rs).

Regenerate (after `cargo xtask setup`):
    "$NIBBLE_PYTHON" scripts/golden_templates.py > crates/data/tests/golden/templates.json
"""

import json
from pathlib import Path

import yaml
from transformers.utils.chat_template_utils import render_jinja_template

ROOT = Path(__file__).resolve().parent.parent

TEMPLATES = {
    # The shipped tiny model's (ChatML).
    "chatml": (ROOT / "models/tiny-llama/chat_template.jinja").read_text(),
    # The handbook-style Zephyr template of the seed recipe.
    "zephyr": yaml.safe_load((ROOT / "recipes/zephyr-7b-beta/sft/config_qlora.yaml").read_text())["chat_template"],
    # Llama-3 style: bos token, header ids, `| trim`, a default system message via namespace-free logic.
    "llama3": (
        "{{- bos_token }}\n"
        "{%- if messages[0]['role'] == 'system' %}\n"
        "    {%- set system = messages[0]['content'] | trim %}\n"
        "    {%- set messages = messages[1:] %}\n"
        "{%- else %}\n"
        "    {%- set system = 'You are helpful.' %}\n"
        "{%- endif %}\n"
        "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}\n"
        "{%- if tools %}\n"
        "    {{- '<|start_header_id|>tools<|end_header_id|>\\n\\n' }}\n"
        "    {%- for t in tools %}{{ t | tojson(indent=4) }}{{ '\\n\\n' }}{% endfor %}\n"
        "    {{- '<|eot_id|>' }}\n"
        "{%- endif %}\n"
        "{%- for m in messages %}\n"
        "    {{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
        "{%- endif %}\n"
    ),
    # Assistant-only loss: {% generation %} around assistant replies (SmolLM3 / TRL style).
    "generation": (
        "{% for message in messages %}\n"
        "{% if message.role == 'assistant' %}\n"
        "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message.content.strip() + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}\n"
        "{% else %}\n"
        "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
        "{% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Mistral style: strict alternation via raise_exception, loop controls, tools as JSON.
    "mistral": (
        "{{ bos_token }}"
        "{% if tools %}{{ '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% continue %}{% endif %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == (1 if messages[0]['role'] == 'system' else 0)) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].upper() if message.get('shout') else '[INST] ' + message['content'] }}{{ ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city — in °C",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."}],
    "system_multi": [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": " 4. "},
        {"role": "user", "content": "Ünïcode — ok?"},
        {"role": "assistant", "content": "Yes: ✓"},
    ],
    "bad_alternation": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
}


def main():
    out = {"templates": {}, "cases": []}
    for name, tmpl in TEMPLATES.items():
        out["templates"][name] = tmpl
        for conv_name, conv in CONVERSATIONS.items():
            for add_gen in (False, True):
                for tools in (None, TOOLS):
                    case = {
                        "template": name,
                        "conversation": conv_name,
                        "context": {
                            "messages": conv,
                            "add_generation_prompt": add_gen,
                            "bos_token": "<s>",
                            "eos_token": "</s>",
                        },
                    }
                    if tools:
                        case["context"]["tools"] = tools
                    try:
                        rendered, indices = render_jinja_template(
                            conversations=[conv],
                            tools=tools,
                            chat_template=tmpl,
                            return_assistant_tokens_mask=True,
                            add_generation_prompt=add_gen,
                            bos_token="<s>",
                            eos_token="</s>",
                        )
                        case["rendered"] = rendered[0]
                        # Character ranges of {% generation %} output.
                        case["generation"] = [list(x) for x in indices[0]]
                    except Exception as e:  # a template's own raise_exception
                        case["error"] = str(e)
                    out["cases"].append(case)
    print(json.dumps(out, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
