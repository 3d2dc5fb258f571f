"""Constants and small helpers shared by the tests."""

import torch

# Every architecture family in the zoo, both expert layouts.
ZOO_SPECS = ["zoo:qwen2-moe", "zoo:qwen3-moe", "zoo:olmoe", "zoo:mixtral", "zoo:deepseek-v3",
             "zoo:qwen3-moe-modulelist"]

PROMPTS = ["The capital of France is Paris.", "def add(a, b): return a + b", "Seven plus five equals twelve.",
           "Hello"]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (no tie correction)."""
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
