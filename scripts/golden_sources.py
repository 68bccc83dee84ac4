# /// script
# requires-python = ">=3.11"
# dependencies = ["datasets==5.2.0", "pyarrow", "numpy"]
# ///
"""Small data sources and what `datasets` makes of them, as golden data for nibble's data sources
(crates/data/src/{source,parquet,mixture}.rs, checked by crates/data/tests/sources.rs).

Writes, under OUT_DIR: Parquet files (chat messages, prompt/completion, nulls, nested structs, the
codecs pyarrow writes) and JSON/JSONL files made with pyarrow and json; local directories whose
splits `datasets` infers from file and folder names or from a README `configs:` block; a fake
Hugging Face hub cache (`hub/datasets--org--name/{refs,blobs,snapshots}`); and `expected.json`:
the splits and files `datasets` resolves, the rows it loads, the alignment-handbook mixtures (which
rows, in which order) and `train_test_split` indices for a few seeds and sizes.

Regenerate (after `cargo xtask setup`):
    "$NIBBLE_PYTHON" scripts/golden_sources.py crates/data/tests/golden/sources

Deterministic (fixed data and seeds, no clock); offline; runs in a few seconds.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

OUT = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else None
if OUT is None:
    sys.exit("usage: golden_sources.py OUT_DIR")

# Offline, and no datasets cache shared with anything else.
_CACHE = tempfile.mkdtemp(prefix="nibble-golden-sources-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_DATASETS_CACHE"] = _CACHE
os.environ["HF_HOME"] = _CACHE
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"

import datasets  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

datasets.disable_progress_bars()
datasets.utils.logging.set_verbosity_error()

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_parquet(path: Path, table: pa.Table, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, **kw)


def write_text(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# --- the data ------------------------------------------------------------------------------------

MSG = pa.struct(
    [
        ("role", pa.string()),
        ("content", pa.string()),
        ("tool_calls", pa.list_(pa.struct([("name", pa.string()), ("arguments", pa.string())]))),
    ]
)
META = pa.struct(
    [("source", pa.string()), ("tags", pa.list_(pa.string())), ("depth", pa.struct([("level", pa.int32())]))]
)
CHAT_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("messages", pa.list_(MSG)),
        ("score", pa.float64()),
        ("score32", pa.float32()),
        ("flag", pa.bool_()),
        ("small", pa.int8()),
        ("count", pa.uint32()),
        ("meta", META),
        ("ints", pa.list_(pa.int64())),
        ("note", pa.large_string()),
        ("matrix", pa.large_list(pa.list_(pa.int16()))),
    ]
)


def chat_rows(n: int, tag: str):
    rows = []
    for i in range(n):
        messages = [
            {"role": "user", "content": f"{tag} question {i}: what is {i} + {i}?", "tool_calls": None},
            {"role": "assistant", "content": f"{tag} answer {i}: {2 * i} \u2713", "tool_calls": None},
        ]
        if i % 5 == 0:
            messages.insert(0, {"role": "system", "content": "Be brief.", "tool_calls": None})
        if i % 7 == 3:
            messages.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"name": "add", "arguments": json.dumps({"a": i, "b": i})}],
                }
            )
            messages.append({"role": "tool", "content": str(2 * i), "tool_calls": []})
        rows.append(
            {
                "id": i,
                "messages": messages,
                "score": None if i % 6 == 2 else i / 4,
                "score32": 0.1 * i,
                "flag": None if i % 4 == 1 else i % 2 == 0,
                "small": -i,
                "count": 4_000_000_000 + i,
                "meta": None
                if i % 9 == 4
                else {
                    "source": f"{tag}-{i % 3}",
                    "tags": None if i % 8 == 5 else [f"t{j}" for j in range(i % 4)],
                    "depth": {"level": i % 3} if i % 2 else None,
                },
                "ints": None if i % 10 == 7 else list(range(i % 3)),
                "note": "" if i % 3 == 0 else f"note {i}",
                "matrix": [[i, -i], [], [1, 2, 3]] if i % 2 else [],
            }
        )
    return rows


def pc_rows(n: int, tag: str):
    return [
        {
            "prompt": f"{tag} prompt {i}",
            "completion": f" {tag} completion {i}",
            "source": None if i % 4 == 0 else f"src{i % 3}",
        }
        for i in range(n)
    ]


def conv_pc_rows(n: int):
    rows = []
    for i in range(n):
        row = {
            "prompt": [{"role": "user", "content": f"conv prompt {i}"}],
            "completion": [{"role": "assistant", "content": f"conv completion {i}"}],
        }
        if i % 3 == 1:
            row["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        if i == 2:
            # A message with a key the others lack: `datasets` keeps such a field as JSON.
            row["prompt"].append({"role": "user", "content": "again", "name": "bob"})
        rows.append(row)
    return rows


def make_files():
    f = OUT / "files"
    write_parquet(f / "chat.parquet", pa.Table.from_pylist(chat_rows(23, "chat"), schema=CHAT_SCHEMA), row_group_size=5)
    write_parquet(
        f / "pc.parquet", pa.Table.from_pylist(pc_rows(17, "pc")), compression="zstd", row_group_size=4
    )
    write_parquet(
        f / "text_gzip.parquet",
        pa.Table.from_pylist([{"text": f"gzip text {i}"} for i in range(9)]),
        compression="gzip",
        use_dictionary=False,
    )
    write_parquet(
        f / "text_lz4.parquet",
        pa.Table.from_pylist([{"text": f"lz4 text {i}", "n": i} for i in range(6)]),
        compression="lz4",
        data_page_version="2.0",
    )
    write_text(f / "conv_pc.jsonl", jsonl(conv_pc_rows(8)))
    # Top-level keys that come and go (filled with nulls); ints and floats in one column.
    mixed = [{"text": f"mixed {i}", "n": i if i % 2 else i + 0.5} for i in range(5)]
    mixed[1]["extra"] = "only here"
    write_text(f / "mixed.json", json.dumps(mixed, indent=1))
    write_text(f / "strings.json", json.dumps([f"plain string {i}" for i in range(4)]))


def make_dirs():
    d = OUT / "dir_sharded"
    t = pa.Table.from_pylist(pc_rows(11, "shard"))
    write_parquet(d / "data/train-00000-of-00002.parquet", t.slice(0, 6))
    write_parquet(d / "data/train-00001-of-00002.parquet", t.slice(6))
    write_parquet(d / "data/test-00000-of-00001.parquet", pa.Table.from_pylist(pc_rows(3, "shard-test")))
    write_parquet(d / "data/train_sft-00000-of-00001.parquet", pa.Table.from_pylist(pc_rows(4, "sft")))
    write_text(d / "README.md", "# A dataset card without configs\n")

    d = OUT / "dir_names"
    write_text(d / "my_train.jsonl", jsonl(pc_rows(3, "my-train")))
    write_text(d / "train-extra.jsonl", jsonl(pc_rows(2, "train-extra")))
    write_text(d / "eval.jsonl", jsonl(pc_rows(2, "eval")))
    write_text(d / "validation.jsonl", jsonl(pc_rows(2, "validation")))
    write_text(d / "notes.md", "not data of any split\n")

    d = OUT / "dir_dirs"
    write_text(d / "train/part-b.jsonl", jsonl(pc_rows(2, "part-b")))
    write_text(d / "train/part-a.jsonl", jsonl(pc_rows(3, "part-a")))
    write_text(d / "dev/x.jsonl", jsonl(pc_rows(2, "dev")))

    d = OUT / "dir_plain"
    write_text(d / "rows.jsonl", jsonl(pc_rows(4, "plain")))
    write_text(d / "sub/more.jsonl", jsonl(pc_rows(2, "sub")))
    write_text(d / ".hidden.jsonl", jsonl(pc_rows(1, "hidden")))
    write_text(d / "__special__/junk.jsonl", jsonl(pc_rows(1, "junk")))

    d = OUT / "dir_readme"
    write_text(
        d / "README.md",
        "---\n"
        "configs:\n"
        "- config_name: default\n"
        "  data_files:\n"
        "  - split: train\n"
        "    path: part*/train*.jsonl\n"
        "  - split: test\n"
        "    path: holdout.jsonl\n"
        "- config_name: other\n"
        "  data_dir: other\n"
        "---\n"
        "# Card\n",
    )
    write_text(d / "part1/train.jsonl", jsonl(pc_rows(2, "p1")))
    write_text(d / "part2/train_b.jsonl", jsonl(pc_rows(2, "p2")))
    write_text(d / "holdout.jsonl", jsonl(pc_rows(2, "holdout")))
    write_text(d / "other/train.jsonl", jsonl(pc_rows(3, "other")))
    write_text(d / "other/test.jsonl", jsonl(pc_rows(1, "other-test")))


def hub_repo(repo_id: str, files: dict):
    """A hub-cache repository as huggingface_hub lays it out: blobs named by content hash,
    snapshot files as relative symlinks to them, refs/main naming the snapshot."""
    root = OUT / "hub" / ("datasets--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / HUB_COMMIT
    for rel, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    write_text(root / "refs/main", HUB_COMMIT)
    return snap


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def make_hub():
    readme = (
        "---\n"
        "configs:\n"
        "- config_name: default\n"
        "  data_files:\n"
        "  - split: train_sft\n"
        "    path: data/train_sft-*\n"
        "  - split: test_sft\n"
        "    path: data/test_sft-*\n"
        "- config_name: alt\n"
        "  data_files:\n"
        "  - split: train\n"
        "    path: alt/train-*\n"
        "---\n"
    )
    hub_repo(
        "nibble-test/chat-mix",
        {
            "README.md": readme.encode(),
            ".hidden-note": b"hidden files are not data\n",
            "data/train_sft-00000-of-00001.parquet": parquet_bytes(
                pa.Table.from_pylist(chat_rows(12, "hub"), schema=CHAT_SCHEMA)
            ),
            "data/test_sft-00000-of-00001.parquet": parquet_bytes(
                pa.Table.from_pylist(chat_rows(4, "hub-test"), schema=CHAT_SCHEMA)
            ),
            "alt/train-00000-of-00001.parquet": parquet_bytes(pa.Table.from_pylist(pc_rows(5, "alt"))),
        },
    )
    hub_repo(
        "nibble-test/bare",
        {
            "data/train-00000-of-00001.parquet": parquet_bytes(pa.Table.from_pylist(pc_rows(6, "bare"))),
            "data/test-00000-of-00001.parquet": parquet_bytes(pa.Table.from_pylist(pc_rows(2, "bare-test"))),
            "cfg2/train-00000-of-00001.parquet": parquet_bytes(pa.Table.from_pylist(pc_rows(3, "cfg2"))),
        },
    )


# --- what datasets makes of them -----------------------------------------------------------------


def hub_path(id_: str) -> str:
    """Where `datasets` reads a hub id from here: its cached snapshot, loaded as a local folder (the
    same README and split logic as a hub repository, without the network)."""
    if id_.startswith("nibble-test/"):
        return str(OUT / "hub" / ("datasets--" + id_.replace("/", "--")) / "snapshots" / HUB_COMMIT)
    return str(OUT / id_)


def load(id_, config, split):
    """`load_dataset` as the recipe's id would be read; a single local file (a nibble convenience)
    is what `load_dataset("parquet"/"json", data_files=file)` loads: one split, `train`."""
    if id_.endswith(".parquet"):
        return datasets.load_dataset("parquet", data_files=hub_path(id_), split=split)
    if id_.endswith((".json", ".jsonl")):
        return datasets.load_dataset("json", data_files=hub_path(id_), split=split)
    return datasets.load_dataset(hub_path(id_), config, split=split)


def resolved_splits(id_, config):
    builder = datasets.load_dataset_builder(hub_path(id_), config)
    base = Path(hub_path(id_)).resolve()
    return {
        str(split): [str(Path(f).relative_to(base)) for f in files]
        for split, files in builder.config.data_files.items()
    }


def mixture(spec):
    """alignment-handbook's `get_dataset` for a `dataset_mixture` (src/alignment/data.py)."""
    seed = spec.get("seed", 0)
    parts = []
    for ds_spec in spec["datasets"]:
        ds = load(ds_spec["id"], ds_spec.get("config"), ds_spec.get("split", "train"))
        if ds_spec.get("columns") is not None:
            ds = ds.select_columns(ds_spec["columns"])
        weight = ds_spec.get("weight", 1.0)
        ds = ds.shuffle(seed=seed).select(range(int(len(ds) * weight)))
        parts.append(ds)
    combined = datasets.concatenate_datasets(parts).shuffle(seed=seed)
    if spec.get("test_split_size") is not None:
        out = combined.train_test_split(test_size=spec["test_split_size"], seed=seed)
        return {"train": out["train"].to_list(), "test": out["test"].to_list()}
    return {"train": combined.to_list()}


