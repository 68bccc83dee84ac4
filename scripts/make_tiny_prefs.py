"""Make data/tiny-prefs.jsonl: preference pairs for the shipped tiny model, from data/tiny-chat.jsonl.

Each chat's last assistant answer is the chosen completion; the rejected one is another chat's
(different) answer, to the same kind of question when there is one. Rows give the prompt
explicitly (`prompt` + `chosen` + `rejected`, conversational), so that TRL reads the same file
(one file mixing explicit and implicit rows gets a null `prompt` column from `datasets`, on which
TRL fails). Deterministic: no randomness.

Regenerate (plain Python 3, no packages):
    python3 scripts/make_tiny_prefs.py
"""

import json
import pathlib

root = pathlib.Path(__file__).resolve().parent.parent
chats = [json.loads(line) for line in (root / "data/tiny-chat.jsonl").read_text().splitlines() if line]


def kind(messages):
    """The question's kind: its first two words with digits blanked."""
    q = next(m["content"] for m in messages if m["role"] == "user")
    return " ".join("".join("#" if c.isdigit() else c for c in w) for w in q.split()[:2])


rows = []
for i, chat in enumerate(chats):
    msgs = chat["messages"]
    last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
    prompt, chosen = msgs[:last], msgs[last]
    def answer(c):
        return next(m for m in reversed(c["messages"]) if m["role"] == "assistant")["content"]

    others = [c for c in chats if answer(c) != chosen["content"]]
    same = [c for c in others if kind(c["messages"]) == kind(msgs)]
    pool = same or others
    other = pool[(7 * i + 3) % len(pool)]["messages"]
    wrong = next(m for m in reversed(other) if m["role"] == "assistant")
    rejected = {"role": "assistant", "content": wrong["content"]}
    rows.append({"prompt": prompt, "chosen": [chosen], "rejected": [rejected]})

out = root / "data/tiny-prefs.jsonl"
out.write_text("".join(json.dumps(r) + "\n" for r in rows))
print(f"wrote {len(rows)} pairs to {out}")
