# /// script
# requires-python = ">=3.11"
# ///
"""Peak resident memory of an `sft` run by phase, to set beside `sft RECIPE --estimate-memory`
(docs/benchmarks.md): loading (until the "training:" line), training (until the step-time summary)
and after (saving the adapter and the closing sample). Samples /proc/PID/status's VmRSS every
50 ms (Linux only; the standard library alone), prints the step lines as they come and then the
peaks in MiB; exits with the command's own status.

    python3 scripts/peak_rss.py target/release/sft recipes/bench/moe-memory.yaml \\
        --model_name_or_path ~/.cache/nibble/bench/mixtral-moe --output_dir /tmp/moe --overwrite_output_dir true
"""

import subprocess
import sys
import threading
import time


def main() -> int:
    cmd = sys.argv[1:]
    if not cmd:
        print(__doc__, file=sys.stderr)
        return 2
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    phase = ["loading"]
    peaks: dict[str, int] = {}

    def follow() -> None:
        for line in proc.stdout:
            if "training:" in line:
                phase[0] = "training"
            elif "time per step by phase" in line:
                phase[0] = "after"
            if ("step " in line and "loss" in line) or "error" in line.lower():
                print(line.rstrip(), flush=True)

    reader = threading.Thread(target=follow)
    reader.start()
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        kib = int(line.split()[1])
                        peaks[phase[0]] = max(peaks.get(phase[0], 0), kib)
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.05)
    reader.join()
    print("peak RSS: " + ", ".join(f"{name} {kib / 1024:.0f} MiB" for name, kib in peaks.items()))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
