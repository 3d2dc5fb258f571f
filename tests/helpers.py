"""Constants and small helpers shared by the tests."""

from pathlib import Path

import torch

# Every architecture family in the zoo, both expert layouts.
ZOO_SPECS = ["zoo:qwen2-moe", "zoo:qwen3-moe", "zoo:olmoe", "zoo:mixtral", "zoo:deepseek-v3",
             "zoo:qwen3-moe-modulelist"]

SHORT_CONTEXT = 32  # positions of the conftest's short_gpt2

PROMPTS = ["The capital of France is Paris.", "def add(a, b): return a + b", "Seven plus five equals twelve.",
           "Hello"]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (no tie correction)."""
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


# --- Comparing results whose computation legitimately differs -------------------------------------
# Bit-identity is asserted only where the very same kernels run on the very same buffers and shapes
# (the hooked vs the unhooked forward of one model object; leaving an intervention context). Anywhere
# else -- weights reloaded into other buffers (safetensors' mmap leaves them 8- rather than 64-byte
# aligned, and MKL picks another GEMM path), padding or another batch shape, thread count, layer
# streaming, another expert layout, another CPU -- results are compared with these tolerances. fp32:
# a sum of K products accumulated in another order differs by a few ulp * sqrt(K); seen: 1.8e-7 on
# logits of magnitude ~1 (K <= 1536 here), so 1e-5 relative leaves ~50x room and still catches any
# real change (a dropped term or a wrong token moves values by >= 1e-3 relative). bf16/fp16: one
# rounding step of the storage dtype (2^-8 / 2^-11 relative) on each side.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-5, atol=1e-6),  # float64 statistics accumulated from fp32 activations
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, msg=None):
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default: the tensors' own)."""
    tol = TOLERANCES[dtype or expected.dtype] if (dtype or expected.dtype).is_floating_point else dict(rtol=0, atol=0)
    torch.testing.assert_close(actual, expected, **tol, msg=msg, equal_nan=True)


def assert_argmax_tie_aware(values: torch.Tensor, picked: torch.Tensor, dim: int = 0,
                            dtype: torch.dtype = torch.float32, msg: str = ""):
    """``picked`` (an argmax along ``dim``) names a maximum of ``values`` within ``dtype``'s tolerance.

    Two computations that differ by rounding may break a near-tie differently; both picks are right
    when the value at each equals the maximum within the tolerance. ``values`` may hold ``-inf`` for
    entries that were not candidates (a token not routed to the expert).
    """
    best = values.amax(dim)
    at = values.gather(dim, picked.long().unsqueeze(dim)).squeeze(dim)
    tol = TOLERANCES[dtype]
    slack = tol["atol"] + tol["rtol"] * best.abs()
    bad = ~(at >= best - slack)
    assert not bad.any(), f"{msg}: picks {picked[bad].tolist()} hold {at[bad].tolist()}, max {best[bad].tolist()}"


# Keys of a profile/trace JSON entry that name *where* a maximum was found, and the key of its value.
PICK_KEYS = {"prompt_index", "position", "token", "channel", "token_id"}
VALUE_KEYS = ("max_abs", "value", "absmax")