SPLIT_CASES = [
    ("dir_sharded", None),
    ("dir_names", None),
    ("dir_dirs", None),
    ("dir_plain", None),
    ("dir_readme", None),
    ("dir_readme", "other"),
    ("nibble-test/chat-mix", None),
    ("nibble-test/chat-mix", "alt"),
    ("nibble-test/bare", None),
]

LOAD_CASES = [
    ("files/chat.parquet", None, "train"),
    ("files/pc.parquet", None, "train"),
    ("files/text_gzip.parquet", None, "train"),
    ("files/text_lz4.parquet", None, "train"),
    ("files/conv_pc.jsonl", None, "train"),
    ("files/mixed.json", None, "train"),
    ("files/strings.json", None, "train"),
    ("dir_sharded", None, "train"),
    ("dir_sharded", None, "train_sft"),
    ("dir_names", None, "validation"),
    ("dir_dirs", None, "train"),
    ("dir_readme", None, "train"),
    ("dir_readme", "other", "test"),
    ("nibble-test/chat-mix", None, "train_sft"),
    ("nibble-test/chat-mix", "alt", "train"),
    ("nibble-test/bare", None, "test"),
    ("dir_sharded", None, "train[2:7]"),
    ("dir_sharded", None, "train[-3:]"),
    ("dir_sharded", None, "train[:45%]+test"),
    ("files/chat.parquet", None, "train[10%:-2]"),
]

