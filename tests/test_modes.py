"""Every execution mode on every kind of model: the matrix that issue #16 was missing.

Modes: in memory (the reference); killed by SIGKILL at a random moment then rerun (resume); torchrun
with 2 gloo ranks; ``--offload layers``; torchrun + offload; torchrun killed then resumed. Kinds: a
dense Llama, GPT-2, a fused MoE with a shared expert (Qwen2-MoE), a ModuleList MoE (Qwen3-MoE) and
DeepSeek-V3 (sigmoid routing, dense first layer, shared expert), each saved with ``save_pretrained``
so that every mode loads the same files the same way. What is compared, and why that strictly:

- resume: the same command, the same batches and shapes, the same thread count and the same load
  path (so the same buffers' alignment) in a new process, and a checkpoint restores the reducer state
  bit for bit: every output file but run.json (wall time, resume point) is byte-identical.
- torchrun: each rank runs its batches with the single-process shapes, but float64 sums (router
  probabilities, attention-sink shares, moments) are added in another order when the ranks merge;
  offload: weights live in other buffers and every batch goes one layer at a time. Both are compared
  to fp32 tolerance, tie-aware (tests/helpers.py ``assert_json_close``).

Interrupts: ``profile`` (every kind above), ``ablate`` and ``circuit`` are killed at random moments
(during a forward, or between writing and renaming a file, or right after a file landed): what is left
is only complete, valid files (and hidden temporary files, which the rerun sweeps), and the rerun
gives the uninterrupted results.
"""

import json
import os
import random
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from helpers import PROMPTS, assert_clear_routing, assert_json_close
from interrupt import EVENTS, Moments, killed_by_sigkill, run_killed
from workbench.cli import main
from workbench.data import default_prompts

pytestmark = pytest.mark.usefixtures("one_thread")  # the torchrun ranks run one thread each too

KINDS = ["llama", "gpt2", "qwen2-moe", "qwen3-moe-modulelist", "deepseek-v3"]
NO_OFFLOAD = {"gpt2": "does not support gpt2"}  # layer streaming needs a decoder-layer stack it knows
TRACE_COMPONENTS = "resid_post,attn_out,mlp_out,expert,router,shared_expert"
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def work(tmp_path_factory, zoo_tokenizer):
    """Saved model folders of every kind, the prompts file, and the in-memory reference runs."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from workbench.models.specs import load

    root = tmp_path_factory.mktemp("modes")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(default_prompts()[:8] + PROMPTS) + "\n")  # 12 prompts: 6 batches of 2
    dirs = {}
    torch.manual_seed(0)
    for kind in KINDS:
        d = dirs[kind] = root / kind
        if kind == "llama":
            model = LlamaForCausalLM(LlamaConfig(vocab_size=len(zoo_tokenizer), hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=128))
        elif kind == "gpt2":
            model = GPT2LMHeadModel(GPT2Config(vocab_size=len(zoo_tokenizer), n_embd=64, n_head=4, n_layer=3,
                                               n_positions=128, bos_token_id=0, eos_token_id=0))
        else:
            lm = load(f"zoo:{kind}")
            # runs are compared exactly on router counts (other buffers, streaming, ranks): no token on a tie
            assert_clear_routing(lm, default_prompts()[:8] + PROMPTS, what=kind)
            model = lm.model
        model.save_pretrained(d)
        zoo_tokenizer.save_pretrained(d)
    w = {"root": root, "dirs": dirs, "prompts": prompts, "counts": {}}
    for kind in KINDS:
        with Moments().watch() as m:
            assert main(profile_argv(w, kind, root / "ref" / kind / "profile")) == 0
        w["counts"][kind] = m.counts
        assert main(trace_argv(w, kind, root / "ref" / kind / "trace")) == 0
    return w


def profile_argv(w, kind: str, out: Path, *extra: str, checkpoints: bool = True) -> list[str]:
    return ["profile", str(w["dirs"][kind]), "--prompts", str(w["prompts"]), "--batch-size", "2", "--no-plots",
            "--quiet", *(["--checkpoint-every", "1"] if checkpoints else []), *extra, "--out", str(out)]


def trace_argv(w, kind: str, out: Path, *extra: str) -> list[str]:
    return ["trace", str(w["dirs"][kind]), "--prompts", str(w["prompts"]), "--batch-size", "2", "--components",
            TRACE_COMPONENTS, "--reducers", "absmax,moments,log_histogram", "--quiet", *extra, "--out", str(out)]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_json(path: Path, drop=("seconds", "_gb")) -> dict:
    """A JSON output without its wall-time fields and the memory plan's readings of the machine (RSS, free
    memory, the estimate built on them: any key containing one of ``drop``)."""
    def clean(o):
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items() if not any(d in k for d in drop)}
        return [clean(v) for v in o] if isinstance(o, list) else o
    return clean(json.loads(path.read_text()))


def is_temporary(p: Path, folder: Path) -> bool:
    """An atomic writer's temporary: ``atomic_path``'s ``.NAME.XXXX.tmp`` file, or anything inside the private
    ``.NAME.XXXX.tmp`` folder ``save_safetensors`` makes (safetensors' own ``.tmpXXXXXX`` file included)."""
    return any(part.startswith(".") and part.endswith(".tmp") for part in p.relative_to(folder).parts)


def assert_complete_or_absent(folder: Path) -> dict[str, Path]:
    """Every file left in ``folder`` is a complete, valid file of its kind (or an atomic writer's temporary)."""
    import pandas as pd
    import yaml
    from safetensors import safe_open

    left = {}
    for p in sorted(folder.rglob("*")) if folder.exists() else []:
        if not p.is_file() or is_temporary(p, folder):
            continue
        left[str(p.relative_to(folder))] = p
        data = p.read_bytes()
        if p.suffix == ".json":
            json.loads(data)
        elif p.suffix == ".yaml":
            yaml.safe_load(data)
        elif p.suffix == ".csv":
            pd.read_csv(p)
        elif p.suffix == ".parquet":
            pd.read_parquet(p)
        elif p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                [f.get_tensor(k) for k in f.keys()]
                assert int(f.metadata()["cursor"]) >= 1
        elif p.suffix == ".png":
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] == b"IEND", p
        elif p.suffix in (".svg", ".graphml"):
            ET.fromstring(data)
        elif p.suffix == ".dot":
            assert data.rstrip().endswith(b"}"), p
        else:
            raise AssertionError(f"unknown output kind {p}")
    return left


