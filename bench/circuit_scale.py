"""Knowledge circuits at scale: a 1.1B Llama-shaped model (TinyLlama's layer shapes, seeded random
weights, SmolLM2's vocabulary; built on first use into the cache, 4.7 GB) on 8 facts of ~512 tokens
within a memory budget, run as a user runs it: ``workbench circuit DIR --facts F --max-memory GB``.

    .venv/bin/python bench/circuit_scale.py [--max-memory 16] [--tokens 512] [--facts 8] [--steps 5]
        [--model bench:tinyllama-1.1b] [-- extra workbench circuit flags]

Prints the run's memory plan line, its peak RSS (the child process's, model included) and wall time,
and the peak memory per prompt token of the largest batch against the floor (senders x d x bytes).
The weights are random, so faithfulness means nothing here; memory and time are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_overhead import bench_model  # noqa: E402

FILLER = ("The morning was quiet and the streets were still wet from the rain that had fallen during the night. "
          "People walked slowly to work, holding cups of coffee and talking about the weather, the traffic and the "
          "small things that fill an ordinary day. In the park, a few children played near the fountain while their "
          "parents sat on the benches and read the news. A bus stopped at the corner, and an old man climbed down "
          "with a bag of bread under his arm. The shops opened one by one, their lights coming on behind the glass. ")


def long_facts(tokenizer, n: int, tokens: int) -> list[dict]:
    """``n`` built-in capital-of facts, each prompt a neutral paragraph of filler then "She said that the
    capital of X is", padded to about ``tokens`` tokens (the subject swap keeps every pair the same length)."""
    from workbench.circuits import builtin_facts

    facts = [f for f in builtin_facts() if f.relation == "capital_of"][:n]
    out = []
    for f in facts:
        tail = "She said that t" + f.prompt[1:]
        text = ""
        while len(tokenizer(text + FILLER + tail).input_ids) <= tokens:
            text += FILLER
        words = FILLER.split(" ")
        for w in words:  # top up word by word
            if len(tokenizer(text + w + " " + tail).input_ids) > tokens:
                break
            text += w + " "
        out.append({**f.to_dict(), "prompt": text + tail})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bench:tinyllama-1.1b")
    ap.add_argument("--max-memory", type=float, default=16.0, help="GB (default 16)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--facts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("extra", nargs="*", help="more workbench circuit flags (after --)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = bench_model(args.model)
    from workbench.models.gguf import tokenizer_dir
    from workbench.models.specs import _tokenizer

    tok = _tokenizer(tokenizer_dir())
    facts = long_facts(tok, args.facts, args.tokens)
    lengths = [len(tok(f["prompt"]).input_ids) for f in facts]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "facts.jsonl"
        path.write_text("".join(json.dumps(f) + "\n" for f in facts))
        cmd = [sys.executable, "-m", "workbench", "circuit", model, "--facts", str(path), "--out", str(Path(tmp) / "out"),
               "--max-memory", str(args.max_memory), "--steps", str(args.steps), *args.extra]
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        out = proc.stdout + proc.stderr
        if proc.returncode:
            print(out[-3000:])
            raise SystemExit(f"workbench circuit failed with exit status {proc.returncode}")
        metrics = json.loads((Path(tmp) / "out" / "circuit.json").read_text())["graph"]["meta"]
    plan = next((l for l in out.splitlines() if l.startswith("memory:")), "")
    mem = metrics.get("memory", {})
    print(plan)
    print(f"{len(facts)} facts of {min(lengths)}-{max(lengths)} tokens, steps {args.steps}: wall {wall:.0f} s, "
          f"peak RSS {peak / 2**30:.2f} GB (budget {args.max_memory:g} GB)")
    if mem:
        measured = (peak / 2**30 - mem["base_gb"]) * 1024 / mem["max_batch_tokens"]
        print(f"plan: batch {mem['batch_size']}, {mem['mode']} mode, estimate {mem['estimate_gb']:.2f} GB "
              f"({mem['per_token_mb']:.2f} MB per token); measured {measured:.2f} MB per token above the "
              f"{mem['base_gb']:.2f} GB in use before the run = {measured / mem['floor_per_token_mb']:.2f}x the floor "
              f"of {mem['floor_per_token_mb']:.2f} MB (MB = 2^20 bytes)")
    for line in out.splitlines():
        if re.match(r"^(eap|faithfulness)", line):
            print(line)


if __name__ == "__main__":
    main()
