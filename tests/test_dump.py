"""Full dumps: opt-in, sharded, and equal to what the reducers saw."""

import json

import pytest
import torch

from helpers import PROMPTS, one_error
from workbench.errors import WorkbenchError
from workbench.models.specs import load
from workbench.tracing.dump import MARKER, DumpWriter, read_site
from workbench.tracing.reducers import AbsMax, Payload
from workbench.tracing.runner import trace
from workbench.tracing.sites import Component, Site, all_sites


def test_dump_round_trip_equals_reducers(tmp_path):
    lm = load("zoo:qwen2-moe")
    sites = all_sites(lm.adapter, lm.model, ["expert", "shared_expert", "resid_post"], [1])
    prompts = PROMPTS * 4
    r = trace(lm, prompts, sites, ["absmax"], batch_size=3, dump_dir=tmp_path / "d", dump_shard_rows=16,
              progress=False)
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    assert index["num_tokens"] == r.num_tokens
    resid = Site(1, Component.RESID_POST)
    assert len(index["sites"][resid.key]) > 1  # streamed in several shards
    for site in sites:
        again = AbsMax()
        rows = 0
        for values, tokens in read_site(tmp_path / "d", site):
            again.update(Payload(values, tokens))
            rows += values.shape[0]
        assert rows == int(r[site]["absmax"].rows)
        if rows:
            assert again.result() == r[site]["absmax"].result()
    # The residual dump holds every real token exactly once, padding excluded.
    toks = torch.cat([t for _, t in read_site(tmp_path / "d", resid)])
    assert sorted(toks.tolist()) == list(range(r.num_tokens))


def test_a_killed_dumps_temporaries_are_cleared_by_the_next_dump(tmp_path):
    """A dump killed mid-write leaves save_safetensors' private folder (holding safetensors' own .tmpXXXXXX);
    the next dump into the same folder removes it."""
    lm = load("zoo:qwen2-moe")
    sites = all_sites(lm.adapter, lm.model, ["resid_post"], [1])
    left = [tmp_path / "d" / ".tokens.safetensors.k1ll3d.tmp",
            tmp_path / "d" / "L1.resid_post" / ".shard-00000.safetensors.x.tmp"]
    for d in left:
        d.mkdir(parents=True)
        (d / ".tmpAbC123").write_bytes(b"half")
    trace(lm, PROMPTS, sites, ["absmax"], dump_dir=tmp_path / "d", progress=False)
    left = [p for p in (tmp_path / "d").rglob(".*") if p.name != MARKER]  # (the marker says the folder is a dump's)
    assert not left, sorted(map(str, left))
    assert sum(v.shape[0] for v, _ in read_site(tmp_path / "d", sites[0])) > 0


def test_no_dump_by_default(tmp_path):
    lm = load("zoo:olmoe")
    r = trace(lm, PROMPTS, all_sites(lm.adapter, lm.model, ["expert"]), progress=False)
    assert r.dump_dir is None


def test_a_rerun_into_a_dump_folder_never_mixes_two_dumps(tmp_path):
    """A rerun removes the old index first: killed part-way (here: after its first shard), it leaves a folder
    without an index, which reading refuses, not the old index over a mix of old and new shards. Finished, it
    removes the old dump's shards and site folders that it did not write again."""
    lm = load("zoo:qwen2-moe")
    resid = all_sites(lm.adapter, lm.model, ["resid_post"], [0, 1])
    trace(lm, PROMPTS * 4, resid, ["absmax"], dump_dir=tmp_path / "d", dump_shard_rows=16, progress=False)
    assert len(list((tmp_path / "d" / "L1.resid_post").iterdir())) > 1

    class Killed(Exception):
        pass

    real = DumpWriter._flush

    def flush_then_die(self, site):
        real(self, site)
        raise Killed
    DumpWriter._flush = flush_then_die
    try:
        with pytest.raises(Killed):
            trace(lm, PROMPTS[::-1] * 4, resid, ["absmax"], dump_dir=tmp_path / "d", dump_shard_rows=16,
                  progress=False)
    finally:
        DumpWriter._flush = real
    assert not (tmp_path / "d" / "index.json").exists()
    r = trace(lm, PROMPTS, resid[1:], ["absmax"], dump_dir=tmp_path / "d", progress=False)  # fewer sites, rows
    assert not (tmp_path / "d" / "L0.resid_post").exists()
    assert sorted(p.name for p in (tmp_path / "d" / "L1.resid_post").iterdir()) == ["shard-00000.safetensors"]
    assert sum(v.shape[0] for v, _ in read_site(tmp_path / "d", resid[1])) == r.num_tokens


