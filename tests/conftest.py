import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def run(capsys):
    """``run(*argv)`` -> (exit status, stdout, stderr) of the CLI in this process (arguments str()-ed)."""
    from workbench.cli import main

    def go(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return go


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests (restored after).

    Reductions and matmuls over tiny tensors take milliseconds instead of microseconds with the
    intra-op pool on a busy 2-core machine; modules doing thousands of them opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """zoo:qwen2-moe saved with save_pretrained (config, safetensors, tokenizer): a local model folder."""
    from workbench.models.specs import load

    lm = load("zoo:qwen2-moe")
    d = tmp_path_factory.mktemp("ckpt") / "qwen2moe-tiny"
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def smollm2():
    from workbench.models.specs import load

    return load("smollm2-135m")


@pytest.fixture(scope="session")
def zoo_tokenizer():
    from workbench.models.gguf import tokenizer_dir
    from workbench.models.specs import _tokenizer

    return _tokenizer(tokenizer_dir())


@pytest.fixture(scope="session")
def marker_tokenizer():
    """A SentencePiece-style tokenizer as Llama-2's, Mistral's and Mixtral's ``tokenizer.json`` define it (a word
    marker prepended to the text, spaces made markers, pieces split before each marker), its vocabulary trained
    on the built-in facts and task items. " Paris" alone is ``['▁', '▁Paris']``; after a prompt it is ``'▁Paris'``,
    which decodes on its own to "Paris" (their decoder strips the leading space of a text)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from workbench import tasks
    from workbench.circuits.facts import builtin_facts

    texts = [f.prompt + f.answer for f in builtin_facts()]
    texts += [c.prompt + o for t in tasks.TASKS for c in tasks.items(t) for o in c.options]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"]))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


@pytest.fixture(scope="session")
def short_gpt2(tmp_path_factory, zoo_tokenizer):
    """A random 2-layer GPT-2 of ``helpers.SHORT_CONTEXT`` (32) positions (learned position embeddings: position 32
    does not exist), saved with the zoo's tokenizer: a model whose context a text can overrun."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from helpers import SHORT_CONTEXT

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("gpt2") / "short-gpt2"
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=SHORT_CONTEXT, vocab_size=len(zoo_tokenizer))
    GPT2LMHeadModel(cfg).save_pretrained(d)
    zoo_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def ui_model_argv(monkeypatch):
    """The app starts on the AppTest modules' model (the app's own default is zoo:tiny-moe-se); they opt in with
    ``pytestmark = pytest.mark.usefixtures("ui_model_argv")``."""
    import sys

    from helpers import UI_MODEL

    monkeypatch.setattr(sys, "argv", ["app.py", "--model", UI_MODEL])
