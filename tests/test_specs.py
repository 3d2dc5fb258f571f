"""Model specs resolve to the right model, and bad input gets one clear line."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import PROMPTS, assert_close
from workbench.errors import WorkbenchError
from workbench.models.specs import load

PY = sys.executable


def run_cli(*args, cwd=None):
    return subprocess.run([PY, "-m", "workbench", *args], capture_output=True, text=True, cwd=cwd,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


def test_local_directory_round_trip(saved_dir):
    a, b = load("zoo:qwen2-moe"), load(str(saved_dir))
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka  # the weights round-trip exactly
    ids = a.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    # The reloaded weights live in other (memory-mapped, not 64-byte aligned) buffers, where MKL may take
    # another GEMM path: the logits agree to fp32 tolerance, not bit for bit (1.8e-7 seen on AMD EPYC).
    assert_close(b.model(ids).logits, a.model(ids).logits)
    assert b.summary()["experts"] == 8 and b.summary()["shared_experts"] == 1


def expect_error(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_spec(tmp_path):
    r = run_cli("trace", "no-such-model", "--text", "hi", "--out", str(tmp_path / "o"))
    expect_error(r, "unknown model spec 'no-such-model'", "offline", "smollm2-135m")
    assert not (tmp_path / "o").exists()


def test_a_spec_or_dtype_of_the_wrong_kind_is_refused_at_once(monkeypatch):
    """load(None) was looked up on the hub as the text "None" (24 s) before its error; dtype=torch.int64 failed inside
    torch ("only floating point tensors can require gradients"). float64, a floating-point dtype, still loads."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("the hub was asked"))
    for spec in (None, 5):
        with pytest.raises(WorkbenchError,
                           match=f"^a model spec is a string or a folder path, not {type(spec).__name__}$"):
            load(spec)
    with pytest.raises(WorkbenchError, match=r"^dtype torch.int64 cannot hold a model's weights: give a floating"):
        load("zoo:qwen3-moe", dtype=torch.int64)
    assert next(load("zoo:qwen3-moe", dtype=torch.float64).model.parameters()).dtype == torch.float64


def test_the_hubs_retry_lines_stay_out_of_an_unknown_specs_error(monkeypatch):
    """Online without the hub, `workbench trace nosuch-model` printed 10 huggingface_hub lines (each failed request
    and its "Retrying in Ns") before its one error line. They are held back for the lookup, and the error says how to
    skip the hub."""
    import logging

    import transformers

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = []

    def lookup(*a, **k):  # as the hub client does: a warning per retry, then the error
        seen.append(logging.getLogger("huggingface_hub.utils._http").isEnabledFor(logging.WARNING))
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lookup)
    before = logging.getLogger("huggingface_hub").level
    with pytest.raises(WorkbenchError, match="unknown model spec 'nosuch-model': .*HF_HUB_OFFLINE=1 skips the hub"):
        load("nosuch-model")
    assert seen == [False] and logging.getLogger("huggingface_hub").level == before


