"""The real pretrained model: what it says, and that nnsight / TransformerLens see the same numbers."""

import pytest
import torch


def test_greedy_completion_is_paris(smollm2):
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = smollm2.model.generate(ids, max_new_tokens=3, do_sample=False)
    text = smollm2.tokenizer.decode(out[0, ids.shape[1]:])
    assert text.startswith(" Paris"), text
    probs = torch.softmax(smollm2.model(ids).logits[0, -1], -1)
    paris = smollm2.tokenizer(" Paris").input_ids[0]
    assert 0.6 < probs[paris].item() < 0.9  # 0.77 measured (llama.cpp on the same GGUF: 0.768)


def test_second_load_uses_the_cache(smollm2):
    import time

    from workbench.models.specs import load

    t = time.perf_counter()
    again = load("smollm2-135m")
    assert time.perf_counter() - t < 20  # the GGUF conversion (~30 s) happens once
    for (k, a), (_, b) in zip(smollm2.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_nnsight_sees_the_same_logits(smollm2):
    lm = smollm2.to_nnsight()
    prompt = "The Eiffel Tower is in"
    ids = smollm2.tokenizer(prompt, return_tensors="pt").input_ids
    with lm.trace(prompt):
        down = lm.model.layers[3].mlp.down_proj.output.save()
        logits = lm.lm_head.output.save()
    assert torch.equal(logits, smollm2.model(ids).logits)
    assert down.shape == (1, ids.shape[1], 576)


def test_nnsight_on_a_zoo_moe():
    from workbench.models.specs import load

    moe = load("zoo:mixtral")
    lm = moe.to_nnsight()
    with lm.trace("Hello world"):
        router = lm.model.layers[1].mlp.gate.output[0].save()
    assert router.shape == (2, 8)


def test_transformer_lens_bridge_sees_the_same_logits(smollm2):
    """The bridge gives the model's logits (another module tree over copied weights: to float tolerance), and
    leaves the loaded model as it was: the same forward bit for bit, no hook left on it."""
    prompt = "Leonardo da"
    ids = smollm2.tokenizer(prompt, return_tensors="pt").input_ids
    before = smollm2.model(ids).logits
    bridge = smollm2.to_transformer_lens()
    tl_logits = bridge(prompt, prepend_bos=False)
    # other buffers (MKL may take another GEMM path) through 30 layers: seen 3.3e-5 on logits of magnitude ~20,
    # ~1e-6 of their scale; 1e-4 absolute leaves 3x room and still catches any real change (>= 1e-3 relative)
    torch.testing.assert_close(tl_logits, before, rtol=1e-5, atol=1e-4)
    assert torch.equal(smollm2.model(ids).logits, before)  # the same kernels on the same buffers
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in smollm2.model.modules())
