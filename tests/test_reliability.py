"""Reliability: resumable profile runs, deterministic outputs, the bad-input matrix, safe loading.

Every bad input gives one ``error:`` line, a non-zero exit status and no output folder. The CLI runs
in-process (``workbench.cli.main``) except where a real process matters (SIGKILL, determinism).
"""

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import PROMPTS, assert_json_close, one_error
from workbench.cli import main
from workbench.data import DATA_DIR
from workbench.models.specs import load

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=600, **kw):
    return subprocess.run([PY, "-m", "workbench", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kw)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def checkpoint_cursor(path: Path) -> int | None:
    """The batch cursor saved in a checkpoint file, or None while there is none."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.metadata()["cursor"])
    except Exception:  # not there yet (it appears by an atomic rename, so never half-written)
        return None


# ----- resumable runs -----------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_profile_resumes_byte_identical(tmp_path):
    """SIGKILL at a random point after the first checkpoint; the rerun resumes and equals an uninterrupted run."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join((DATA_DIR / "prompts.txt").read_text().splitlines()[:96]) + "\n")
    args = ["profile", "zoo:qwen2-moe", "--prompts", str(prompts), "--batch-size", "4", "--checkpoint-every", "2",
            "--no-plots", "--quiet"]
    ref = cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    ckpt = out / "profile.checkpoint.safetensors"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    target = rng.randrange(2, 20, 2)  # kill after the checkpoint at this batch (of 24; one every 2) ...
    fraction = rng.random()  # ... plus this fraction of the time two batches take
    proc = subprocess.Popen([PY, "-m", "workbench", *args, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        seen: dict[int, float] = {}
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and max(seen, default=0) < target:
            cursor = checkpoint_cursor(ckpt)
            if cursor is not None and cursor not in seen:
                seen[cursor] = time.monotonic()
            time.sleep(0.01)
        steps = sorted(seen)
        two_batches = 0.2 if len(steps) < 2 else (seen[steps[-1]] - seen[steps[0]]) / ((steps[-1] - steps[0]) // 2)
        time.sleep(fraction * two_batches)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    why = f"seed {seed}: target batch {target}, fraction {fraction:.2f}"
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill ({why})"
    assert ckpt.exists() and not (out / "profile.json").exists()
    again = cli(*args, "--out", str(out))
    assert again.returncode == 0, again.stderr
    run_facts = json.loads((out / "run.json").read_text())
    assert run_facts["resumed_at_batch"] >= target, run_facts  # it resumed, it did not start over
    got, want = files(out), files(tmp_path / "ref")
    assert set(got) == set(want)  # the checkpoint and any temporary file are gone
    for name in want:
        if name != "run.json":  # wall time and the resume point: the only files allowed to differ
            assert got[name] == want[name], f"{name} differs ({why})"


def test_checkpoint_restores_every_stateful_object(tmp_path):
    """Run half the batches, checkpoint, load into fresh objects, finish: state equals one uninterrupted pass."""
    from workbench.experts.profile import ProfileOptions, profile
    from workbench.experts.report import split
    from workbench.tracing.state import Checkpoint

    lm = load("zoo:deepseek-v3")  # dense layer 0, routed + shared experts, sigmoid router
    prompts = [*PROMPTS, *PROMPTS[:3]]
    opts = ProfileOptions(batch_size=2)
    # Saving a checkpoint hands coalesced payloads to the reducers first, so the uninterrupted reference saves
    # checkpoints at the same batches: the same reductions of the same rows, hence bit-equal.
    whole = split(profile(lm, prompts, opts, progress=False, checkpoint=Checkpoint(tmp_path / "ref.safetensors",
                                                                                   every=1)))[0]
    plain = split(profile(lm, prompts, opts, progress=False))[0]  # rows split otherwise: float sums to rounding
    assert_json_close(whole, plain, rtol=1e-9, atol=1e-12)
    ck = Checkpoint(tmp_path / "c.safetensors", every=1)
    calls = []

    class Stop(Exception):
        pass

    real_save = Checkpoint.save

    def save_then_die(self, cursor, fp, flat):
        real_save(self, cursor, fp, flat)
        calls.append(cursor)
        if cursor == 2:
            raise Stop

    def interrupted(ck):  # a pass that saves its checkpoint at batches 1 and 2, then dies
        Checkpoint.save = save_then_die
        try:
            with pytest.raises(Stop):
                profile(lm, prompts, opts, progress=False, checkpoint=ck)
        finally:
            Checkpoint.save = real_save

    interrupted(ck)
    assert calls == [1, 2]
    p = profile(lm, prompts, opts, progress=False, checkpoint=ck)
    assert p["run"]["resumed_at_batch"] == 2
    assert split(p)[0] == whole
    # a checkpoint of another run (other batch size) is ignored with a warning, not resumed
    with pytest.warns(UserWarning, match=r"different run \(changed: .*batch size"):
        other = profile(lm, prompts, ProfileOptions(batch_size=3), progress=False, checkpoint=ck)
    assert other["run"]["resumed_at_batch"] is None
    # and so is one of other weights under the same spec (another checkpoint copied to the same path, a planted
    # row): it was resumed, mixing two models' statistics in one profile.json
    interrupted(ck)
    experts = lm.adapter.experts(lm.adapter.decoder_layers(lm.model)[1])
    with torch.no_grad():
        experts.down_proj[3][5] *= 300.0
    with pytest.warns(UserWarning, match=r"changed: weights \(or their dtype\)"):  # the planted row, named
        planted = profile(lm, prompts, opts, progress=False, checkpoint=ck)
    assert planted["run"]["resumed_at_batch"] is None
    # and so is one written by a workbench that counted a statistic otherwise (LocalConsistency's SCH before
    # 2026-12-07): it was resumed, each SCH histogram holding counts of two kinds
    import json

    from workbench.experts import profile as profile_module

    ck = Checkpoint(tmp_path / "d.safetensors", every=1)
    interrupted(ck)
    assert json.loads(ck.tag)["counting"] == profile_module.COUNTING
    profile_module.COUNTING, before = "a later way", profile_module.COUNTING
    try:
        with pytest.warns(UserWarning, match=r"changed: how the statistics are counted"):
            later = profile(lm, prompts, opts, progress=False, checkpoint=ck)
    finally:
        profile_module.COUNTING = before
    assert later["run"]["resumed_at_batch"] is None


def test_state_dicts_of_sink_meter_and_change_rate():
    from workbench.experts.router import ChangeRate
    from workbench.experts.sinks import SinkMeter
    from workbench.tracing import state

    m = SinkMeter(3, 2)
    m.pos0_sum += torch.rand(3, 2, dtype=torch.float64)
    m.prompts += 4
    c = ChangeRate([1, 2, 3])
    c.changed, c.total = {2: 3, 3: 1}, {2: 10, 3: 10}
    objs = {"m": m, "c": c}
    flat = state.flatten(objs)
    fresh = {"m": SinkMeter(3, 2), "c": ChangeRate([1, 2, 3])}
    state.load(fresh, flat)
    assert torch.equal(fresh["m"].pos0_sum, m.pos0_sum) and fresh["c"].result() == c.result()
    state.merge(fresh, flat)  # merging a second copy doubles every count
    assert fresh["c"].changed == {2: 6, 3: 2} and torch.equal(fresh["m"].prompts, 2 * m.prompts)


# ----- determinism ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_same_profile_command_twice_gives_identical_files(tmp_path):
    args = ["profile", "zoo:qwen3-moe", "--text", PROMPTS[0], "--text", PROMPTS[1], "--text", PROMPTS[3], "--quiet"]
    for name in ("a", "b"):
        r = cli(*args, "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert set(a) == set(b) and {"profile.json", "run.json", "experts.parquet", "expert_maxabs.png",
                                 "expert_maxabs.html"} <= set(a)
    differ = sorted(n for n in a if a[n] != b[n])
    assert differ in ([], ["run.json"]), differ  # only run.json (wall time) may differ
    text = a["profile.json"].decode()
    p = json.loads(text)
    assert "seconds" not in p["meta"] and "seconds" in json.loads(a["run.json"])
    assert list(p) == sorted(p)  # sorted keys
    floats = re.findall(r"-?\d+\.\d+(?:e[-+]\d+)?", text)
    assert floats and all(len(f.lstrip("-").replace(".", "").split("e")[0].lstrip("0")) <= 8 for f in floats)
    # trace too: its wall time sat in trace.json's meta, so no two runs wrote the same trace.json
    targs = ["trace", "zoo:qwen3-moe", "--text", PROMPTS[0], "--text", PROMPTS[3], "--quiet"]
    for name in ("ta", "tb"):
        r = cli(*targs, "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
    a, b = files(tmp_path / "ta"), files(tmp_path / "tb")
    assert set(a) == {"trace.json", "run.json"} and a["trace.json"] == b["trace.json"]
    assert "seconds" not in json.loads(a["trace.json"])["meta"] and json.loads(a["run.json"])["seconds"] > 0


# ----- the bad-input matrix ------------------------------------------------------------------------
def test_unknown_spec(run, tmp_path):
    one_error(*run("profile", "no-such-model", "--text", "hi", "--out", str(tmp_path / "o"))[::2],
              "unknown model spec 'no-such-model'", "smollm2-135m")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage, message", [
    ("no_config", "no config.json"),
    ("corrupt_config", "config.json is not valid JSON"),
    ("no_safetensors", "no *.safetensors weights"),
    ("truncated_safetensors", "corrupt safetensors file"),
    ("garbage_safetensors", "corrupt safetensors file"),
    ("no_tokenizer", "no tokenizer in the directory"),
    ("unsupported", "unsupported architecture 't5'"),
])
def test_broken_model_directory(run, tmp_path, saved_dir, damage, message):
    d = tmp_path / "model"
    shutil.copytree(saved_dir, d)
    st = next(d.glob("*.safetensors"))
    if damage == "no_config":
        (d / "config.json").unlink()
    elif damage == "corrupt_config":
        (d / "config.json").write_text('{"model_type": "qwen2_moe",')
    elif damage == "no_safetensors":
        st.unlink()
    elif damage == "truncated_safetensors":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif damage == "garbage_safetensors":
        st.write_bytes(b"\xff" * 8 + st.read_bytes()[8:])
    elif damage == "no_tokenizer":
        for f in d.glob("tokenizer*"):
            f.unlink()
    elif damage == "unsupported":
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
    code, _, err = run("profile", str(d), "--text", "hi", "--quiet", "--out", str(tmp_path / "o"))
    line = one_error(code, err, message)
    if damage == "unsupported":
        for t in ("llama", "qwen3_moe", "mixtral", "deepseek_v3"):
            assert t in line  # the supported model types are listed
    assert not (tmp_path / "o").exists()


def test_layer_and_expert_index_out_of_range(run, tmp_path):
    one_error(*run("trace", "zoo:olmoe", "--text", "hi", "--layers", "4", "--quiet", "--out", str(tmp_path / "o"))[::2],
              "layer 4 out of range")
    study = tmp_path / "study.yaml"
    study.write_text("texts: [hello world]\nmetrics: [perplexity]\nconditions:\n"
                     "  - name: bad\n    interventions: [{op: zero, layers: 1, expert: 99}]\n")
    one_error(*run("ablate", "zoo:olmoe", "--study", str(study), "--quiet", "--out", str(tmp_path / "o"))[::2],
              "expert 99 out of range")
    assert not (tmp_path / "o").exists()


def test_empty_prompts_file(run, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    one_error(*run("profile", "zoo:qwen3-moe", "--prompts", str(empty), "--out", str(tmp_path / "o"))[::2],
              "has no prompts")
    assert not (tmp_path / "o").exists()


def test_prompt_longer_than_the_context_is_truncated_with_a_warning(run, tmp_path):
    """Documented choice: truncate to max_position_embeddings (512 for the zoo) and warn, then carry on."""
    long = " ".join(["word"] * 700)
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) longer than 512 tokens were truncated"):
        code, out, err = run("profile", "zoo:qwen3-moe", "--text", long, "--text", "short prompt", "--no-plots",
                             "--quiet", "--out", str(tmp_path / "o"))
    assert code == 0, err
    p = json.loads((tmp_path / "o" / "profile.json").read_text())
    assert p["meta"]["num_tokens"] == 512 + len(load("zoo:qwen3-moe").tokenizer("short prompt").input_ids)


def test_nan_and_inf_activations_are_reported_not_fatal(run, tmp_path):
    lm = load("zoo:qwen2-moe")
    with torch.no_grad():
        lm.model.model.layers[1].mlp.experts.down_proj[3, 5, :] = float("nan")  # expert 3 writes NaN to channel 5
    d = tmp_path / "nan-model"
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    code, out, err = run("profile", str(d), "--text", PROMPTS[0], "--text", PROMPTS[1], "--text", PROMPTS[2],
                         "--no-plots", "--quiet", "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "warning: non-finite activations from layer 1" in err
    p = json.loads((tmp_path / "o" / "profile.json").read_text())
    nf = p["non_finite"]
    assert nf["first_layer"] == 1 and nf["expert_nan"] > 0 and nf["residual_nan"] > 0
    e3 = next(e for e in p["experts"] if (e["layer"], e["expert"], e["kind"]) == (1, 3, "routed"))
    assert e3["nan_count"] > 0 and e3["max_abs"] == e3["max_abs"]  # NaN is counted, never the maximum


@pytest.mark.parametrize("kind", ["study_yaml", "facts_jsonl"])
def test_malformed_study_and_facts_name_the_line(run, tmp_path, kind):
    if kind == "study_yaml":
        f = tmp_path / "study.yaml"
        f.write_text("texts: [a, b]\nmetrics: [perplexity]\nconditions:\n  - name: x\n    interventions: [{op: zero\n")
        code, _, err = run("ablate", "zoo:olmoe", "--study", str(f), "--out", str(tmp_path / "o"))
        one_error(code, err, "line", "not valid YAML")
    else:
        f = tmp_path / "facts.jsonl"
        f.write_text('{"prompt": "The capital of France is", "answer": " Paris"}\n{"prompt": "oops"\n')
        code, _, err = run("circuit", "zoo:qwen3-moe", "--facts", str(f), "--out", str(tmp_path / "o"))
        one_error(code, err, "line 2", "not valid JSON")
    assert not (tmp_path / "o").exists()


def test_output_folder_not_writable(run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "sub"):
        code, _, err = run("profile", "zoo:qwen3-moe", "--text", "hello there", "--quiet", "--out", str(out))
        one_error(code, err, str(blocker))
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("fail_at", [1, 3, 6])
def test_disk_full_leaves_nothing_partial(run, tmp_path, monkeypatch, fail_at):
    """ENOSPC from the atomic writer's fsync on the n-th file: one error line, no output files, no temp files."""
    import workbench.io as wio

    calls = [0]
    real = os.fsync

    def fsync(fd):
        calls[0] += 1
        if calls[0] == fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(wio.os, "fsync", fsync)
    out = tmp_path / "o"
    code, _, err = run("profile", "zoo:qwen2-moe", "--text", PROMPTS[0], "--text", PROMPTS[1], "--quiet", "--out",
                       str(out))
    one_error(code, err, "No space left on device")
    assert calls[0] == fail_at
    assert not out.exists() or not list(out.iterdir()), sorted(p.name for p in out.iterdir())


def test_disk_full_during_a_checkpoint_keeps_the_last_good_one(run, tmp_path, monkeypatch):
    import workbench.io as wio

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS * 2) + "\n")
    calls = [0]
    real = os.fsync

    def fsync(fd):
        calls[0] += 1
        if calls[0] == 2:  # the second checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(wio.os, "fsync", fsync)
    out = tmp_path / "o"
    args = ["profile", "zoo:qwen3-moe", "--prompts", str(prompts), "--batch-size", "2", "--checkpoint-every", "1",
            "--no-plots", "--quiet", "--out", str(out)]
    one_error(*run(*args)[::2], "cannot write", "profile.checkpoint.safetensors", "No space left on device")
    assert [p.name for p in out.iterdir()] == ["profile.checkpoint.safetensors"]
    monkeypatch.setattr(wio.os, "fsync", real)
    code, _, err = run(*args)
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["resumed_at_batch"] == 1


def test_safetensors_writes_leave_nothing_behind_when_killed(tmp_path):
    """safetensors writes through a ``.tmpXXXXXX`` file of its own; a kill mid-write must not leave it in --out."""
    from safetensors.torch import load_file

    from workbench.io import clear_stale_temps, save_safetensors

    target = tmp_path / "profile.checkpoint.safetensors"
    save_safetensors(target, {"x": torch.arange(6.0)}, {"cursor": "3"})
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert torch.equal(load_file(target)["x"], torch.arange(6.0))
    assert target.stat().st_mode & 0o644 == 0o644  # readable by others, as every other output
    # What a SIGKILL inside safetensors' own write leaves: our private folder holding its temporary.
    killed = tmp_path / f".{target.name}.k1ll3d.tmp"
    killed.mkdir()
    (killed / ".tmpAbC123").write_bytes(b"half")
    clear_stale_temps(tmp_path, [target.name])
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_device_flags(run, tmp_path):
    if not torch.cuda.is_available():
        one_error(*run("profile", "zoo:qwen3-moe", "--text", "hi", "--device", "cuda", "--out", str(tmp_path / "o"))[::2],
                  "--device cuda: CUDA is not available", "--device cpu")
        one_error(*run("trace", "zoo:qwen3-moe", "--text", "hi", "--device", "cuda:1", "--out", str(tmp_path / "o"))[::2],
                  "CUDA is not available")
    one_error(*run("trace", "zoo:qwen3-moe", "--text", "hi", "--device", "tpu", "--out", str(tmp_path / "o"))[::2],
              "unknown device 'tpu'")
    one_error(*run("profile", "zoo:qwen3-moe", "--text", "hi", "--device-map", "auto", "--out", str(tmp_path / "o"))[::2],
              "--device-map auto is for local or hub checkpoints")
    assert not (tmp_path / "o").exists()
    code, _, err = run("trace", "zoo:qwen3-moe", "--text", "hi there", "--device", "auto", "--dtype", "bfloat16",
                       "--quiet", "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "trace.json").read_text())["meta"]["dtype"] == "bfloat16"
    code, _, err = run("profile", "zoo:qwen3-moe", "--text", "hi there", "--dtype", "bf16", "--no-plots", "--quiet",
                       "--out", str(tmp_path / "p"))
    assert code == 0, err
    assert json.loads((tmp_path / "p" / "profile.json").read_text())["meta"]["dtype"] == "bfloat16"
    lm = load("zoo:qwen3-moe", device="auto", dtype="float16")
    assert lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu") and lm.model.dtype == torch.float16


# ----- safe loading ---------------------------------------------------------------------------------
def test_weights_load_safely():
    """No pickle: safetensors only, torch.load only with weights_only=True, remote code off unless asked."""
    packages = ["workbench", "experts", "circuits", "kernels", "ui", "sae"]
    offenders = []
    for pkg in packages:
        for f in (ROOT / pkg).rglob("*.py"):
            text = f.read_text()
            for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
                if "weights_only=True" not in m.group(1):
                    offenders.append(f"{f.relative_to(ROOT)}: {m.group(0)}")
            for m in re.finditer(r"trust_remote_code\s*=\s*True", text):
                offenders.append(f"{f.relative_to(ROOT)}: {m.group(0)}")
            if re.search(r"^\s*import pickle|^\s*from pickle", text, re.M):
                offenders.append(f"{f.relative_to(ROOT)}: imports pickle")
    assert not offenders, offenders


def test_trust_remote_code_is_threaded_to_transformers(monkeypatch, saved_dir, run, tmp_path, capsys):
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen.append(kw.get("trust_remote_code"))
        return real(*a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    for extra in ([], ["--trust-remote-code"]):
        code, _, err = run("trace", str(saved_dir), "--text", "hi there", "--quiet", *extra,
                           "--out", str(tmp_path / f"o{len(extra)}"))
        assert code == 0, err
    assert seen == [False, True]
    for sub in ("trace", "profile", "contrast", "ablate"):
        with pytest.raises(SystemExit):
            main([sub, "--help"])
        assert "--trust-remote-code" in capsys.readouterr().out


def test_a_checkpoint_of_another_run_names_what_changed(tmp_path):
    """A profile resumed in another dtype was refused as "(model or its weights, prompts or options changed)";
    the checkpoint keeps a hash of each part of the run, and the warning names the parts that differ."""
    import json

    import torch

    from workbench.experts.profile import COUNTING
    from workbench.tracing.state import Checkpoint, fingerprint

    def fp(dtype, batch_size=4):
        return fingerprint(spec="zoo:qwen3-moe", token_ids=torch.arange(5), batch_size=batch_size,
                           tag=json.dumps({"options": "ProfileOptions()", "dtype": dtype}))

    ck = Checkpoint(tmp_path / "c.safetensors", every=1)
    ck.save(3, fp("torch.float32"), {"x": torch.zeros(2)})
    assert ck.load(fp("torch.float32"))[0] == 3
    with pytest.warns(UserWarning, match=r"it belongs to a different run \(changed: dtype\); starting over"):
        assert ck.load(fp("torch.bfloat16")) is None
    with pytest.warns(UserWarning, match=r"\(changed: batch size, dtype\)"):
        assert ck.load(fp("torch.bfloat16", batch_size=8)) is None
    # a checkpoint of a profile that counted its statistics otherwise (before LocalConsistency's SCH changed meaning)
    old = fingerprint(spec="zoo:qwen3-moe", tag=json.dumps({"options": "ProfileOptions()", "dtype": "torch.float32"}))
    ck.save(3, old, {"x": torch.zeros(2)})
    now = fingerprint(spec="zoo:qwen3-moe", tag=json.dumps({"options": "ProfileOptions()", "dtype": "torch.float32",
                                                             "counting": COUNTING}))
    with pytest.warns(UserWarning, match=r"\(changed: how the statistics are counted \(the checkpoint is from an older "
                                         r"workbench\)\); starting over"):
        assert ck.load(now) is None
    # the batch order and the rank's block follow from the prompts: new prompts are named alone ("batch order,
    # prompts" blamed an unchanged --batch-order)
    ck.save(3, fingerprint(token_ids=torch.arange(5), batches=torch.tensor([1, 0]), shard=(0, 2, 0, 1)), {})
    with pytest.warns(UserWarning, match=r"\(changed: prompts\); starting over"):
        assert ck.load(fingerprint(token_ids=torch.arange(6), batches=torch.tensor([0, 1]), shard=(0, 2, 0, 2))) is None
    with pytest.warns(UserWarning, match=r"\(changed: batch order\); starting over"):
        assert ck.load(fingerprint(token_ids=torch.arange(5), batches=torch.tensor([0, 1]), shard=(0, 2, 0, 1))) is None
