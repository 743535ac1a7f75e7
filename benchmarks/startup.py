"""Start-up and refusal times of the scripts (issue 15 item 5): ``--help``, and a wrong ``--layer_name`` on an
OPT-125M-sized model with random weights, each in a fresh process; and where the time of the refusal goes.

    OMP_NUM_THREADS=1 python benchmarks/startup.py [--model_dir /tmp/opt125m-random] [--rounds 3]

The model (125M parameters, float32 safetensors, 500 MB) is written once with ``save_pretrained`` to
``--model_dir`` (with the embedded model's tokenizer files). Times are wall and CPU seconds (user + system)
of the child process; medians over the rounds.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = """
import resource, sys, time
sys.path.insert(0, {root!r})
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t, c = time.perf_counter(), cpu()
def lap(name):
    global t, c
    print(f"{{name}}\\t{{time.perf_counter() - t:.2f}}\\t{{cpu() - c:.2f}}")
    t, c = time.perf_counter(), cpu()
import torch; lap("import torch")
import transformers; lap("import transformers")
from lib.model.models import load_model, model_skeleton; from lib.model.inputs import model_fingerprint; lap("import lib")
model_skeleton({model!r}); lap("module tree on the meta device (imports the modeling code)")
m = load_model({model!r}); lap("load the weights")
model_fingerprint(m); lap("fingerprint the weights")
"""


def make_model(path: Path) -> None:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(
        hidden_size=768,
        num_hidden_layers=12,
        ffn_dim=3072,
        num_attention_heads=12,
        vocab_size=50272,
        max_position_embeddings=2048,
        word_embed_proj_dim=768,
    )
    OPTForCausalLM(cfg).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "assets" / "tiny-opt-shakespeare" / f, path / f)


def timed(cmd: list[str], cwd: Path) -> tuple[float, float, int]:
    """``(wall s, CPU s, exit status)`` of ``cmd`` in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (
        wall,
        (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        proc.returncode,
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model_dir", default="/tmp/opt125m-random")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model = Path(args.model_dir)
    if not (model / "config.json").is_file():
        make_model(model)
    work = Path("/tmp/startup-bench")
    work.mkdir(exist_ok=True)
    script = str(ROOT / "single_layer_single_block.py")
    cases = {
        "--help": [sys.executable, script, "--help"],
        "wrong --layer_name, 125M model": [
            sys.executable,
            script,
            "--model",
            str(model),
            "--layer_name",
            "q_proj",
            "--output_dir",
            str(work / "o"),
            "--cache_dir",
            str(work / "c"),
        ],
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for _ in range(args.rounds):  # interleaved
        for name, cmd in cases.items():
            wall, cpu, code = timed(cmd, work)
            assert code == (0 if name == "--help" else 2), (name, code)
            results[name].append((wall, cpu))
    print(
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, load average {os.getloadavg()[0]:.1f}, {args.rounds} rounds (medians)"
    )
    print("| case | wall s | CPU s |\n|---|---|---|")
    for name, runs in results.items():
        print(
            f"| {name} | {statistics.median(w for w, _ in runs):.2f} | {statistics.median(c for _, c in runs):.2f} |"
        )
    out = subprocess.run(
        [sys.executable, "-c", PHASES.format(root=str(ROOT), model=str(model))],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=True,
    )
    print("\n| phase (one process, in order) | wall s | CPU s |\n|---|---|---|")
    for line in out.stdout.strip().splitlines():
        name, wall, cpu = line.split("\t")
        print(f"| {name} | {wall} | {cpu} |")


if __name__ == "__main__":
    main()