def random_moment(rng: random.Random, counts: dict[str, int]) -> tuple[str, int]:
    """A random event of a run with ``counts`` events of each kind (a forward half the time)."""
    event = "forward" if rng.random() < 0.5 else rng.choice([e for e in EVENTS if e != "forward" and counts[e]])
    return event, rng.randint(1, counts[event])


def checkpoint_cursor(folder: Path, name: str = "profile.checkpoint.safetensors") -> int | None:
    from safetensors import safe_open

    p = folder / name
    if not p.exists():
        return None
    with safe_open(str(p), framework="pt") as f:
        return int(f.metadata()["cursor"])


# ----- killed, then resumed -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_killed_profile_resumes_byte_identical(work, kind, tmp_path):
    ref = work["root"] / "ref" / kind / "profile"
    seed = KINDS.index(kind)
    moment = random_moment(random.Random(seed), work["counts"][kind])
    why = f"{kind}, seed {seed}: SIGKILL at {moment[0]} event {moment[1]} of {work['counts'][kind]}"
    argv = profile_argv(work, kind, tmp_path / "o")
    assert killed_by_sigkill(run_killed(argv, moment)), why
    want = files(ref)
    for name, path in assert_complete_or_absent(tmp_path / "o").items():
        assert name in want or name == "profile.checkpoint.safetensors", (why, name)
        if name in want and name != "run.json":
            assert path.read_bytes() == want[name], (why, name)  # a file that landed is already the final one
    cursor = checkpoint_cursor(tmp_path / "o")
    assert main(argv) == 0, why
    got = files(tmp_path / "o")
    assert set(got) == set(want), why  # checkpoint and temporary files are gone
    assert json.loads(got["run.json"])["resumed_at_batch"] == cursor, why
    for name in want:
        if name != "run.json":
            assert got[name] == want[name], (why, name)


def test_change_rate_state_without_layer_pairs():
    """A dense model has no router layers and a model with one MoE layer no pair of them: their (empty)
    change-rate state must load and merge, as a resume and rank 0's merge do (it raised ValueError)."""
    from workbench.experts.router import ChangeRate
    from workbench.tracing import state

    for layers in ([], [3]):
        objs = {"change_rate": ChangeRate(layers)}
        flat = state.flatten(objs)
        assert all(v.numel() == 0 for v in flat.values())
        state.load(objs, flat)
        state.merge(objs, flat)
        assert objs["change_rate"].result() == {}


