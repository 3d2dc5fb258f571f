import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def smollm2():
    from workbench.models.specs import load

    return load("smollm2-135m")


@pytest.fixture(scope="session")
def zoo_tokenizer():
    from workbench.models.gguf import tokenizer_dir
    from workbench.models.specs import _tokenizer

    return _tokenizer(tokenizer_dir())

