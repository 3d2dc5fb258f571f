"""Built-in context and recall tasks (workbench/tasks.py): items are fixed by their seed and well formed,
scoring through the prompt's KV cache equals scoring each full sequence, and studies take them as metrics."""

from __future__ import annotations

import pytest
import torch

from workbench import tasks as T

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("task", T.TASKS)
def test_items_are_fixed_by_the_seed_and_well_formed(task, zoo_tokenizer):
    a, b, c = T.items(task), T.items(task), T.items(task, seed=1)
    assert a == b and a != c and len(a) >= 12
    for item in a:
        assert len(set(item.options)) == len(item.options) >= 3 and 0 <= item.answer < len(item.options)
    if task == "passkey":
        lengths = [len(zoo_tokenizer(x.prompt).input_ids) for x in a]
        assert min(lengths) >= 200 and max(lengths) <= 1300
        for x in a:
            assert x.options[x.answer].strip() in x.prompt and all(o.strip() not in x.prompt for i, o in enumerate(x.options)
                                                                   if i != x.answer)
    if task in ("override", "label_copy"):  # the right answer is in the context
        assert all(x.options[x.answer].strip() in x.prompt for x in a)
    if task == "override":  # and the true one is among the wrong options
        assert all(any(o.strip() not in x.prompt for o in x.options) for x in a)


def _alone(lm, items) -> list[list[float]]:
    """Each option's summed log-probability from one unpadded forward of its prompt and option (no cache)."""
    tok, out = lm.tokenizer, []
    with torch.no_grad():
        for c in items:
            p = tok(c.prompt).input_ids
            sums = []
            for opt in c.options:
                o = tok(opt, add_special_tokens=False).input_ids
                lp = torch.log_softmax(lm.model(input_ids=torch.tensor([p + o])).logits[0].float(), -1)
                sums.append(float(sum(lp[len(p) + i - 1, t] for i, t in enumerate(o))))
            out.append(sums)
    return out


def _mixed_items():
    """Prompts of many lengths in one batch (padding between a prompt and its options) and options of one to
    several tokens."""
    return (T.label_copy_items(5) + T.passkey_items(3, lengths=(40, 90, 150)) + T.recall_items(4)
            + [T.Choice("The capital of France is", (" Paris", " the city of Paris", " Lyon, or so they say"), 0, "")])


def test_cached_scoring_equals_full_sequences(zoo_tokenizer):
    lm = _tiny("llama", zoo_tokenizer)
    items = T.label_copy_items(6) + T.passkey_items(2, lengths=(60,))
    want = []
    for c, sums in zip(items, _alone(lm, items)):
        top = max(sums)
        assert sorted(sums)[-2] < top - 3e-4  # no near-tie: each sum may move by 1e-4 (below), a gap by 2e-4
        want.append(1.0 if sums.index(top) == c.answer else 0.0)
    assert T.choice_scores(lm, items) == want


# Plain key/value caches (batched), sliding-window layers (gpt_oss), a model's own cache class with linear attention
# (minimax), Mamba-2 states (granitemoehybrid) and Mamba states (jamba): the last four one prompt at a time.
CACHES = ["llama", "zoo:deepseek-v3", "zoo:qwen2-moe", "gpt_oss", "minimax", "granitemoehybrid", "jamba"]


@pytest.mark.parametrize("spec", CACHES)
def test_batched_option_logprobs_equal_each_option_alone(spec, zoo_tokenizer):
    """Batched prompts (right-padded) and every option continuing its own prompt's cache rows, at the positions
    it has without the padding: the sums equal one unpadded forward per option, to float32 matmul error (the
    batch changes the matmuls' blocking: 1e-4 on sums of a few log-probabilities of order 10). Caches whose rows
    cannot be picked run one prompt at a time, each option from a copy of the cache; Jamba's Mamba state is then
    stepped token by token against the full sequence's scan (another order of float sums: 1e-3)."""
    lm = _tiny(spec, zoo_tokenizer)
    items = _mixed_items()
    want = _alone(lm, items)
    for bs in (1, 3, 8):
        got = T.option_logprobs(lm, items, batch_size=bs)
        assert [len(g) for g in got] == [len(c.options) for c in items]
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=1e-3 if spec == "jamba" else 1e-4)


def _tiny(spec, zoo_tokenizer):
    from workbench.adapters.base import adapter_for
    from workbench.models.families import tiny_model
    from workbench.models.specs import LoadedModel, load

    if spec.startswith("zoo:"):
        return load(spec)
    model = tiny_model(spec)
    return LoadedModel(model, zoo_tokenizer, adapter_for(model), "tiny")