# ----- layer streaming ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_offload_profile_and_trace_equal_in_memory(work, kind, tmp_path, capsys):
    ref = work["root"] / "ref" / kind
    if kind in NO_OFFLOAD:
        for argv in (profile_argv(work, kind, tmp_path / "p", "--offload", "layers", checkpoints=False),
                     trace_argv(work, kind, tmp_path / "p", "--offload", "layers")):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("error:") == 1 and "--offload layers" in err and NO_OFFLOAD[kind] in err, err
            assert not (tmp_path / "p").exists()
        return
    assert main(profile_argv(work, kind, tmp_path / "p", "--offload", "layers", checkpoints=False)) == 0
    assert sorted(files(tmp_path / "p")) == sorted(files(ref / "profile"))
    assert_json_close(read_json(tmp_path / "p" / "profile.json"), read_json(ref / "profile" / "profile.json"))
    assert json.loads((tmp_path / "p" / "run.json").read_text())["offload"] == "layers"
    assert main(trace_argv(work, kind, tmp_path / "t", "--offload", "layers")) == 0
    assert_json_close(read_json(tmp_path / "t" / "trace.json"), read_json(ref / "trace" / "trace.json"))


# ----- data-parallel ranks --------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_every_kind_with_and_without_offload_and_killed(work, tmp_path):
    """One torchrun launch (2 gloo ranks) runs every kind's profile, the offloaded ones, then a dense profile
    whose rank 1 is killed at a random batch; a second launch resumes that one from both ranks' checkpoints."""
    if not TORCHRUN.exists():
        pytest.skip("torchrun is not installed next to this Python")
    rng = random.Random(16)
    import torch

    from workbench.distributed import Shard
    from workbench.models.specs import load
    from workbench.tracing.runner import batch_members, tokenize

    # rank 1 runs the batches of the second half of the positions (blocks balanced by work): a forward of its own
    ids = tokenize(load(str(work["dirs"]["llama"])), work["prompts"].read_text().splitlines())
    lengths = torch.tensor([len(x) for x in ids])
    costs = [len(b) * int(lengths[b].max()) for b in batch_members(lengths, 2)]
    kill = [1, "forward", rng.randint(1, len(Shard(1, 2).batches(costs)))]
    jobs = [{"argv": profile_argv(work, k, tmp_path / "tr" / k)} for k in KINDS]
    jobs += [{"argv": profile_argv(work, k, tmp_path / "tr-offload" / k, "--offload", "layers", checkpoints=False)}
             for k in KINDS if k not in NO_OFFLOAD]
    resume = profile_argv(work, "llama", tmp_path / "tr-killed")
    (tmp_path / "jobs.json").write_text(json.dumps([*jobs, {"argv": resume, "kill": kill}]))
    (tmp_path / "resume.json").write_text(json.dumps([{"argv": resume}]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    launch = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(Path(__file__).with_name("interrupt.py"))]
    first = subprocess.run([*launch, str(tmp_path / "jobs.json")], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode != 0 and "Signal 9" in first.stderr + first.stdout, first.stderr[-3000:]
    left = assert_complete_or_absent(tmp_path / "tr-killed")
    assert set(left) <= {"profile.checkpoint.rank0of2.safetensors", "profile.checkpoint.rank1of2.safetensors"}, left
    cursor = checkpoint_cursor(tmp_path / "tr-killed", "profile.checkpoint.rank0of2.safetensors")
    again = subprocess.run([*launch, str(tmp_path / "resume.json")], capture_output=True, text=True, env=env,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = [(k, tmp_path / "tr" / k) for k in KINDS] + [("llama", tmp_path / "tr-killed")]
    runs += [(k, tmp_path / "tr-offload" / k) for k in KINDS if k not in NO_OFFLOAD]
    for kind, out in runs:
        ref = work["root"] / "ref" / kind / "profile"
        assert sorted(files(out)) == sorted(files(ref)), out  # every rank's checkpoint was removed at the end
        assert_json_close(read_json(out / "profile.json"), read_json(ref / "profile.json"))
        run = json.loads((out / "run.json").read_text())
        cut = run["batches"][1]  # contiguous blocks balanced by positions: rank 1 runs the longest batches
        assert run["world_size"] == 2 and run["batches"] == [0, cut] and 0 < cut < 6, (out, run)
        assert [r["batches"] for r in run["ranks"]] == [[0, cut], [cut, 6]], (out, run)
    assert json.loads((tmp_path / "tr-killed" / "run.json").read_text())["resumed_at_batch"] == cursor  # rank 0's


# ----- unsupported combinations ---------------------------------------------------------------------
def test_unsupported_combinations_are_one_line_errors(work, tmp_path, capsys, monkeypatch):
    def refused(argv, *needles):
        code = main(argv)
        err = capsys.readouterr().err
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert all(n in lines[0] for n in needles), lines[0]
        assert not (tmp_path / "o").exists()

    out = str(tmp_path / "o")
    refused(profile_argv(work, "llama", tmp_path / "o", "--offload", "layers"), "--offload layers cannot resume",
            "--checkpoint-every")
    refused(["profile", "zoo:qwen2-moe", "--text", "hi", "--offload", "layers", "--out", out], "--offload layers",
            "built in memory")
    refused(["profile", str(work["dirs"]["llama"]), "--text", "hi", "--offload", "layers", "--device-map", "auto",
             "--out", out], "--offload layers and --device-map auto")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for sub in (trace_argv(work, "llama", tmp_path / "o"), ["ablate", "m", "--study", "s", "--out", out],
                ["circuit", "m", "--out", out]):
        refused(sub, "only `workbench profile` runs under torchrun", sub[0])


# ----- interrupts at any moment: ablate and circuit ---------------------------------------------------
STUDY = """name: interrupts
metrics: [perplexity, kl]
texts: {texts}
conditions:
  - name: drop-L1-E3
    interventions: [{{op: drop, layers: 1, expert: 3}}]
  - name: zero-L2-E1
    interventions: [{{op: zero, layers: 2, expert: 1}}]
"""


def _ablate_argv(tmp_path, out):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(PROMPTS) + "\n")
    study = tmp_path / "study.yaml"
    study.write_text(STUDY.format(texts=texts))
    return ["ablate", "zoo:qwen3-moe", "--study", str(study), "--quiet", "--out", str(out)]


def _circuit_argv(tmp_path, out):
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"prompt": f"The capital of {c} is", "answer": f" {a}"}) + "\n"
                             for c, a in [("France", "Paris"), ("Germany", "Berlin"), ("Japan", "Tokyo")]))
    return ["circuit", "zoo:qwen3-moe", "--facts", str(facts), "--method", "eap", "--top-edges", "30",
            "--random-seeds", "1", "--quiet", "--out", str(out)]


