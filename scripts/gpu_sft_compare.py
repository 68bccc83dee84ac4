"""The SFT half of scripts/gpu_check.sh's summary: nibble's and TRL's per-step logs (JSON lines
with step, loss, num_tokens, elapsed_s; nibble's log.jsonl and bench_trl.py's LOG_JSONL) side by
side: median step time and tokens/s after the first two steps, losses step by step, and the
largest relative loss difference. Writes the summary as JSON and prints it.

    python3 scripts/gpu_sft_compare.py NIBBLE_LOG TRL_LOG OUT_JSON
"""

import json
import statistics
import sys


def steps(path):
    out = []
    for line in open(path):
        e = json.loads(line)
        if "loss" in e and "elapsed_s" in e and "step" in e:
            out.append(e)
    return out


def speed(log):
    """Median seconds per step and tokens per second over the steps after the first two."""
    times, tokens = [], []
    for prev, cur in zip(log, log[1:]):
        times.append(cur["elapsed_s"] - prev["elapsed_s"])
        tokens.append((cur.get("num_tokens") or 0) - (prev.get("num_tokens") or 0))
    times, tokens = times[1:], tokens[1:]
    if not times:
        return None, None
    return statistics.median(times), sum(tokens) / sum(times)


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    nib, trl = steps(sys.argv[1]), steps(sys.argv[2])
    (ns, nt), (ts, tt) = speed(nib), speed(trl)
    diffs = [abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(nib, trl) if b["loss"]]
    summary = {
        "steps": min(len(nib), len(trl)),
        "nibble_median_step_s": ns,
        "trl_median_step_s": ts,
        "nibble_tokens_per_s": nt,
        "trl_tokens_per_s": tt,
        "tokens_per_s_ratio": nt / tt if nt and tt else None,
        "loss_max_rel_diff": max(diffs) if diffs else None,
        "losses": [[a["step"], a["loss"], b["loss"]] for a, b in zip(nib, trl)],
    }
    with open(sys.argv[3], "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}))
    for step, a, b in summary["losses"]:
        print(f"  step {step:>3}: nibble {a:.4f}  TRL {b:.4f}")


if __name__ == "__main__":
    main()
