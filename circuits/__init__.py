"""Knowledge circuits: EAP / EAP-IG edge attribution on Hugging Face models (GQA and MoE experts native).

    from workbench.circuits import find_circuit, builtin_facts
    circuit, scores, mask = find_circuit(lm, builtin_facts())
    circuit.meta["metrics"]["faithfulness"]

Modules: ``graph`` (nodes, receivers, edges), ``runner`` (hooks: record senders, per-receiver
inputs, gradients, path patching), ``facts`` (facts files, corrupted prompts, batches),
``attribution`` (EAP, EAP-IG), ``evaluate`` (selection, pruning, faithfulness, Hit@10),
``export`` (Circuit, JSON / GraphML / DOT / parquet), ``render`` (SVG / PNG drawing), ``attention``
(the attention layouts: q/k/v projections, GPT-2's c_attn, DeepSeek's latent attention), ``discover``
(the whole pipeline), ``cli``.
The names below are imported lazily, so ``import workbench.circuits`` stays cheap.
"""

from __future__ import annotations

_EXPORTS = {
    "Scores": "attribution", "attribute": "attribution",
    "CircuitOptions": "discover", "find_circuit": "discover", "write_outputs": "discover",
    "evaluate": "evaluate", "prune": "evaluate", "select_top": "evaluate", "select_fill": "evaluate",
    "select_greedy": "evaluate", "select_random": "evaluate", "select_threshold": "evaluate",
    "Circuit": "export",
    "Fact": "facts", "builtin_facts": "facts", "parse_facts": "facts", "prepare": "facts", "read_facts": "facts",
    "Graph": "graph", "build_graph": "graph",
    "circuit_svg": "render", "write_png": "render", "write_svg": "render",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"workbench.circuits.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'workbench.circuits' has no attribute {name!r}")