MIXTURES = [
    {"datasets": [{"id": "files/pc.parquet"}], "seed": 0},
    {
        "datasets": [
            {"id": "files/chat.parquet", "columns": ["messages"], "weight": 0.5},
            {"id": "nibble-test/chat-mix", "split": "train_sft", "columns": ["messages"], "weight": 0.75},
            {"id": "nibble-test/chat-mix", "split": "test_sft", "columns": ["messages"]},
        ],
        "seed": 42,
        "test_split_size": 0.2,
    },
    {
        "datasets": [
            {"id": "files/pc.parquet", "weight": 0.3},
            {"id": "dir_sharded", "split": "train", "columns": ["prompt", "completion"], "weight": 0.9},
            {"id": "dir_names", "split": "test", "weight": 1.0},
        ],
        "seed": 1234,
        "test_split_size": 3,
    },
    {
        "datasets": [
            {"id": "nibble-test/chat-mix", "config": "alt"},
            {"id": "files/pc.parquet", "columns": ["completion", "prompt"], "weight": 0.6},
        ],
        "seed": 2**32 + 5,
    },
    {
        "datasets": [{"id": "files/conv_pc.jsonl", "weight": 0.99}, {"id": "files/conv_pc.jsonl", "weight": 0.5}],
        "seed": 7,
        "test_split_size": 0.5,
    },
]

