"""The compiled CPU loops (workbench.kernels.cpu) give the reducers exactly the state their torch path gives.

Each case streams random payloads (ties across rows and channels, NaN, +-inf, values spanning many octaves, float32,
float64 and bfloat16) into a reducer twice, once through the loops (``WORKBENCH_KERNELS`` unset: the CPU default)
and once through the torch reference (``WORKBENCH_KERNELS=torch``), and compares every state tensor exactly. The
reducers are also checked against brute force through the loops, in tests/test_reducers_profile.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.kernels import cpu
from workbench.tracing.reducers import ExpertAbsMax, Log2Histogram, Payload, RouterStats, TopK

pytestmark = pytest.mark.usefixtures("one_thread")


def payloads(seed: int, dtype: torch.dtype, experts: int = 0):
    """3-5 payloads of random rows; tokens increase within each (as the capture hands them) or are shuffled, and
    sometimes one repeats."""
    g = np.random.default_rng(seed)
    channels = int(g.integers(1, 40))
    token = 0
    out = []
    for _ in range(int(g.integers(3, 6))):
        n = int(g.integers(0, 60))
        x = g.standard_normal((n, channels)) * 10.0 ** g.integers(-3, 4, size=(n, 1))
        if n and g.random() < 0.5:  # a few values repeated: ties across rows and channels
            pool = g.choice(x.reshape(-1), size=3)
            mask = g.random(x.shape) < 0.3
            x[mask] = g.choice(pool, size=int(mask.sum())) * g.choice([-1, 1], size=int(mask.sum()))
        for special in (np.nan, np.inf, -np.inf):
            if n and g.random() < 0.3:
                x.reshape(-1)[g.integers(0, x.size, size=int(g.integers(1, 4)))] = special
        tokens = np.arange(token, token + n) * int(g.integers(1, 4))
        token += 4 * n + 1
        if g.random() < 0.3:
            g.shuffle(tokens)
        twice = n > 2 and g.random() < 0.3  # a token's second row (a router naming an expert twice), its peak tied
        if twice:
            x[0] *= 1e6
            tokens[n // 2] = tokens[0]
            x[n // 2] = np.roll(x[0], int(g.integers(0, channels)))
        values = torch.tensor(x, dtype=torch.float64).to(dtype)
        ids = torch.from_numpy(np.sort(g.integers(0, experts, size=n))) if experts else None
        if ids is not None and g.random() < 0.3:
            ids = ids[torch.from_numpy(g.permutation(n))]
        if ids is not None and twice:
            ids[n // 2] = ids[0]
        out.append(Payload(values, torch.from_numpy(tokens).to(torch.int64), experts=ids))
    return out


def both_paths(make, stream, monkeypatch):
    """The reducer's state after ``stream`` through the loops and through the torch path."""
    states = []
    for backend in ("auto", "torch"):
        monkeypatch.setenv("WORKBENCH_KERNELS", backend)
        r = make()
        for p in stream:
            r.update(Payload(p.values, p.tokens, experts=p.experts))
        states.append(r.state_dict())
    return states


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].nan_to_num(), b[k].nan_to_num()), (k, a[k], b[k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("seed", range(40))
def test_expert_peaks_loop_equals_the_torch_path(seed, dtype, monkeypatch):
    e = 1 + seed % 6
    stream = payloads(seed, dtype, experts=e)
    assert_equal_states(*both_paths(lambda: ExpertAbsMax(num_experts=e, channel_tokens=False), stream, monkeypatch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("seed", range(40))
def test_log2_histogram_loop_equals_the_torch_path(seed, dtype, monkeypatch):
    assert_equal_states(*both_paths(Log2Histogram, payloads(seed, dtype), monkeypatch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("seed", range(40))
def test_topk_loop_equals_the_torch_path(seed, dtype, monkeypatch):
    k = 1 + seed % 7
    assert_equal_states(*both_paths(lambda: TopK(k=k), payloads(seed, dtype), monkeypatch))


def test_the_loops_run_by_default_on_the_cpu_and_not_when_torch_is_asked(monkeypatch):
    """Proves the tests above compare two paths: the loops run under the default, the torch path under torch."""
    calls = []
    for name in ("expert_peaks", "log2_codes", "at_least"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    x = torch.tensor([[1.0, -5.0], [2.0, 0.5]])
    for backend, want in (("auto", ["expert_peaks", "log2_codes", "at_least"]), ("torch", [])):
        monkeypatch.setenv("WORKBENCH_KERNELS", backend)
        calls.clear()
        ExpertAbsMax(num_experts=2, channel_tokens=False).update(Payload(x, torch.tensor([0, 1]),
                                                                         experts=torch.tensor([0, 1])))
        Log2Histogram().update(Payload(x, torch.tensor([0, 1])))
        t = TopK(k=1)
        t.update(Payload(x, torch.tensor([0, 1])))
        t.update(Payload(x * 2, torch.tensor([2, 3])))  # full: the threshold scan
        assert calls == want, backend


def test_the_threshold_scan_finds_more_entries_than_its_first_room():
    x = np.full((30, 20), 3.0, dtype=np.float32)
    x[4, 7] = np.nan
    rows, cols, nan = cpu.at_least(x, 3.0, room=8)
    assert len(rows) == 599 and nan == 1 and (rows[:3].tolist(), cols[:3].tolist()) == ([0, 0, 0], [0, 1, 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("seed", range(30))
def test_router_stats_loop_equals_the_torch_path(seed, dtype, monkeypatch):
    """Counts and co-activation exactly; the float64 sums to 1e-12 (the loop sums row by row, torch pairwise, and
    the loop's softmax entropy takes one log per row). Rows with a masked expert (-inf), rows left out (NaN, +inf),
    sigmoid scoring, more than 64 experts, k = E (no margin) and a row naming an expert twice."""
    g = np.random.default_rng(seed)
    e = int(g.choice([1, 3, 8, 60, 65, 96]))
    k = int(g.integers(1, e + 1))
    scoring = "sigmoid" if seed % 4 == 3 else "softmax"
    stream = []
    for part in range(int(g.integers(1, 4))):
        n = int(g.integers(0, 50))
        z = g.standard_normal((n, e)) * float(g.choice([0.1, 3.0, 30.0]))
        for special in (-np.inf, np.nan, np.inf):
            if n and g.random() < 0.4:
                z[g.integers(0, n), g.integers(0, e)] = special
        chosen = np.argsort(-np.nan_to_num(z, nan=0.0), axis=1, kind="stable")[:, :k]
        if n and k > 1 and g.random() < 0.3:
            chosen[0, 1] = chosen[0, 0]
        stream.append(Payload(torch.tensor(z).to(dtype), torch.arange(n) + 100 * part, torch.from_numpy(chosen)))
    results = []
    for backend in ("auto", "torch"):
        monkeypatch.setenv("WORKBENCH_KERNELS", backend)
        r = RouterStats(num_experts=e, scoring=scoring)
        for p in stream:
            r.update(p)
        results.append((r.state_dict(), r.result()))
    (loop, loop_result), (ref, ref_result) = results
    for name in ("counts", "coactivation", "tokens", "nonfinite"):
        assert torch.equal(loop[name], ref[name]), name
    for name in ("prob_sum", "entropy_sum", "margin_sum"):
        torch.testing.assert_close(loop[name], ref[name], rtol=1e-12, atol=1e-12, equal_nan=True, msg=name)
    assert loop_result.keys() == ref_result.keys()
