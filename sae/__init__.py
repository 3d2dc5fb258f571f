"""SAE features for experts and circuit nodes, with SAELens (installed as ``workbench.sae``).

* :func:`load_sae` reads any SAELens SAE saved in its own format (``cfg.json`` +
  ``sae_weights.safetensors``); :func:`resolve_site` finds and checks its site in a loaded model;
  :func:`attach` splices it in (``with attach(lm, sae): ...``).
* :func:`train_sae` trains a small SAE with SAELens' ``SAETrainer`` on activations streamed from
  the built-in prompts (``workbench sae train``).
* :func:`expert_features` / :func:`node_features`: the SAE features an expert (or a circuit node)
  raises most, with top activating tokens (``workbench sae features``).
* Steering: the ``sae_steer`` intervention kind (:mod:`workbench.sae.steer`).

Names are imported lazily, so ``import workbench.sae`` does not import sae_lens.
"""

from __future__ import annotations

_EXPORTS = {
    "load_sae": "workbench.sae.loading",
    "resolve_site": "workbench.sae.loading",
    "check_fit": "workbench.sae.loading",
    "hook_name": "workbench.sae.loading",
    "attach": "workbench.sae.edit",
    "Spliced": "workbench.sae.edit",
    "train_sae": "workbench.sae.train",
    "TrainOptions": "workbench.sae.train",
    "evaluate": "workbench.sae.train",
    "expert_features": "workbench.sae.features",
    "node_features": "workbench.sae.features",
    "annotate_circuit": "workbench.sae.features",
    "decoder_direction": "workbench.sae.steer",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'workbench.sae' has no attribute {name!r}")
