"""The bench and maintenance scripts refuse bad arguments as the CLI does: one ``error:`` line, a non-zero exit,
no traceback, and before any model is loaded or any output is written (so each case here takes seconds).

Each case runs the script as a subprocess, as a user would. Before these checks, ``--variants bogus`` printed a
made-up timing row, ``--steps 0`` wrote an untrained checkpoint, ``--top-k abc`` failed after a 200 s dense pass,
and ``--layer 9`` or ``--experts 0`` ended in an IndexError or ZeroDivisionError traceback.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, cwd: Path = REPO, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def assert_refused(done: subprocess.CompletedProcess, *words: str) -> str:
    """One ``error:`` line on stderr (naming ``words``), a non-zero exit, no traceback; the line."""
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "Traceback" not in out, out
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and done.stderr.strip() == errors[0], out
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


CASES = [  # script, arguments, words the error line must hold
    ("bench/profile_overhead.py", ["--model", "zoo:qwen2-moe", "--tokens", "100", "--variants", "bogus"],
     ["--variants", "'bogus'", "plain"]),
    ("bench/profile_overhead.py", ["--variants", "plain,", "--rss-scan", "10,x"], ["--rss-scan"]),
    ("bench/profile_overhead.py", ["--model", "zoo:nope", "--tokens", "100", "--variants", "plain,body"],
     ["unknown zoo model 'nope'"]),
    ("bench/circuit_generalisation.py", ["--sets", "bogus"], ["--sets", "'bogus'", "heldout"]),
    ("bench/circuit_generalisation.py", ["--sets", "", "--facts", "no-such-file.jsonl"], ["no-such-file.jsonl"]),
    ("bench/smollm2_moe_quality.py", ["--top-k", "abc"], ["--top-k", "'abc'"]),
    ("bench/smollm2_moe_quality.py", ["--top-k", "2,17"], ["--top-k", "16"]),
    ("scripts/plant_super_expert.py", ["--layer", "9"], ["--layer", "[0, 2]"]),
    ("scripts/plant_super_expert.py", ["--expert", "99"], ["--expert", "[0, 7]"]),
    ("scripts/plant_super_expert.py", ["--channel", "999"], ["--channel", "[0, 63]"]),
    ("scripts/plant_super_expert.py", ["--channel", "-1"], ["--channel"]),
    ("scripts/moefy_smollm2.py", ["--experts", "0"], ["--experts", ">= 1"]),
    ("scripts/moefy_smollm2.py", ["--experts", "-3"], ["--experts"]),
    ("scripts/moefy_smollm2.py", ["--experts", "4"], ["--top-k 8", "4 experts"]),
    ("bench/qk_cost.py", ["zoo:nope"], ["unknown zoo model 'nope'"]),
    ("bench/metrics_speed.py", ["zoo:nope"], ["unknown zoo model 'nope'"]),
    ("bench/trace_overhead.py", ["--model", "zoo:nope"], ["unknown zoo model 'nope'"]),
    ("bench/trace_overhead.py", ["--repeats", "0"], ["--repeats"]),
]


@pytest.mark.parametrize("script,args,words", CASES, ids=[f"{Path(s).stem} {' '.join(a)}" for s, a, _ in CASES])
def test_bad_arguments_are_one_error_line(script, args, words):
    assert_refused(run(script, *args), *words)


@pytest.mark.parametrize("steps", ["0", "-1"])
def test_train_zoo_refuses_steps_below_one_and_writes_nothing(steps, tmp_path):
    """--steps 0 trained nothing and wrote an untrained checkpoint (by default over the committed one)."""
    out = tmp_path / "tiny.safetensors"
    assert_refused(run("scripts/train_zoo.py", "--steps", steps, "--out", str(out)), "--steps", ">= 1")
    assert not list(tmp_path.iterdir())


def test_profile_diff_missing_or_bad_file(tmp_path):
    good = tmp_path / "a.json"
    good.write_text(json.dumps({"super_experts": []}))
    assert_refused(run("bench/profile_diff.py", str(good), str(tmp_path / "nonexist.json")), "nonexist.json")
    (tmp_path / "list.json").write_text("[1]")
    assert_refused(run("bench/profile_diff.py", str(good), str(tmp_path / "list.json")), "not a profile.json")
    (tmp_path / "bad.json").write_text("nope")
    assert_refused(run("bench/profile_diff.py", str(tmp_path / "bad.json"), str(good)), "is not JSON")
    same = run("bench/profile_diff.py", str(good), str(good))  # still compares: 0 for the same file
    assert same.returncode == 0 and "super experts: same" in same.stdout, same.stderr


def test_gpu_check_stops_without_a_gpu(tmp_path):
    """Without CUDA it printed 'nvidia-smi: command not found' and wrote CPU timings under GPU headings."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would run every check")
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "gpu")}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=120)
    assert_refused(done, "no CUDA device")
    assert not done.stdout and not (tmp_path / "gpu").exists()
