import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


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

