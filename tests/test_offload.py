"""Layer streaming (--offload layers): one decoder layer in memory at a time, results equal to the in-memory run."""

import json
import subprocess
import sys

import pytest
import torch

import helpers
from helpers import PROMPTS, assert_clear_routing, assert_json_close, assert_reducers_close
from workbench.data import default_prompts
from workbench.errors import WorkbenchError
from workbench.experts.profile import ProfileOptions, profile
from workbench.experts.report import split
from workbench.io import dumps_json
from workbench.models.offload import load_streamed
from workbench.models.specs import load
from workbench.tracing.runner import trace
from workbench.tracing.state import Checkpoint
from workbench.tracing.sites import all_sites

SPECS = ["zoo:qwen2-moe", "zoo:qwen3-moe", "zoo:olmoe", "zoo:mixtral", "zoo:deepseek-v3", "zoo:tiny-moe"]
PY = sys.executable


def saved(tmp_path, spec: str, **kw):
    lm = load(spec)
    d = tmp_path / spec.replace(":", "-")
    lm.model.save_pretrained(d, **kw)
    lm.tokenizer.save_pretrained(d)
    return lm, d


def profile_json(lm, prompts, **kw) -> dict:
    p = split(profile(lm, prompts, ProfileOptions(batch_size=4, **kw), progress=False))[0]
    p["meta"].pop("spec")
    return json.loads(dumps_json(p))


@pytest.mark.parametrize("spec", SPECS)
def test_streamed_profile_equals_in_memory(tmp_path, spec):
    zoo, d = saved(tmp_path, spec)
    prompts = default_prompts()[:10] + PROMPTS
    streamed = load_streamed(str(d))
    assert all(p.device.type == "meta" for p in streamed.model.parameters())
    # Streamed (and reloaded) weights live in other buffers than the zoo model's, where MKL may take
    # another GEMM path: the profiles agree to fp32 tolerance, tie-aware (helpers.assert_json_close).
    assert_clear_routing(zoo, prompts, what=spec)  # router counts compared exactly: no token on a tie
    want = profile_json(zoo, prompts)
    assert_json_close(profile_json(streamed, prompts), want)
    assert_json_close(profile_json(load(str(d)), prompts), want)  # and the folder loaded in memory
    assert all(p.device.type == "meta" for p in streamed.model.parameters())  # every layer freed again


@pytest.mark.parametrize("model_type", ["granitemoe", "granitemoeshared", "granitemoehybrid"])
def test_streamed_granite_equals_in_memory(tmp_path, zoo_tokenizer, model_type):
    """Each streamed layer after the first took its input through the base model's inputs_embeds, which Granite
    multiplies by its embedding_multiplier (12): the residual grew 12x per layer (last layer's massive activations
    1215 against 0.70), silently. Granite-MoE-Shared and -Hybrid, whose layers the adapter prepares, were internal
    errors (the weight loader found the prepared layer's shared_mlp attribute pointing elsewhere)."""
    from workbench.models.families import save_tiny

    d = save_tiny(model_type, tmp_path / model_type, zoo_tokenizer)
    want = profile_json(load(str(d)), PROMPTS)
    assert_json_close(profile_json(load_streamed(str(d)), PROMPTS), want)


def test_streamed_trace_of_every_component_equals_in_memory(tmp_path):
    zoo, d = saved(tmp_path, "zoo:qwen2-moe")  # shared experts too
    assert_clear_routing(zoo, PROMPTS, what="zoo:qwen2-moe")  # each expert sees the same tokens in both runs
    comps = ["resid_pre", "resid_post", "attn_out", "mlp_out", "router", "expert", "shared_expert"]
    results = []
    for lm in (zoo, load_streamed(str(d))):
        sites = all_sites(lm.adapter, lm.model, comps)
        res = trace(lm, PROMPTS * 3, sites, ["absmax", "moments", "log_histogram"], batch_size=3, progress=False)
        results.append({(s, k): r for s, reds in res.reducers.items() for k, r in reds.items()})
    a, b = results
    assert a.keys() == b.keys() and len(a) > 100
    for key in a:  # other buffers (see above): equal to fp32 tolerance, ties and histogram edges allowed for
        assert_reducers_close(a[key], b[key], msg=str(key))