def assert_json_close(a, b, rtol: float = 1e-5, atol: float = 1e-6, path: str = "$"):
    """Two JSON results (``profile.json``, ``trace.json``) agree to fp32 tolerance, tie-aware.

    Strings, ints and structure must be equal; floats close (NaN equals NaN). In an entry that reports a
    maximum (it has a ``max_abs``/``value`` and where it was found), the location may differ only when
    the two values agree within the tolerance: that is a near-tie broken the other way by rounding, and
    which of the tied tokens is named is then not determined by the math. This cannot tell a tie from a
    wrong location of an equal value; the reducers' own tests check locations against brute force.
    """
    import math

    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a.keys() ^ b.keys())} differ"
        vkey = next((k for k in VALUE_KEYS if k in a), None)
        for k in a:
            if vkey and k in PICK_KEYS and a[k] != b[k]:
                assert isinstance(a[vkey], float) and math.isclose(a[vkey], b[vkey], rel_tol=rtol, abs_tol=atol), \
                    f"{path}.{k}: {a[k]!r} vs {b[k]!r} at unequal {vkey} {a[vkey]} vs {b[vkey]}"
                continue
            assert_json_close(a[k], b[k], rtol, atol, f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{path}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_json_close(x, y, rtol, atol, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), f"{path}: {a!r} vs {b!r}"
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=atol), \
            f"{path}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def routing_ties(lm, prompts, rel: float = 1e-5, draws: int = 8) -> list[tuple[int, int, list[int]]]:
    """Where ``prompts`` sit on a routing near-tie: (prompt, layer, tokens).

    Counts, loads, change rates and which rows reach an expert are integers, but they come from a top-k: a
    token whose k-th and (k+1)-th scores lie within rounding of each other can go either way. Each prompt runs
    alone; every MoE router's logits are moved by uniform noise of ``rel`` x their row's largest magnitude,
    ``draws`` times, and the family's own rule (``adapter.select_experts``) must choose the same experts, in the
    same order, each time; the tokens where it does not are returned.
    """
    ad, model = lm.adapter, lm.model
    layers = ad.decoder_layers(model)
    routers = {i.index: ad.router(layers[i.index]) for i in lm.layer_infos() if i.kind == "moe"}
    seen: dict[int, torch.Tensor] = {}
    hooks = [r.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (out[0] if isinstance(out, tuple)
                                                                                  else out).detach()))
             for i, r in routers.items()]
    gen, found = torch.Generator().manual_seed(0), []
    try:
        for p, text in enumerate(prompts):
            ids = lm.tokenizer(text, return_tensors="pt").input_ids.to(lm.device)
            seen.clear()
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
                for i, logits in sorted(seen.items()):
                    logits = logits.reshape(-1, logits.shape[-1]).float()
                    chosen = ad.select_experts(model, logits, routers[i])[1]
                    scale = rel * logits.abs().amax(-1, keepdim=True)
                    bad = torch.zeros(logits.shape[0], dtype=torch.bool)
                    for _ in range(draws):
                        noise = (torch.rand(logits.shape, generator=gen) * 2 - 1).to(logits.device) * scale
                        bad |= (ad.select_experts(model, logits + noise, routers[i])[1] != chosen).any(-1).cpu()
                    if bad.any():
                        found.append((p, i, bad.nonzero().flatten().tolist()))
    finally:
        for h in hooks:
            h.remove()
    return found


def assert_clear_routing(lm, prompts, rel: float = 1e-5, what: str = "") -> None:
    """No token of ``prompts`` sits on a routing near-tie (:func:`routing_ties`; ``rel`` 1e-5 is about 100x float32
    rounding), so routing compared exactly between two float32 computations that differ by rounding (another
    batch shape, buffer, expert kernel or CPU) cannot differ. A test that calls this first holds on every machine,
    or fails here on every machine alike when its prompts hold a tie."""
    ties = routing_ties(lm, prompts, rel)
    assert not ties, (f"{what}: routing near-ties (prompt, layer, tokens) {ties[:3]}: rounding could route them "
                      "either way; pick other prompts")


def assert_reducers_close(a, b, dtype: torch.dtype = torch.float32, msg: str = ""):
    """Two reducers of one kind fed by computations that differ by rounding agree, field by field.

    Float fields to ``dtype``'s tolerance; ``token`` (an absmax's argmax) may differ only where the two
    maxima agree within it (a near-tie); a histogram's ``counts`` may move between neighbouring bins by
    the few values that rounding carries across an edge: the totals are equal and the cumulative counts
    differ by at most 1e-4 of them (a value with 1e-7 relative error crosses a log-spaced edge of width
    >= 0.5 % with probability ~2e-5), never less than 2. Every other integer field is equal.
    """
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), msg
    for k, va in sa.items():
        vb, where = sb[k], f"{msg} {type(a).__name__}.{k}"
        if k == "token" and "absmax" in sa:
            differ = va != vb
            assert_close(sa["absmax"][differ], sb["absmax"][differ], dtype, msg=where)
        elif k == "counts" and va.dim() == 1 and not va.is_floating_point():
            assert int(va.sum()) == int(vb.sum()), where
            slack = max(2, int(1e-4 * int(va.sum())))
            assert int((va.cumsum(0) - vb.cumsum(0)).abs().max()) <= slack, where
        elif va.is_floating_point():
            assert_close(va, vb, dtype, msg=where)
        else:
            assert torch.equal(va, vb), where