SPLIT_INDICES = [
    (10, 0.2, 0),
    (10, 0.25, 42),
    (23, 0.1, 42),
    (23, 5, 3),
    (100, 0.01, 2**40 + 3),
    (7, 0.5, 1),
    (1000, 0.137, 99),
]


def split_indices(n, test_size, seed):
    ds = datasets.Dataset.from_dict({"i": list(range(n))})
    out = ds.train_test_split(test_size=test_size, seed=seed)
    return {"train": list(out["train"]["i"]), "test": list(out["test"]["i"])}


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    make_files()
    make_dirs()
    make_hub()
    os.chdir(OUT)
    expected = {
        "hub_commit": HUB_COMMIT,
        "splits": [
            {"id": i, "config": c, "splits": resolved_splits(i, c)} for i, c in SPLIT_CASES
        ],
        "loads": [],
        "mixtures": [],
        "split_indices": [
            {"n": n, "test_size": t, "seed": s, **split_indices(n, t, s)} for n, t, s in SPLIT_INDICES
        ],
    }
    for id_, config, split in LOAD_CASES:
        ds = load(id_, config, split)
        expected["loads"].append(
            {"id": id_, "config": config, "split": split, "columns": ds.column_names, "rows": ds.to_list()}
        )
    for spec in MIXTURES:
        expected["mixtures"].append({"mixture": spec, "result": mixture(spec)})
    text = json.dumps(expected, indent=1, ensure_ascii=False, sort_keys=False) + "\n"
    (OUT / "expected.json").write_text(text, encoding="utf-8")
    shutil.rmtree(_CACHE, ignore_errors=True)


if __name__ == "__main__":
    main()