def _ablate_results(out: Path):
    import pandas as pd

    return pd.read_parquet(out / "results.parquet").drop(columns=["seconds"])


def _circuit_results(out: Path):
    import pandas as pd

    return (pd.read_parquet(out / "edges.parquet"), read_json(out / "metrics.json"), read_json(out / "circuit.json"))


@pytest.mark.parametrize("command", ["ablate", "circuit"])
def test_interrupted_anywhere_leaves_valid_files_and_reruns_to_the_same_results(command, tmp_path):
    import pandas as pd

    argv_of, results = {"ablate": (_ablate_argv, _ablate_results), "circuit": (_circuit_argv, _circuit_results)}[command]
    with Moments().watch() as m:
        assert main(argv_of(tmp_path, tmp_path / "ref")) == 0
    want = results(tmp_path / "ref")
    want_files = set(files(tmp_path / "ref"))
    for seed in range(3):
        rng = random.Random(100 * seed + len(command))
        moment = random_moment(rng, m.counts)
        why = f"{command}, seed {seed}: SIGKILL at {moment[0]} event {moment[1]} of {m.counts}"
        out = tmp_path / f"killed{seed}"
        argv = argv_of(tmp_path, out)
        assert killed_by_sigkill(run_killed(argv, moment)), why
        left = assert_complete_or_absent(out)
        assert set(left) <= want_files, (why, sorted(left))
        assert main(argv) == 0, why
        assert set(files(out)) == want_files, why  # temporary files swept, nothing extra
        got = results(out)
        if command == "ablate":
            pd.testing.assert_frame_equal(got, want, check_exact=True, obj=why)
        else:
            pd.testing.assert_frame_equal(got[0], want[0], check_exact=True, obj=why)
            assert got[1:] == want[1:], why