@pytest.mark.parametrize("iv", [
    dict(op="zero_channel", layers=0, channel=5, positions=[1, -1]),  # options' tokens counted after their prompt's
    dict(op="scale_channel", layers=1, channel=3, factor=5.0, positions=[-2]),
    dict(op="mean_qk", layers=0, top=2),  # the prompt's forward only, each prompt's own tokens
])
def test_batched_scoring_sees_interventions_as_each_prompt_alone(iv, zoo_tokenizer):
    """Scoped interventions count a token's position among its own sequence's real tokens, so padding between a
    batched prompt and its options changes nothing: batches of 8 equal batches of 1 (no padding at all)."""
    from workbench.interventions import apply

    lm = _tiny("llama", zoo_tokenizer)
    items = _mixed_items()
    with apply(lm, [iv]):
        alone = T.option_logprobs(lm, items, batch_size=1)
        batched = T.option_logprobs(lm, items, batch_size=8)
    plain = T.option_logprobs(lm, items, batch_size=1)
    assert any(abs(a - p) > 1e-3 for x, y in zip(alone, plain) for a, p in zip(x, y))  # the intervention bites
    for a, b in zip(alone, batched):
        assert b == pytest.approx(a, abs=1e-4)


def test_options_are_scored_in_the_tokens_they_have_after_the_prompt(marker_tokenizer, zoo_tokenizer):
    """With a tokenizer that prepends a word marker (Llama-2's, Mistral's), an option tokenised on its own starts
    with a lone marker that never follows a prompt. The scorer takes the option's tokens from ``prompt + option``:
    its sums equal one forward over that whole sequence. With the byte-level BPE of the built-in models, the
    tokens in context are those of the option alone."""
    from workbench.tracing.runner import continuation_ids

    tok = marker_tokenizer
    items = T.recall_items(6) + T.label_copy_items(4) + T.passkey_items(2, lengths=(40,))
    alone = [tok(o, add_special_tokens=False).input_ids for c in items for o in c.options]
    assert all(tok.convert_ids_to_tokens(ids[:1]) == ["▁"] for ids in alone)  # the pitfall is there
    lm = _tiny("llama", tok)
    want = []
    with torch.no_grad():
        for c in items:
            p, sums = tok(c.prompt).input_ids, []
            for opt in c.options:
                whole = tok(c.prompt + opt).input_ids
                assert whole[:len(p)] == p and tok.convert_ids_to_tokens(whole[len(p)])[0] == "▁" != \
                    tok.convert_ids_to_tokens(whole[len(p)])
                lp = torch.log_softmax(lm.model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
                sums.append(float(sum(lp[i - 1, whole[i]] for i in range(len(p), len(whole)))))
            want.append(sums)
    for bs in (1, 8):
        for g, w in zip(T.option_logprobs(lm, items, batch_size=bs), want):
            assert g == pytest.approx(w, abs=1e-4)
    for c in items:  # the built-in models' tokenizer: in context as alone
        assert continuation_ids(zoo_tokenizer, c.prompt, c.options) == \
            [zoo_tokenizer(o, add_special_tokens=False).input_ids for o in c.options]


def test_choice_items_that_tokenize_to_nothing_are_rejected(zoo_tokenizer):
    from workbench.errors import WorkbenchError

    lm = _tiny("llama", zoo_tokenizer)
    with pytest.raises(WorkbenchError, match="option '' tokenizes to nothing"):
        T.choice_scores(lm, [T.Choice("The capital of France is", (" Paris", ""), 0, "")])
    with pytest.raises(WorkbenchError, match="no options"):
        T.choice_scores(lm, [T.Choice("The capital of France is", (), 0, "")])
    with pytest.raises(WorkbenchError, match="batch size"):
        T.choice_scores(lm, [T.Choice("x", (" y",), 0, "")], batch_size=0)


def test_study_reports_task_metrics(tmp_path, zoo_tokenizer):
    from workbench.models.specs import load
    from workbench.studies import Study

    lm = load("zoo:qwen3-moe")
    study = Study({"name": "tasks", "metrics": ["label_copy", "recall"], "num_texts": 2,
                   "conditions": [{"name": "head", "interventions": [{"op": "zero_head", "layers": 0, "head": 1}]}]})
    df = study.run(lm, out_dir=tmp_path, progress=False)
    got = df.set_index(["condition", "metric"])
    for cond in ("baseline", "head"):
        for m in ("label_copy", "recall"):
            row = got.loc[(cond, m)]
            assert 0 <= row["mean"] <= 1 and row["n"] == 24