@pytest.mark.parametrize("spec", ["zoo:olmoe", "zoo:deepseek-v3"])  # DeepSeek keeps its router bias in fp32
def test_streamed_bfloat16_equals_in_memory(tmp_path, spec):
    _, d = saved(tmp_path, spec)
    bf = profile_json(load_streamed(str(d), dtype="bfloat16"), PROMPTS * 2)
    assert bf["meta"]["dtype"] == "bfloat16"
    # Same bf16 weights in other buffers: fp32-accumulated matmuls that may block differently, then one
    # bf16 rounding of each activation; a rounding flip is one bf16 step (2^-8 relative), hence bf16's
    # rtol; the absolute floor is fp32's, since this tiny model's activations are ~1e-2, not ~1.
    # Router counts are compared exactly, and here that holds only while both runs are bit-identical, as they
    # were on the CPUs the suite has passed on: at bf16's rounding most prompts hold a routing near-tie
    # (helpers.routing_ties(..., rel=1e-2) finds one in 40 of the first 40 built-in prompts on olmoe, 32 on deepseek).
    rtol = helpers.TOLERANCES[torch.bfloat16]["rtol"]
    assert_json_close(bf, profile_json(load(str(d), dtype="bfloat16"), PROMPTS * 2), rtol=rtol, atol=1e-6)


def test_sharded_checkpoint(tmp_path):
    zoo, d = saved(tmp_path, "zoo:olmoe", max_shard_size="300KB")
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 3
    prompts = PROMPTS * 2
    assert_clear_routing(zoo, PROMPTS, what="zoo:olmoe")
    assert_json_close(profile_json(load_streamed(str(d)), prompts), profile_json(zoo, prompts))  # other buffers
    next(d.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(WorkbenchError, match="missing"):
        load_streamed(str(d))


def test_offload_errors(tmp_path):
    with pytest.raises(WorkbenchError, match="built in memory"):
        load_streamed("zoo:qwen3-moe")
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(d)
    with pytest.raises(WorkbenchError, match="does not support gpt2"):
        load_streamed(str(d))
    # each refusal names what applies: trace has no checkpoints, and the README's table lists both
    _, d = saved(tmp_path, "zoo:olmoe")
    lm = load_streamed(str(d))
    with pytest.raises(WorkbenchError, match=r"^--offload layers does not combine with --dump \(a streamed pass"):
        trace(lm, PROMPTS, all_sites(lm.adapter, lm.model, ["resid_post"]), ["absmax"], dump_dir=tmp_path / "dump")
    with pytest.raises(WorkbenchError, match=r"^--offload layers runs without checkpoints \(a streamed pass has no"):
        trace(lm, PROMPTS, all_sites(lm.adapter, lm.model, ["resid_post"]), ["absmax"],
              checkpoint=Checkpoint(tmp_path / "c.safetensors", 1))


def test_offload_cli_writes_the_in_memory_profile(tmp_path):
    from workbench.cli import main

    zoo, d = saved(tmp_path, "zoo:deepseek-v3")
    assert_clear_routing(zoo, PROMPTS[:2], what="zoo:deepseek-v3")
    args = ["profile", str(d), "--text", PROMPTS[0], "--text", PROMPTS[1], "--no-plots", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "mem")]) == 0
    assert main([*args, "--offload", "layers", "--out", str(tmp_path / "off")]) == 0
    assert_json_close(*(json.loads((tmp_path / n / "profile.json").read_text()) for n in ("off", "mem")))
    assert json.loads((tmp_path / "off" / "run.json").read_text())["offload"] == "layers"
    assert main(["profile", "zoo:olmoe", "--text", "x", "--offload", "layers", "--out", str(tmp_path / "z")]) == 2
    assert not (tmp_path / "z").exists()


def _peak_rss_mb(argv) -> tuple[float, subprocess.CompletedProcess]:
    """Run a command in a fresh wrapper process and return its child's peak RSS (MB)."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.stderr.write(r.stderr); "
            "sys.exit(r.returncode)")
    r = subprocess.run([PY, "-c", code, *argv], capture_output=True, text=True, timeout=1200)
    return int(r.stdout.split()[-1]) / 1024 if r.returncode == 0 else float("nan"), r


@pytest.mark.slow
def test_smollm2_streamed_equals_in_memory_with_less_memory(tmp_path):
    """SmolLM2-135M (517 MB of fp32 weights): same profile.json; peak RSS lower by most of the weights."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(default_prompts()[:64]) + "\n")
    base = [PY, "-m", "workbench", "profile", "smollm2-135m", "--prompts", str(prompts), "--no-plots", "--quiet"]
    mem, r1 = _peak_rss_mb([*base, "--out", str(tmp_path / "mem")])
    off, r2 = _peak_rss_mb([*base, "--offload", "layers", "--out", str(tmp_path / "off")])
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert_json_close(*(json.loads((tmp_path / n / "profile.json").read_text()) for n in ("off", "mem")))
    print(f"peak RSS: in memory {mem:.0f} MB, streamed {off:.0f} MB")
    assert off < mem - 350, (mem, off)