# --- Circuits ----------------------------------------------------------------------------------------
def eap_is_the_derivative_of_edge_patching(lm, g, facts) -> None:
    """With the corrupted senders moved only eps of the way, patching one edge changes the metric by
    eps x its EAP score (first order), for every edge of the graph."""
    from workbench.circuits.attribution import attribute, last_logits, metric_values
    from workbench.circuits.facts import batches, prepare
    from workbench.circuits.runner import GraphRunner, Patch

    prepared = prepare(lm.tokenizer, facts)
    scores = attribute(lm, prepared, method="eap", batch_size=8, graph=g).matrix
    (b,) = batches(prepared, 8)
    S, P, d = g.n_senders, len(g.stages), g.d_model
    B, T = b.ids.shape
    eps = 1e-2
    valid = g.valid()
    s, r = valid.nonzero(as_tuple=True)
    with GraphRunner(lm.model, lm.adapter, g) as runner:
        clean, corr = torch.zeros(S, B, T, d), torch.zeros(S, B, T, d)
        clean_resid, corr_resid = torch.zeros(P, B, T, d), torch.zeros(P, B, T, d)
        base = metric_values("logit_diff", last_logits(lm, runner.forward(b.ids, acts=clean, resid=clean_resid),
                                                       b.last), b)
        runner.forward(b.corrupted_ids, acts=corr, resid=corr_resid)
        # the senders moved eps of the way; a stage left with no circuit edge reads the matching residual
        near, near_resid = clean + eps * (corr - clean), clean_resid + eps * (corr_resid - clean_resid)
        cur = torch.zeros_like(clean)
        fd = []
        for i, j in zip(s.tolist(), r.tolist()):
            m = valid.clone()
            m[i, j] = False
            h = runner.forward(b.ids, mode="patch", acts=cur, patch=Patch(m, near, near_resid))
            fd.append(float((metric_values("logit_diff", last_logits(lm, h, b.last), b) - base).sum()))
    fd = torch.tensor(fd) / (eps * len(prepared))
    est = scores[s, r].detach()
    # float32 rounding of the metric, divided by eps: below this a finite difference is noise
    floor = 16 * torch.finfo(torch.float32).eps * float(base.abs().sum()) / (eps * len(prepared))
    big = est.abs() > max(1e-3 * float(est.abs().max()), 10 * floor)
    assert int(big.sum()) >= 20
    torch.testing.assert_close(fd[big].float(), est[big], rtol=0.05, atol=2e-3 * float(est.abs().max()) + floor)
    assert spearman(fd[big], est[big].double()) > 0.99


def one_error(code: int, err: str, *needles: str) -> str:
    """The CLI failed with exactly one ``error:`` line holding every needle, and no traceback; that line."""
    assert code != 0, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# --- The app, driven headless with Streamlit's AppTest ------------------------------------------------
APP = str(Path(__file__).resolve().parents[1] / "ui" / "app.py")
UI_MODEL = "zoo:qwen3-moe"  # hidden size 64, 4 layers x 8 experts: what the AppTest modules start the app on


def ui_app(page: str):
    """The app (on UI_MODEL: the ``ui_model_argv`` fixture) opened on ``page``, with no error."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert at.sidebar.selectbox(key="model_choice").value == UI_MODEL
    at.sidebar.radio(key="page").set_value(page).run()
    ui_ok(at)
    return at


def ui_ok(at) -> None:
    """No exception and no error line on the page."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def ui_edit(at, layer: int, rows: dict) -> None:
    """Edit the Steer page's expert table of ``layer`` as a user would ({row: {column: value}}), then rerun."""
    key = f"steer_editor_{layer}_{at.session_state['steer_version']}"
    at.session_state[key] = {"edited_rows": rows, "added_rows": [], "deleted_rows": []}
    at.run()


def ui_one_error(at, *needles: str) -> str:
    """Exactly one error line on the page, a user's error (``error: ...``, not "internal error (...)") holding every
    needle, and no exception; that line."""
    assert not at.exception, [e.value for e in at.exception]
    lines = [e.value for e in at.error]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "\n" not in lines[0], lines
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def ui_discover(n_facts: int, top: int, method: str = "eap"):
    """The Circuits page after a discovery run on the first ``n_facts`` built-in facts, ``top`` edges, no error."""
    at = ui_app("Circuits")
    at.number_input(key="circuit_n_facts").set_value(n_facts)
    at.selectbox(key="circuit_method").set_value(method)
    at.number_input(key="circuit_top").set_value(top)
    at.button(key="circuit_run").click().run()
    ui_ok(at)
    return at