def test_outputs_that_cannot_be_written_are_refused_before_any_work(run, tmp_path, monkeypatch):
    """A sweep's `trace --out` into a folder holding a trace.json folder (or /proc) ran the whole pass and wrote a
    complete dump before failing; `--dump FILE` was an internal error; `reduce --out` was checked after every shard
    was reduced, and a dump into a folder with another tool's index.json deleted it."""
    import workbench.cli as cli

    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded before the outputs were "
                                                                  "checked"))
    (tmp_path / "o" / "trace.json").mkdir(parents=True)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "index.json").write_text('{"pages": 3}')
    for argv, needle in [
        (["--out", tmp_path / "o"], f"cannot write {tmp_path / 'o' / 'trace.json'}: a folder of that name is there"),
        (["--out", tmp_path / "new", "--dump", tmp_path / "afile"], f"--dump {tmp_path / 'afile'} exists and is not a"),
        (["--out", tmp_path / "new", "--dump", tmp_path / "afile" / "d"], "afile is not a directory"),
        (["--out", tmp_path / "new", "--dump", tmp_path / "other"], "holds an index.json that is not a dump's"),
        (["--out", "/proc/wb-out"], "cannot write to /proc/wb-out: /proc takes no file"),
    ]:
        code, _, err = run("trace", "zoo:olmoe", "--text", "hello", "--quiet", *argv)
        one_error(code, err, needle)
    assert (tmp_path / "other" / "index.json").read_text() == '{"pages": 3}' and not (tmp_path / "new").exists()
    import sys

    rd = sys.modules["workbench.kernels.reduce_dump"]  # (the package exports the function under the module's name)
    monkeypatch.setattr(rd, "reduce_dump", lambda *a, **k: pytest.fail("reduced before the output was checked"))
    for out, needle in [(tmp_path / "afile" / "x.json", f"--out {tmp_path / 'afile' / 'x.json'}: {tmp_path / 'afile'}"
                                                         " exists and is not a directory"),
                        (tmp_path / "o", f"--out {tmp_path / 'o'} is a directory; give the file to write"),
                        ("/proc/x.json", "cannot write to /proc: /proc takes no file")]:
        code, _, err = run("reduce", tmp_path / "whatever", "--quiet", "--out", out)
        one_error(code, err, needle)


@pytest.mark.parametrize("env,needle", [({"WORLD_SIZE": "abc"}, "environment variable WORLD_SIZE='abc' is not an"),
                                        ({"WORLD_SIZE": "2", "RANK": "0", "WORKBENCH_DIST_TIMEOUT": "abc"},
                                         "WORKBENCH_DIST_TIMEOUT='abc' is not an integer"),
                                        ({"WORLD_SIZE": "2", "RANK": "5"}, "rank 5 outside a world of 2")])
