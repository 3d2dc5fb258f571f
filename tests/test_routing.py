"""Routing across checkpoints (experts/routing.py, `workbench routing`): each metric against brute force."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.experts import routing as R
from workbench.experts.router import SEGMENTS, LocalConsistency, score_order, window_counts
from workbench.models.specs import load
from workbench.tracing.reducers import Payload, RouterStats, jain

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is Paris, and the river is the Seine.", "def add(a, b):\n    return a + b",
           "Bees collect nectar from flowers in the spring.", "One, two, three, four, five, six."]


def random_sets(n: int, e: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])


def test_jain_and_overlap_by_brute_force():
    for load_ in ([1, 1, 1, 1], [4, 0, 0, 0], [3, 1, 0, 2], [0.5, 0.25, 0.25]):
        p = [float(x) for x in load_]
        assert R.jain(p) == pytest.approx(sum(p) ** 2 / (len(p) * sum(x * x for x in p)))
    assert R.jain([2, 2, 2]) == pytest.approx(1.0) and R.jain([5, 0, 0, 0, 0]) == pytest.approx(0.2)
    assert np.isnan(jain([0, 0])) and np.isnan(jain([]))
    a, b = random_sets(200, 8, 3, 0), random_sets(200, 8, 3, 1)
    want = [len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)]
    assert R.overlap(a, b).tolist() == want
    assert R.overlap(a, a).tolist() == [3] * 200


def test_score_order_puts_the_highest_score_first():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, 0.0, 4.0, 4.5]])
    p = Payload(values=logits, tokens=torch.tensor([0, 1]), topk=torch.tensor([[2, 1], [2, 0]]))
    assert score_order(p).tolist() == [[1, 2], [0, 2]]
    ordered = Payload(values=logits, tokens=torch.tensor([0, 1]), topk=torch.tensor([[1, 2], [0, 3]]))
    assert score_order(ordered).tolist() == [[1, 2], [0, 3]]  # already highest first (the router's own order)
    tied = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 3.0]])  # equal scores keep their slot order, sorted or not
    p = Payload(values=tied, tokens=torch.tensor([0, 1]), topk=torch.tensor([[1, 0], [1, 0]]))
    assert score_order(p).tolist() == [[1, 0], [1, 0]]
    p = Payload(values=tied, tokens=torch.tensor([0, 1]), topk=torch.tensor([[1, 0], [0, 2]]))
    assert score_order(p).tolist() == [[1, 0], [2, 0]]


def write_choices(folder: Path, layer: int, rows: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows.to(torch.int16).numpy().tofile(folder / f"layer{layer}.i16")


@pytest.mark.parametrize("chunk", [7, 1 << 16])
def test_compare_matches_brute_force(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(R, "CHUNK", chunk)  # 7: every chunk boundary case over 50 tokens
    n, e, k = 50, 8, 3
    ckpts = [random_sets(n, e, k, s) for s in range(4)]
    ckpts[2][:20] = ckpts[3][:20]  # part of the third agrees with the final
    folders = [tmp_path / f"c{i}" for i in range(4)]
    for f, rows in zip(folders, ckpts):
        write_choices(f, 5, rows)
    got = R.compare(folders, {5: (e, k)}, n)[5]
    final = ckpts[-1]
    for i, rows in enumerate(ckpts):
        sat = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(rows, final)) / (n * k)
        top1 = sum(int(a[0] == b[0]) for a, b in zip(rows, final)) / n
        assert got["saturation"][i] == pytest.approx(sat) and got["saturation_top1"][i] == pytest.approx(top1)
        if i:
            kept = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(rows, ckpts[i - 1])) / (n * k)
            assert got["change_rate"][i] == pytest.approx(1 - kept)
    assert got["change_rate"][0] is None and got["saturation"][-1] == 1.0


@pytest.fixture(scope="module")
def qwen3():
    return load("zoo:qwen3-moe")


def test_a_checkpoint_against_itself(qwen3):
    r = R.routing(["a", "b"], PROMPTS, load=lambda spec: qwen3)
    assert r["num_tokens"] > 40 and [l["layer"] for l in r["layers"]] == [0, 1, 2, 3]
    for layer in r["layers"]:
        assert layer["saturation"] == [1.0, 1.0] and layer["saturation_top1"] == [1.0, 1.0]
        assert layer["change_rate"] == [None, 0.0]
    # Utilization is Jain's index of the same expert load RouterStats reports for the layer.
    from workbench.tracing.runner import trace
    from workbench.tracing.sites import Component, all_sites

    sites = all_sites(qwen3.adapter, qwen3.model, [Component.ROUTER])
    stats = {s: RouterStats(num_experts=8) for s in sites}
    trace(qwen3, PROMPTS, sites, reducers=(), progress=False, sinks={s: [stats[s]] for s in sites})
    for s, layer in zip(sites, r["layers"]):
        u = stats[s].result()["utilization"]
        assert layer["utilization"] == [pytest.approx(u), pytest.approx(u)] and 1 / 8 <= u <= 1


def permuted(lm, perms: dict[int, torch.Tensor]):
    """A copy of ``lm`` whose experts are relabelled: new expert j is old expert perm[j] (same function)."""
    import copy

    other = copy.deepcopy(lm)
    for i, perm in perms.items():
        mlp = other.model.model.layers[i].mlp
        with torch.no_grad():
            mlp.gate.weight.copy_(mlp.gate.weight[perm])
            mlp.experts.gate_up_proj.copy_(mlp.experts.gate_up_proj[perm])
            mlp.experts.down_proj.copy_(mlp.experts.down_proj[perm])
    return other


def test_permuted_experts_give_the_saturation_the_permutation_implies(qwen3, tmp_path):
    g = torch.Generator().manual_seed(3)
    perms = {i: torch.randperm(8, generator=g) for i in range(4)}
    perms[2] = torch.arange(8)  # one layer left as it is
    other = permuted(qwen3, perms)
    rec = R.record(qwen3, PROMPTS, tmp_path / "orig")
    n = int(rec["token_ids"].numel())
    r = R.routing(["permuted", "original"], PROMPTS, load=lambda s: other if s == "permuted" else qwen3)
    for layer in r["layers"]:
        i = layer["layer"]
        final = R._read(tmp_path / "orig" / f"layer{i}.i16", 2, 0, n)
        inv = torch.argsort(perms[i])  # old expert o is new expert inv[o]
        implied = R.overlap(inv[final], final).sum().item() / (2 * n)
        implied1 = (inv[final[:, 0]] == final[:, 0]).float().mean().item()
        # The same function up to the order of the experts' additions (float rounding): a near-tie may flip.
        assert layer["saturation"][0] == pytest.approx(implied, abs=0.02)
        assert layer["saturation_top1"][0] == pytest.approx(implied1, abs=0.03)
        assert layer["utilization"][0] == pytest.approx(layer["utilization"][1], abs=0.02)
    assert r["layers"][2]["saturation"][0] > 0.97 and min(l["saturation"][0] for l in r["layers"]) < 0.7


def test_incompatible_checkpoints_are_refused(qwen3):
    dsv3 = load("zoo:deepseek-v3")  # layer 0 is dense
    with pytest.warns(UserWarning, match="^zoo:deepseek-v3 is a DeepseekV3ForCausalLM, zoo:qwen3-moe a "
                                         "Qwen3MoeForCausalLM: the routers compared are of two models"):
        with pytest.raises(WorkbenchError, match="same layers"):
            R.routing(["zoo:qwen3-moe", "zoo:deepseek-v3"], PROMPTS, load=lambda s: qwen3 if "qwen3" in s else dsv3)
    other = load("zoo:qwen3-moe")  # the same architecture routing top-1
    other.model.config.num_experts_per_tok = 1
    for layer in other.adapter.decoder_layers(other.model):
        other.adapter.router(layer).top_k = 1
    with pytest.raises(WorkbenchError, match=r"^layer \d+: b routes top-1 of 8 experts, a top-2 of 8: checkpoints "
                                             "of one series must have the same experts$"):
        R.routing(["a", "b"], PROMPTS, load=lambda s: qwen3 if s == "a" else other)
    with pytest.raises(WorkbenchError, match="at least two checkpoints"):
        R.routing(["zoo:qwen3-moe"], PROMPTS, load=lambda s: qwen3)


def test_checkpoints_of_another_context_length_are_named_as_such():
    """A checkpoint whose config takes 8 positions cut the prompts to 8 tokens, and the refusal blamed the tokenizer
    (byte-identical here)."""
    long_a, long_b = load("zoo:qwen3-moe"), load("zoo:qwen3-moe")
    long_b.model.config.max_position_embeddings = 8
    assert any(len(long_a.tokenizer(p)["input_ids"]) > 8 for p in PROMPTS)
    with pytest.warns(UserWarning, match="truncated"):
        with pytest.raises(WorkbenchError, match=r"^b has a context of 8 tokens, a of \d+, and prompts longer than the "
                                                 r"shorter one are cut to it"):
            R.routing(["a", "b"], PROMPTS, load=lambda s: long_a if s == "a" else long_b)


def test_routing_cli_writes_json_parquet_and_plot(tmp_path, capsys):
    import pandas as pd

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        with pytest.warns(UserWarning, match="^zoo:qwen3-moe given more than once: the same checkpoint compared"):
            assert main(["routing", "zoo:qwen3-moe", "zoo:olmoe", "zoo:qwen3-moe", "--prompts", str(prompts), "--out",
                         str(out), "--quiet"]) == 0
        assert not hf_logging.is_progress_bar_enabled()  # --quiet: no weight-loading bar per checkpoint either
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()
    r = json.loads((out / "routing.json").read_text())
    assert r["checkpoints"] == ["zoo:qwen3-moe", "zoo:olmoe", "zoo:qwen3-moe"] and len(r["layers"]) == 4
    assert (r["dtype"], r["device"]) == ("float32", "cpu")  # what it was computed in (it did not say)
    for layer in r["layers"]:
        assert set(layer) >= {"layer", "saturation", "saturation_top1", "change_rate", "utilization"}
        assert len(layer["saturation"]) == 3 and layer["saturation"][0] == layer["saturation"][2] == 1.0
        assert layer["change_rate"][0] is None and layer["change_rate"][1] == pytest.approx(1 - layer["saturation"][1])
    df = pd.read_parquet(out / "routing.parquet")
    assert len(df) == 12 and (out / "routing.png").stat().st_size > 10_000
    assert "router saturation" in capsys.readouterr().out
    assert main(["routing", "zoo:qwen3-moe", "--out", str(tmp_path / "x")]) == 2
    assert "at least two checkpoints" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_training_runs_folder_is_its_checkpoints_in_step_order(qwen3, tmp_path, capsys):
    """A folder of checkpoints named by step (a training run's output) is that series sorted by step, as zoo:NAME@all
    is; a shell glob (step100 before step20) or one checkpoint twice is said; it said 'needs at least two
    checkpoints' for the folder and took reversed steps without a word."""
    from workbench.models.specs import check_series, expand_series

    run = tmp_path / "run"
    for name in ("step100", "step20", "checkpoint-3"):
        qwen3.model.save_pretrained(run / name)
        qwen3.tokenizer.save_pretrained(run / name)
    (run / "logs").mkdir()  # no config.json: not a checkpoint
    assert expand_series(str(run)) == [str(run / n) for n in ("checkpoint-3", "step20", "step100")]
    assert expand_series(str(run / "step20")) == [str(run / "step20")] and expand_series("zoo:olmoe") == ["zoo:olmoe"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    assert main(["routing", str(run), "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    r = json.loads((tmp_path / "o" / "routing.json").read_text())
    assert r["checkpoints"] == [str(run / n) for n in ("checkpoint-3", "step20", "step100")]
    assert all(layer["saturation"] == [1.0] * 3 for layer in r["layers"])  # the same weights three times
    assert "   3      20     100" in capsys.readouterr().out  # the table's header: the steps
    with pytest.warns(UserWarning, match=r"^the checkpoints' steps are out of training order \(100, 20\), and the "
                                         r"last \(.*step20\) is taken as the final one: give them sorted by step$"):
        check_series([str(run / "step100"), str(run / "step20")], "routing")
    with pytest.warns(UserWarning, match="given more than once"):  # the same folder, spelled two ways
        check_series([str(run / "step20"), str(run / "logs" / ".." / "step20")], "routing")
    with pytest.raises(WorkbenchError, match=r"^routing needs at least two checkpoints .*; x is one$"):
        check_series(["x"], "routing")
    qwen3.model.save_pretrained(run / "final")
    with pytest.raises(WorkbenchError, match=r"run holds checkpoints without a step in their names \(final\): give "
                                             "them one by one, in training order"):
        expand_series(str(run))


def test_step_of():
    assert [R.step_of(s) for s in ["zoo:tiny-moe@300", "runs/ckpt/step1200", "out/checkpoint-40/", "zoo:olmoe"]] == \
        [300, 1200, 40, None]


def test_training_series_is_saved_and_loads(tmp_path, monkeypatch):
    """scripts/train_zoo.py --series-dir saves step0, every N steps and the end; zoo:tiny-moe@STEP loads them."""
    series = tmp_path / "zoo-series" / "tiny-moe"
    cmd = [sys.executable, str(REPO / "scripts" / "train_zoo.py"), "--steps", "3", "--series-dir", str(series),
           "--save-every", "2", "--out", str(tmp_path / "final.safetensors"), "--no-verify", "--full-positions", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in series.glob("step*.safetensors")) == ["step0.safetensors", "step2.safetensors",
                                                                        "step3.safetensors"]
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    from workbench.models import zoo
    from workbench.models.specs import expand_series

    assert expand_series("zoo:tiny-moe@all") == ["zoo:tiny-moe@0", "zoo:tiny-moe@2", "zoo:tiny-moe@3"]
    untrained, last = zoo.build("tiny-moe@0"), zoo.build("tiny-moe@3")
    ref = zoo.init_model(zoo.ZOO["tiny-moe"])
    w = "model.layers.0.mlp.gate.weight"
    torch.testing.assert_close(untrained.state_dict()[w], ref.state_dict()[w].half().float())  # float16 on disk
    assert not torch.equal(last.state_dict()[w], untrained.state_dict()[w])
    with pytest.raises(WorkbenchError, match="no checkpoint at step 1; steps: 0, 2, 3"):
        zoo.build("tiny-moe@1")
    with pytest.raises(WorkbenchError, match="has no training series"):
        zoo.series_dir("olmoe")


# --- local routing consistency (SRP / SCH) ---------------------------------------------------------------------

def brute_srp(seqs: list[list[list[int]]], e: int, m: int) -> float:
    """Best F1 over c of 'experts serving >= c of a window's m tokens', pooled over every sliding window."""
    best = 0.0
    for c in range(m + 1):
        tp = pred = act = 0
        for seq in seqs:
            for i in range(len(seq) - m + 1):
                win = seq[i:i + m]
                chosen = {x for x in range(e) if sum(x in t for t in win) >= c}
                for t in win:
                    tp += len(chosen & set(t))
                    pred += len(chosen)
                    act += len(t)
        if pred + act:
            best = max(best, 2 * tp / (pred + act))
    return best


def brute_sch(seqs: list[list[list[int]]], e: int, m: int, cache: int) -> float:
    """Hit rate of a cache of ``cache`` experts that loads an expert only when a token asks for it and, to make room,
    evicts the cached expert used by the fewest tokens in [i, i+m) (the look-ahead at the request), then the least
    recently used. A token's requests are judged against the cache before the token; an expert the prompt has not
    used yet counts as a hit while fewer than ``cache`` distinct experts came before it (their code's convention)."""
    hits = total = 0
    for seq in seqs:
        held: list[int] = []
        last: dict[int, int] = {}
        for i, tok in enumerate(seq):
            fresh = 0
            for x in tok:
                if x in last:
                    hits += x in held
                else:
                    hits += len(last) + fresh < cache
                    fresh += 1
                total += 1
            for s, x in enumerate(tok):
                if x not in held:
                    if len(held) == cache:
                        def priority(y):  # uses ahead: token i's own use is spent once the expert has served it
                            used_now = y in tok[:s]
                            return sum(y in t for t in seq[i:i + m]) - used_now, last[y]
                        held.remove(min(held, key=priority))
                    held.append(x)
                last[x] = i * len(tok) + s
    return hits / total


def payload_of(seqs, start: int, e: int, seed: int):
    rows = [t for s in seqs for t in s]
    n = len(rows)
    topk = torch.tensor(rows)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e, generator=g)
    # Scores that put each row's experts in the listed order (the recorder sorts by score).
    for i, r in enumerate(rows):
        for s, x in enumerate(r):
            logits[i, x] = 10.0 - s
    perm = torch.randperm(n, generator=g)  # rows in any order: the reducer sorts by token index
    return Payload(values=logits[perm], tokens=torch.arange(start, start + n)[perm], topk=topk[perm])


@pytest.mark.parametrize("seed", [0, 1])
def test_local_consistency_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    e, k = 6, 2
    lens = [1, 3, 20, 70, 5, 17]
    seqs = []
    for n in lens:  # sticky routing: each token keeps the previous experts with some probability
        cur, seq = torch.randperm(e, generator=g)[:k].tolist(), []
        for _ in range(n):
            if torch.rand(1, generator=g).item() < 0.4:
                cur = torch.randperm(e, generator=g)[:k].tolist()
            seq.append(list(cur))
        seqs.append(seq)
    starts = torch.tensor([0] + list(np.cumsum(lens)[:-1]))
    whole = LocalConsistency(num_experts=e, top_k=k, starts=starts)
    whole.update(payload_of(seqs, 0, e, seed))
    parts = [LocalConsistency(num_experts=e, top_k=k, starts=starts) for _ in range(2)]
    parts[0].update(payload_of(seqs[:3], 0, e, seed))
    parts[1].update(payload_of(seqs[3:], int(starts[3]), e, seed))
    merged = parts[0].merge(parts[1])
    assert torch.equal(merged.srp_hist, whole.srp_hist) and torch.equal(merged.sch_hist, whole.sch_hist)
    r = whole.result()
    for m in SEGMENTS:
        assert r["srp"][str(m)]["f1"] == pytest.approx(brute_srp(seqs, e, m)) or (
            math.isnan(r["srp"][str(m)]["f1"]) and max(lens) < m)
        for ratio in (1, 2):
            assert r["sch"][str(m)][f"cache_{ratio}k"] == pytest.approx(brute_sch(seqs, e, m, ratio * k))


@pytest.mark.parametrize("e,k,skew", [(1, 1, False), (3, 2, True), (8, 1, True), (8, 3, False), (16, 4, True),
                                       (5, 5, False)])
def test_sch_counts_match_the_cache_simulation_at_every_size(e, k, skew):
    """The compiled stack loop against the plain cache simulation, for every cache size 1..E and look-aheads of 1,
    2 and 7 tokens, on prompts of 1-30 tokens whose routing is uniform or concentrated on a few experts."""
    rng = np.random.default_rng(e * 10 + k)
    lens = rng.integers(1, 31, 5)
    weights = rng.dirichlet(np.full(e, 0.3)) if skew else np.full(e, 1 / e)
    seqs = [[rng.choice(e, k, replace=False, p=weights).tolist() for _ in range(n)] for n in lens]
    top = np.array([t for s in seqs for t in s])
    segments = (1, 2, 7)
    hist = window_counts(top, np.cumsum(lens) - lens, lens, e, segments)[1]
    assert hist.sum() == len(segments) * top.size
    for j, m in enumerate(segments):
        for cache in range(1, e + 1):
            assert hist[j, :cache].sum() / top.size == pytest.approx(brute_sch(seqs, e, m, cache), abs=1e-12)


@pytest.mark.parametrize("e,k,repeats", [(1, 1, False), (3, 2, True), (8, 2, False), (8, 3, True), (16, 4, False)])
def test_srp_windows_match_the_windows_counted_one_by_one(e, k, repeats):
    """The compiled sliding window against each window counted afresh: (window, expert) pairs by how many of the
    window's rows chose the expert, for windows of 1, 2, 7 and 30 rows over prompts of 1-30 rows (shorter prompts
    have no window). A row that names an expert twice (a top-k sampled with replacement) counts it once."""
    rng = np.random.default_rng(e * 100 + k)
    lens = rng.integers(1, 31, 6)
    seqs = [[rng.choice(e, k, replace=repeats).tolist() for _ in range(n)] for n in lens]
    segments = (1, 2, 7, 30)
    srp = window_counts(np.array([t for s in seqs for t in s]), np.cumsum(lens) - lens, lens, e, segments)[0]
    for j, m in enumerate(segments):
        want = np.zeros(max(segments) + 1, dtype=np.int64)
        for seq in seqs:
            for i in range(len(seq) - m + 1):
                for x in range(e):
                    want[sum(x in row for row in seq[i:i + m])] += 1
        assert srp[j].tolist() == want.tolist()


def test_the_loops_compile_without_a_cache_folder(monkeypatch):
    """Where numba finds no writable cache folder (its njit(cache=True) raises), the loops are compiled uncached."""
    import numba

    from workbench.experts import router
    from workbench.kernels import cpu

    njit = numba.njit

    def no_cache(*args, **kw):
        if kw.get("cache"):
            raise RuntimeError("cannot cache function '_sch_stacks': no locator available")
        return njit(*args, **kw)

    top, first, lengths = np.array([[0, 1], [1, 2], [0, 2]]), np.array([0]), np.array([3])
    want = window_counts(top, first, lengths, 3)
    monkeypatch.setattr(numba, "njit", no_cache)
    monkeypatch.setattr(cpu, "_COMPILED", {})
    got = window_counts(top, first, lengths, 3)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert {fn for fn, _ in cpu._COMPILED} == {router._sch_stacks, router._srp_windows}


def test_local_consistency_refuses_experts_outside_its_count():
    """An expert index past ``num_experts`` (a reducer set up for another layer) is one clear error, not memory the
    compiled loop would write past."""
    lc = LocalConsistency(num_experts=4, top_k=2, starts=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"expert indices 0\.\.7 outside 0\.\.3 \(4 experts\)"):
        lc.update(payload_of([[[7, 0], [1, 2], [3, 5]]], 0, 8, 0))


def test_local_consistency_known_answers():
    e, k = 4, 1
    const = [[[2]] * 32]  # one expert for every token: any window is served by it alone
    lc = LocalConsistency(num_experts=e, top_k=k, starts=torch.tensor([0]))
    lc.update(payload_of(const, 0, e, 0))
    r = lc.result()
    assert r["srp"]["4"]["f1"] == 1.0 and r["srp"]["16"]["f1"] == 1.0 and math.isnan(r["srp"]["64"]["f1"])
    assert r["sch"]["4"]["cache_1k"] == 1.0  # the first request finds the empty cache's free slot, as in their code
    # Round robin over 4 experts: a 1-expert cache holds the expert just served, never the next one, so it hits only
    # on the first token (a free slot). (Re-sorting the used experts before each token, as this reducer did until
    # 2026-12-07, put the next expert in the cache without a request on the last token: 2 / 40.)
    cyc = [[[i % 4] for i in range(40)]]
    lc = LocalConsistency(num_experts=e, top_k=k, starts=torch.tensor([0]))
    lc.update(payload_of(cyc, 0, e, 0))
    r = lc.result()
    assert r["sch"]["4"]["cache_4k"] == 1.0 and r["sch"]["4"]["cache_1k"] == pytest.approx(1 / 40)
    # The sweep's smallest case, checked against their calc_fsf: experts 0, 1, 0 (k 1, any look-ahead). Before the third
    # token the 1-expert cache holds expert 1 (loaded for the second): a miss, though expert 0 is the one needed.
    lc = LocalConsistency(num_experts=2, top_k=1, starts=torch.tensor([0]))
    lc.update(payload_of([[[0], [1], [0]]], 0, 2, 0))
    assert lc.sch_hist[0].tolist() == [1, 2, 0]  # ranks 0 (the free slot), 1 (new) and 1 (below expert 1)
    assert r["srp"]["4"]["f1"] == pytest.approx(2 / (4 + 1))  # predicting all 4 experts: precision 1/4, recall 1


def test_profile_router_section_has_utilization_and_local_consistency(qwen3, tmp_path):
    """The profile's router reducers, checked against the same statistics computed from recorded choices."""
    import pandas as pd

    from workbench.experts.profile import ProfileOptions, profile
    from workbench.experts.report import write

    prompts = PROMPTS * 3  # token ids seen 10+ times, for the vocabulary specialization
    p = profile(qwen3, prompts, ProfileOptions(sinks=False), progress=False)
    rec = R.record(qwen3, prompts, tmp_path / "rec")
    from workbench.tracing.runner import tokenize

    tok_ids = tokenize(qwen3, prompts)
    lengths = [len(x) for x in tok_ids]
    n = sum(lengths)
    for layer in p["router"]:
        i = layer["layer"]
        choices = R._read(tmp_path / "rec" / f"layer{i}.i16", 2, 0, n).tolist()
        seqs, at = [], 0
        for length in lengths:
            seqs.append(choices[at:at + length])
            at += length
        assert layer["utilization"] == pytest.approx(jain(rec["load"][i]))
        assert layer["srp"]["4"]["f1"] == pytest.approx(brute_srp(seqs, 8, 4))
        assert layer["sch"]["4"]["cache_2k"] == pytest.approx(brute_sch(seqs, 8, 4, 4))
        top1 = [[t[0] for t in s] for s in seqs]
        v = layer["vocab_specialization"]
        assert v["input"]["specialization"] == pytest.approx(brute_vocab(tok_ids, top1, nxt=False))
        assert v["next"]["specialization"] == pytest.approx(brute_vocab(tok_ids, top1, nxt=True))
    write(p, tmp_path / "out", plots=False)
    cols = pd.read_parquet(tmp_path / "out" / "router_layers.parquet").columns
    assert {"utilization", "srp_4_f1", "sch_16_cache_2k"} <= set(cols)


def brute_vocab(seqs_ids: list[list[int]], seqs_top1: list[list[int]], nxt: bool) -> float:
    from collections import Counter, defaultdict

    by_id: dict[int, Counter] = defaultdict(Counter)
    for ids, top in zip(seqs_ids, seqs_top1):
        for i, x in enumerate(top):
            if nxt and i + 1 >= len(ids):
                continue
            by_id[ids[i + 1] if nxt else ids[i]][x] += 1
    shares = [max(c.values()) / sum(c.values()) for c in by_id.values() if sum(c.values()) >= 10]
    assert shares, "no token id seen 10 times"
    return sum(shares) / len(shares)


def test_vocab_specialization_matches_brute_force():
    from workbench.experts.router import VocabSpecialization

    g = torch.Generator().manual_seed(0)
    e, lens = 5, [30, 1, 45, 60]
    ids = [torch.randint(0, 12, (n,), generator=g).tolist() for n in lens]
    # Experts that depend on the token id most of the time (a known, strong specialization).
    top = [[(t * 3 + (torch.rand(1, generator=g).item() < 0.2)) % e for t in s] for s in ids]
    starts = torch.tensor([0] + list(np.cumsum(lens)[:-1]))
    flat_ids = torch.tensor([t for s in ids for t in s])
    rows = [[t, (t + 1) % e] for s in top for t in s]
    seqs = [rows[int(starts[i]):int(starts[i]) + n] for i, n in enumerate(lens)]
    whole = VocabSpecialization(num_experts=e, token_ids=flat_ids, starts=starts)
    whole.update(payload_of(seqs, 0, e, 1))
    parts = [VocabSpecialization(num_experts=e, token_ids=flat_ids, starts=starts) for _ in range(2)]
    parts[0].update(payload_of(seqs[:2], 0, e, 1))
    parts[1].update(payload_of(seqs[2:], int(starts[2]), e, 1))
    merged = parts[0].merge(parts[1]).result()
    r = whole.result()["vocab_specialization"]
    assert merged["vocab_specialization"] == r
    assert r["input"]["specialization"] == pytest.approx(brute_vocab(ids, top, nxt=False))
    assert r["next"]["specialization"] == pytest.approx(brute_vocab(ids, top, nxt=True))
    assert r["input"]["specialization"] > 0.75 > r["next"]["specialization"]


def test_vocab_specialization_state_does_not_depend_on_when_pending_keys_fold(monkeypatch):
    """Updates append their keys and fold them into the sorted state later; the state (what checkpoints save)
    is the same however the rows were split and whenever the folds happened, a saved state included."""
    from workbench.experts.router import VocabSpecialization

    g = torch.Generator().manual_seed(3)
    e, lens = 6, [40, 7, 55, 33, 61]
    starts = torch.tensor([0] + list(np.cumsum(lens)[:-1]))
    flat_ids = torch.randint(0, 20, (sum(lens),), generator=g)
    seqs = [[torch.randperm(e, generator=g)[:2].tolist() for _ in range(n)] for n in lens]

    def make():
        return VocabSpecialization(num_experts=e, token_ids=flat_ids, starts=starts)
    whole = make()
    whole.update(payload_of(seqs, 0, e, 2))
    want = whole.state_dict()
    monkeypatch.setattr(VocabSpecialization, "PENDING_MIN", 8)  # fold every few updates
    split = make()
    for i, seq in enumerate(seqs):
        split.update(payload_of([seq], int(starts[i]), e, 2))
        if i == 2:  # a checkpoint in the middle: saved, loaded into a fresh reducer, continued there
            split = make().load_state_dict(split.state_dict())
    got = split.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert split.result() == whole.result()


def test_domain_specialization_matches_recorded_choices(qwen3, tmp_path, capsys):
    code = ["def f(x):\n    return x * 2", "for i in range(10):\n    print(i)", "import os\nos.listdir('.')"]
    domains = {"code": code, "prose": PROMPTS}
    d = R.domain_specialization(qwen3, domains)
    assert d["domains"] == ["code", "prose"] and [l["layer"] for l in d["layers"]] == [0, 1, 2, 3]
    for name, prompts in domains.items():
        rec = R.record(qwen3, prompts, tmp_path / name)
        n = int(rec["token_ids"].numel())
        for l in d["layers"]:
            choices = R._read(tmp_path / name / f"layer{l['layer']}.i16", 2, 0, n)
            share = [float((choices == e).any(1).float().mean()) for e in range(8)]
            assert l["share"][name] == pytest.approx(share) and l["uniform"] == 2 / 8
            assert l["ratio"][name] == pytest.approx([s * 4 for s in share])
            assert sum(share) == pytest.approx(2.0)  # every token counts once for each of its k experts
    bad = tmp_path / "out"
    assert main(["profile", "zoo:qwen3-moe", "--domains", "code", "--out", str(bad)]) == 2
    assert "--domains takes NAME=FILE" in capsys.readouterr().err and not bad.exists()
    assert main(["profile", "zoo:qwen3-moe", "--domains", f"x={tmp_path / 'missing.txt'}", "--out", str(bad)]) == 2
    assert "missing.txt" in capsys.readouterr().err and not bad.exists()


def test_vocab_specialization_by_the_models_prediction(qwen3, tmp_path):
    from workbench.experts.profile import ProfileOptions, profile
    from workbench.tracing.runner import tokenize

    prompts = PROMPTS * 3
    p = profile(qwen3, prompts, ProfileOptions(sinks=False, vocab_predicted=True), progress=False)
    ids = tokenize(qwen3, prompts)
    with torch.no_grad():  # the model's own argmax, one prompt at a time (no padding)
        preds = [qwen3.model(input_ids=torch.tensor([x])).logits[0].argmax(-1).tolist() for x in ids]
    R.record(qwen3, prompts, tmp_path / "rec")
    n = sum(len(x) for x in ids)
    for layer in p["router"]:
        choices = R._read(tmp_path / "rec" / f"layer{layer['layer']}.i16", 2, 0, n)[:, 0].tolist()
        top1, at = [], 0
        for x in ids:
            top1.append(choices[at:at + len(x)])
            at += len(x)
        # Predictions from batched (padded) forwards vs one prompt at a time: the logits differ by rounding,
        # so an argmax with a near-tie may flip a token; one flipped token moves the mean by < 0.02 here.
        assert layer["vocab_specialization"]["predicted"]["specialization"] == pytest.approx(
            brute_vocab(preds, top1, nxt=False), abs=0.02)
    plain = profile(qwen3, prompts, ProfileOptions(sinks=False), progress=False)
    assert "predicted" not in plain["router"][0]["vocab_specialization"]
    assert plain["router"][0]["vocab_specialization"]["input"] == p["router"][0]["vocab_specialization"]["input"]