def test_directory_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    r = run_cli("trace", str(tmp_path / "m"), "--text", "hi", "--out", str(tmp_path / "o"))
    expect_error(r, "no config.json")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_lists_supported(tmp_path, saved_dir):
    d = tmp_path / "t5ish"
    shutil.copytree(saved_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "t5"
    (d / "config.json").write_text(json.dumps(cfg))
    r = run_cli("trace", str(d), "--text", "hi", "--out", str(tmp_path / "o"))
    expect_error(r, "unsupported architecture 't5'", "qwen3_moe", "llama", "mixtral")
    with pytest.raises(WorkbenchError, match="supported model types"):
        load(str(d))


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors(tmp_path, saved_dir, damage):
    d = tmp_path / "bad"
    shutil.copytree(saved_dir, d)
    f = next(d.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 8 + data[8:])
    r = run_cli("trace", str(d), "--text", "hi", "--out", str(tmp_path / "o"))
    expect_error(r, "corrupt safetensors file")
    assert not (tmp_path / "o").exists()


def test_empty_prompt_list(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    r = run_cli("trace", "zoo:qwen3-moe", "--prompts", str(empty), "--out", str(tmp_path / "o"))
    expect_error(r, "has no prompts")
    assert not (tmp_path / "o").exists()
    with pytest.raises(WorkbenchError, match="prompt list is empty"):
        from workbench.tracing.runner import trace
        from workbench.tracing.sites import all_sites

        lm = load("zoo:qwen3-moe")
        trace(lm, [], all_sites(lm.adapter, lm.model, ["expert"]), progress=False)


def test_missing_prompts_file_and_bad_component(tmp_path):
    expect_error(run_cli("trace", "zoo:olmoe", "--prompts", str(tmp_path / "nope.txt"), "--out", str(tmp_path)),
                 "does not exist")
    expect_error(run_cli("trace", "zoo:olmoe", "--text", "hi", "--components", "bogus", "--out", str(tmp_path)),
                 "unknown component 'bogus'")
    expect_error(run_cli("trace", "zoo:olmoe", "--text", "hi", "--layers", "9", "--out", str(tmp_path / "o")),
                 "layer 9 out of range")


def test_debug_shows_traceback(tmp_path):
    r = run_cli("--debug", "trace", "zoo:nope", "--text", "hi", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" in r.stderr and "error: unknown zoo model 'nope'" in r.stderr


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = run_cli("trace", "zoo:qwen3-moe", "--text", "hello there", "--quiet", "--out", str(blocker / "sub"))
    expect_error(r, "cannot write")


def test_trace_cli_writes_json(tmp_path):
    r = run_cli("trace", "zoo:qwen2-moe", "--text", "The capital of France is", "--text", "Hello world",
                "--components", "expert,shared_expert,router", "--reducers", "absmax,moments", "--quiet",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "o" / "trace.json").read_text())
    assert data["meta"]["num_prompts"] == 2
    assert "L1.shared_expert.E0" in data["sites"] and "L0.expert.E7" in data["sites"]
    top = data["top_absmax"][0]
    assert top["max_abs"] >= max(s["absmax"]["max_abs"] for s in data["sites"].values())
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.startswith(".")]  # no temp files left


def test_models_lists_builtins():
    r = run_cli("models")
    assert r.returncode == 0, r.stderr
    for spec in ["smollm2-135m", "smollm2-moe", "zoo:qwen2-moe", "zoo:qwen3-moe", "zoo:olmoe", "zoo:mixtral", "zoo:deepseek-v3",
                 "zoo:tiny-moe"]:
        assert spec in r.stdout
    assert "modulelist" in r.stdout
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["spec", "architecture", "params", "layers", "experts", "shared", "top_k", "layout",
                                "description"]
    assert all(line == line.rstrip() for line in lines)  # no padding after the last column


def test_help_on_every_subcommand():
    for sub in ([], ["models"], ["trace"]):
        r = run_cli(*sub, "--help")
        assert r.returncode == 0 and "usage: workbench" in r.stdout


def test_hub_id_from_local_cache(tmp_path, saved_dir):
    """A hub id resolves offline when it is in the local HF cache (the real hub loading path)."""
    snap = tmp_path / "hub" / "models--acme--tiny-moe" / "snapshots" / "0123abcd"
    shutil.copytree(saved_dir, snap)
    (tmp_path / "hub" / "models--acme--tiny-moe" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-moe" / "refs" / "main").write_text("0123abcd")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    code = ("from workbench.models.specs import load; lm = load('acme/tiny-moe'); "
            "print(lm.summary()['architecture'], lm.summary()['experts'])")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["Qwen2MoeForCausalLM", "8"]
    missing = subprocess.run([PY, "-m", "workbench", "trace", "acme/other", "--text", "x", "--out", str(tmp_path / "o")],
                             capture_output=True, text=True, env=env, timeout=300)
    expect_error(missing, "unknown model spec 'acme/other'", "offline")


def test_text_files_written_with_a_byte_order_mark_read_as_without(tmp_path):
    """Windows editors may start a UTF-8 file with a byte-order mark: it must not become part of the first prompt,
    fact or study line."""
    from workbench.circuits.facts import read_facts
    from workbench.data import read_prompts

    (tmp_path / "p.txt").write_text("Hello there\nSecond\n", encoding="utf-8-sig")
    assert read_prompts(tmp_path / "p.txt") == ["Hello there", "Second"]
    (tmp_path / "f.jsonl").write_text('{"prompt": "The capital of France is", "answer": " Paris"}\n',
                                      encoding="utf-8-sig")
    assert read_facts(tmp_path / "f.jsonl")[0].prompt == "The capital of France is"
    from workbench.io import read_structured

    for name, text in (("s.json", '{"name": "x"}'), ("s.yaml", "name: x\n")):
        (tmp_path / name).write_text(text, encoding="utf-8-sig")
        assert read_structured(tmp_path / name)[0] == {"name": "x"}
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(WorkbenchError, match="is not UTF-8 text"):
        read_structured(tmp_path / "latin1.yaml", "study file")
