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


def test_cached_scoring_equals_full_sequences(zoo_tokenizer):
    from workbench.adapters.base import adapter_for
    from workbench.models.families import tiny_model
    from workbench.models.specs import LoadedModel

    model = tiny_model("llama")
    lm = LoadedModel(model, zoo_tokenizer, adapter_for(model), "tiny")
    items = T.label_copy_items(6) + T.passkey_items(2, lengths=(60,))
    got = T.choice_scores(lm, items)
    want = []
    with torch.no_grad():
        for c in items:
            p = zoo_tokenizer(c.prompt).input_ids
            sums = []
            for opt in c.options:
                o = zoo_tokenizer(opt, add_special_tokens=False).input_ids
                lp = torch.log_softmax(model(input_ids=torch.tensor([p + o])).logits[0].float(), -1)
                sums.append(float(sum(lp[len(p) + i - 1, t] for i, t in enumerate(o))))
            top = max(sums)
            assert sorted(sums)[-2] < top - 1e-4  # no near-tie: the comparison below is meaningful
            want.append(1.0 if sums.index(top) == c.answer else 0.0)
    assert got == want


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