def test_distributed_environment_values_are_checked_before_joining(run, tmp_path, monkeypatch, env, needle):
    """They were internal errors (ValueError), and a rank outside the world waited for the others until the
    rendezvous timed out, then printed torch's C++ stack."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, _, err = run("profile", "zoo:olmoe", "--text", "hi", "--no-plots", "--quiet", "--out", tmp_path / "o")
    one_error(code, err, needle)


def test_a_folder_holding_another_commands_outputs_is_refused(run, tmp_path, monkeypatch):
    """`circuit` into an SAE folder overwrote its metrics.json (then refused to report it), `sae train` into a circuit
    folder the circuit's, `circuit` into a profile folder rebuilt report.html as a profile's with no circuit."""
    import workbench.cli as cli

    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("loaded a model for a refused folder"))
    sae, circuit, prof = tmp_path / "sae", tmp_path / "circuit", tmp_path / "profile"
    for d, f in ((sae, "sae_weights.safetensors"), (circuit, "circuit.json"), (prof, "profile.json")):
        d.mkdir()
        (d / f).write_text("{}")
        (d / "metrics.json").write_text('{"mine": 1}')
    facts = tmp_path / "f.jsonl"
    facts.write_text('{"prompt": "The capital of France is", "answer": " Paris"}\n')
    for argv, needle in [
        (["circuit", "zoo:tiny-moe", "--facts", facts, "--out", sae], "holds the outputs of `workbench sae train`"),
        (["sae", "train", "zoo:tiny-moe", "--site", "L1.resid_post", "--text", "a b c", "--out", circuit],
         "holds the outputs of `workbench circuit` (circuit.json); give `workbench sae train` a folder of its own"),
        (["circuit", "zoo:tiny-moe", "--facts", facts, "--out", prof], "holds the outputs of `workbench profile`"),
        (["trace", "zoo:tiny-moe", "--text", "hi", "--out", prof], "holds the outputs of `workbench profile`"),
    ]:
        one_error(*run(*argv)[::2], needle)
    assert all(json.loads((d / "metrics.json").read_text()) == {"mine": 1} for d in (sae, circuit, prof))


def test_trace_says_where_activations_are_not_finite(tmp_path, zoo_tokenizer, capsys):
    """An fp16 overflow traced without a word: the table showed an inf as a site's maximum and a site with NaN rows
    as clean (trace.json counted them). One warning names how many sites and the first."""
    import torch
    from transformers import AutoModelForCausalLM

    from workbench.cli import main
    from workbench.models.families import save_tiny

    folder = save_tiny("llama", tmp_path / "m", zoo_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 0] = float("inf")  # as an overflow would, from layer 1 on
    model.save_pretrained(folder)
    (tmp_path / "p.txt").write_text("The capital of France is Paris\nHello world\n")
    code = main(["trace", str(folder), "--prompts", str(tmp_path / "p.txt"), "--components", "resid_post",
                 "--reducers", "absmax", "--out", str(tmp_path / "t"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0 and "warning: non-finite activations at 3 site(s), first L1.resid_post:" in err, err
    clean = main(["trace", "zoo:qwen3-moe", "--prompts", str(tmp_path / "p.txt"), "--components", "resid_post",
                  "--out", str(tmp_path / "c"), "--quiet"])
    assert clean == 0 and "non-finite" not in capsys.readouterr().err


def test_a_dump_into_a_folder_of_other_files_is_refused_and_deletes_nothing(tmp_path, run):
    """A folder without a dump's index.json was taken as a dump's: the run removed every site folder's
    shard-*.safetensors it did not write (a user's file of that name included). Such a folder is refused; a dump's
    own folder, even one a killed dump left without its index, is not."""
    lm = load("zoo:qwen2-moe")
    sites = all_sites(lm.adapter, lm.model, ["resid_post"], [0])
    mine = tmp_path / "mine"
    (mine / "L0.resid_post").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep")
    (mine / "L0.resid_post" / "shard-00009.safetensors").write_text("keep too")
    with pytest.raises(WorkbenchError, match=r"dump_dir .*mine holds files that are not a dump's \(L0.resid_post, "
                                             r"\.\.\.\): give an empty or new folder"):
        trace(lm, PROMPTS, sites, ["absmax"], dump_dir=mine, progress=False)
    code, _, err = run("trace", "zoo:qwen2-moe", "--components", "resid_post", "--layers", "0", "--text", "hello",
                       "--dump", mine, "--out", tmp_path / "o", "--quiet")
    one_error(code, err, "--dump", "holds files that are not a dump's")
    assert (mine / "L0.resid_post" / "shard-00009.safetensors").read_text() == "keep too"
    assert (mine / "notes.txt").read_text() == "keep"
    with pytest.raises(WorkbenchError, match="is a file, not a folder"):
        trace(lm, PROMPTS, sites, ["absmax"], dump_dir=mine / "notes.txt", progress=False)
    # a dump's own folder: rerun into it (its index first removed, as a killed rerun would leave it)
    trace(lm, PROMPTS, sites, ["absmax"], dump_dir=tmp_path / "d", progress=False)
    (tmp_path / "d" / "index.json").unlink()
    trace(lm, PROMPTS, sites, ["absmax"], dump_dir=tmp_path / "d", progress=False)
    assert (tmp_path / "d" / "index.json").is_file()


def test_expert_and_router_shards_carry_their_experts_in_token_order(tmp_path):
    """An ``experts`` site's shards held values and tokens only, each token top-k times with no expert to tell the
    rows apart, a router's no chosen experts, and one expert's rows came in the model's (unstable) sort order while
    the README says a dump keeps token order."""
    lm = load("zoo:qwen2-moe")
    sites = all_sites(lm.adapter, lm.model, ["experts", "expert", "router"], [1])
    r = trace(lm, PROMPTS * 3, sites, ["absmax"], batch_size=4, dump_dir=tmp_path / "d", progress=False)
    from safetensors.torch import load_file

    index = json.loads((tmp_path / "d" / "index.json").read_text())
    for site in sites:
        parts = [load_file(str(tmp_path / "d" / n)) for n in index["sites"][site.key]]
        if not parts:
            continue
        tokens = torch.cat([p["tokens"] for p in parts])
        if site.component is Component.EXPERTS:
            experts = torch.cat([p["experts"] for p in parts])
            assert experts.shape == tokens.shape
            for e in experts.unique().tolist():  # each expert's rows: its own expert site's, in token order
                mine = tokens[experts == e]
                assert bool((mine[1:] > mine[:-1]).all())
                alone = torch.cat([t for _, t in read_site(tmp_path / "d", Site(1, Component.EXPERT, e))])
                assert torch.equal(mine, alone)
        elif site.component is Component.ROUTER:
            topk = torch.cat([p["topk"] for p in parts])
            assert topk.shape == (r.num_tokens, lm.layer_infos()[1].top_k)
        else:
            assert bool((tokens[1:] > tokens[:-1]).all()), site
