"""Constants shared by the tests."""

# Every architecture family in the zoo, both expert layouts.
ZOO_SPECS = ["zoo:qwen2-moe", "zoo:qwen3-moe", "zoo:olmoe", "zoo:mixtral", "zoo:deepseek-v3",
             "zoo:qwen3-moe-modulelist"]

PROMPTS = ["The capital of France is Paris.", "def add(a, b): return a + b", "Seven plus five equals twelve.",
           "Hello"]
