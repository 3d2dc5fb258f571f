"""Scripted ablation studies: named conditions (intervention sets) x metrics -> a table with intervals.

A study file (YAML or JSON)::

    name: super-experts
    metrics: [perplexity, accuracy, sink, massive, kl, generations]   # the default; also passkey, override,
                                                                      # label_copy, recall (workbench.tasks)
    num_texts: 48            # the first N texts: built-in ones (48 by default), or of `texts: FILE` (one per line;
                             # a relative path, here and in an sae_steer's `sae:`, is read beside the study file,
                             # else in the current folder) or a list, all of them by default; each cut to the
                             # model's context
    seeds: [0, 1, 2]         # for generated random controls (a list: `seeds: 3` is refused, not guessed at)
    batch_size: 8
    generation_prompts: ["The capital of France is"]   # for `generations`, with
    max_new_tokens: 20
    conditions:
      - name: drop-L1-E3
        interventions: [{op: drop, layers: 1, expert: 3}]
      - generate: each_super_expert      # one condition per super expert (profiled on the texts)
      - generate: all_super_experts
      - generate: random_experts         # k random routed experts in the super experts' layers, per seed
        k: 2
      # each generator also takes `op: drop` (routed super experts re-routed; a shared one is zeroed, with a
      # warning) and `layers: [..]` (the super experts of those layers; random_experts: the layers to draw from)

A baseline condition (no intervention) is always run first. Every generated condition is spelled
out in ``study.resolved.yaml``, which ``workbench ablate`` runs unchanged; each finished condition is saved under ``conditions/`` at once, so an
interrupted run keeps them and a re-run resumes. A saved condition records what its numbers depend on (model, dtype,
device kind, texts, batch size, generation prompts, cloze and task items); one computed for another run is computed again.

Every field is checked when the study is read (counts are integers >= 1), and what needs the model (layer and expert
indices, ``prompts`` within the texts, ``positions`` within reach, new tokens within the context) before anything is
written. Texts, prompts and items longer than the model's context are cut to it, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from tqdm.auto import tqdm

from workbench import metrics as M
from workbench import tasks as T
from workbench.data import default_prompts, read_prompts
from workbench.errors import WorkbenchError, few
from workbench.interventions import Intervention, apply, check_set, reaches
from workbench.io import atomic_path, read_structured, write_text

GENERATORS = ("each_super_expert", "all_super_experts", "random_experts")
TOP_KEYS = {"name", "metrics", "texts", "num_texts", "seeds", "conditions", "generation_prompts", "max_new_tokens",
            "batch_size", "model", "dtype", "device"}  # the last three: recorded in study.resolved.yaml, for the reader
# (the CLI names the model and its --dtype and --device)
TEXT_METRICS = ("perplexity", "sink", "massive", "kl")  # one pass over the study's texts, which number its prompts
COLUMNS = ["condition", "group", "seed", "metric", "mean", "ci_low", "ci_high", "n", "text", "seconds"]
DEFAULT_GENERATION_PROMPTS = ["The capital of France is", "Once upon a time,", "Seven plus five equals"]


@dataclass
class Condition:
    name: str
    interventions: list[Intervention] = field(default_factory=list)
    group: str = ""  # e.g. "random_experts": seeds of one control share a group
    seed: int | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "interventions": [iv.to_dict() for iv in self.interventions]}
        if self.group:
            d["group"] = self.group
        if self.seed is not None:
            d["seed"] = self.seed
        return d


def _lines(text: str) -> dict[tuple, int]:
    """Line numbers (1-based) of the top-level fields (keyed by name), the condition mappings and their
    interventions (by index), from the YAML node tree."""
    out: dict[tuple, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return out
    if not isinstance(root, yaml.MappingNode):
        return out
    for k, v in root.value:
        if isinstance(k, yaml.ScalarNode):
            out[(k.value,)] = k.start_mark.line + 1  # a top-level field
        if k.value == "conditions" and isinstance(v, yaml.SequenceNode):
            for i, c in enumerate(v.value):
                out[(i,)] = c.start_mark.line + 1
                if isinstance(c, yaml.MappingNode):
                    for ck, cv in c.value:
                        if ck.value == "interventions" and isinstance(cv, yaml.SequenceNode):
                            for j, iv in enumerate(cv.value):
                                out[(i, j)] = iv.start_mark.line + 1
    return out


class Study:
    """A validated study. ``Study.from_file(path)`` or ``Study(dict)``; ``run(lm, out_dir)`` -> DataFrame."""

    def __init__(self, spec: dict, source: str = "study", lines: dict | None = None, base: Path | None = None):
        """``base``: the folder relative paths in the study (``texts``, an ``sae_steer``'s ``sae``) are read from
        first (the study file's; else, and where none is given, the current folder)."""
        self.source, self.lines, self.base = source, lines or {}, base
        if not isinstance(spec, dict):
            raise WorkbenchError(f"{source}: a study is a mapping with 'conditions'")
        unknown = sorted(set(spec) - TOP_KEYS)
        if unknown:
            raise WorkbenchError(f"{source}: unknown field {unknown[0]!r}; known: {', '.join(sorted(TOP_KEYS))}")
        name = spec.get("name")
        if name is not None and (not isinstance(name, (str, int)) or isinstance(name, bool) or not str(name).strip()):
            raise WorkbenchError(f"{self._at('name')}: field 'name' must be a non-empty name, got {name!r}")
        self.name = "study" if name is None else str(name)  # 'name:' left empty in YAML reads as None
        metrics = spec.get("metrics", list(M.DEFAULT_METRICS))
        metrics = [metrics] if isinstance(metrics, str) else metrics
        if not isinstance(metrics, list) or not metrics:
            raise WorkbenchError(f"{self._at('metrics')}: field 'metrics' must be a list of metric names; known: "
                                 f"{', '.join(M.METRICS)}")
        bad = [m for m in metrics if m not in M.METRICS]
        if bad:
            raise WorkbenchError(f"{self._at('metrics')}: field 'metrics': unknown metric {bad[0]!r}; known: "
                                 f"{', '.join(M.METRICS)}")
        twice = next((m for i, m in enumerate(metrics) if m in metrics[:i]), None)
        if twice is not None:  # it would be computed and written twice
            raise WorkbenchError(f"{self._at('metrics')}: field 'metrics': {twice!r} is listed twice")
        self.metrics = metrics
        self.texts_file = spec.get("texts")  # a file's path, or the texts themselves (a list)
        t = self.texts_file
        if t is not None and not (isinstance(t, str) and t.strip() or isinstance(t, list) and t
                                  and all(isinstance(x, str) and x.strip() for x in t)):
            raise WorkbenchError(f"{self._at('texts')}: field 'texts' must be the path of a text file (one text a "
                                 f"line) or a list of non-empty texts, got {t!r}")
        # the first 48 built-in texts by default; a given file or list is used whole unless num_texts says otherwise
        self.num_texts = self._count(spec, "num_texts", 48) if "num_texts" in spec or t is None else None
        self.batch_size = self._count(spec, "batch_size", 8)
        self.max_new_tokens = self._count(spec, "max_new_tokens", 20)
        self.seeds = spec.get("seeds", [0, 1, 2])
        if not isinstance(self.seeds, list) or not all(_is_int(x) for x in self.seeds):
            raise WorkbenchError(f"{self._at('seeds')}: field 'seeds' must be a list of integers, e.g. [0, 1, 2], got "
                                 f"{self.seeds!r}")
        twice = sorted({x for x in self.seeds if self.seeds.count(x) > 1})
        if twice:
            raise WorkbenchError(f"{self._at('seeds')}: field 'seeds': seed {twice[0]} is listed twice")
        self.generation_prompts = spec.get("generation_prompts", DEFAULT_GENERATION_PROMPTS)
        gp = self.generation_prompts
        if not isinstance(gp, list) or not all(isinstance(x, str) and x.strip() for x in gp) \
                or (not gp and "generations" in self.metrics):
            raise WorkbenchError(f"{self._at('generation_prompts')}: field 'generation_prompts' must be a list of "
                                 f"non-empty strings" + (", at least one for metric 'generations'" if gp == [] else "")
                                 + f", got {gp!r}")
        self.generation_prompts = list(gp)
        conds = spec.get("conditions", [])
        if not isinstance(conds, list):
            raise WorkbenchError(f"{source}: field 'conditions' must be a list")
        self.explicit: list[Condition] = []
        self.generated: list[tuple[int, dict]] = []  # (index in conditions, the generator)
        for i, c in enumerate(conds):
            where = f"{source} line {self.lines[(i,)]}" if (i,) in self.lines else source
            where += f": conditions[{i}]"
            if not isinstance(c, dict):
                raise WorkbenchError(f"{where}: expected a mapping")
            if "generate" in c:
                extra = sorted(set(c) - {"generate", "k", "op", "layers"})
                if c["generate"] not in GENERATORS or extra:
                    raise WorkbenchError(f"{where}: field 'generate' must be one of {', '.join(GENERATORS)} "
                                         f"(with optional k, op, layers)" + (f"; unknown field {extra[0]!r}" if extra else ""))
                if c.get("op", "zero") not in ("zero", "drop"):
                    raise WorkbenchError(f"{where}: field 'op' of a generated condition must be 'zero' or 'drop'")
                if "k" in c and c["generate"] != "random_experts":
                    raise WorkbenchError(f"{where}: field 'k' is random_experts' (how many experts); "
                                         f"{c['generate']} takes every super expert (of 'layers', when given)")
                if c["generate"] == "random_experts" and not self.seeds:  # it made no condition, without a word
                    raise WorkbenchError(f"{where}: random_experts draws one condition per seed, and field 'seeds' "
                                         "is empty")
                if "k" in c and (not _is_int(c["k"]) or c["k"] < 1):
                    raise WorkbenchError(f"{where}: field 'k' must be an integer >= 1, got {c['k']!r}")
                layers = c.get("layers")
                if layers is not None and not (_is_int(layers) or isinstance(layers, list) and layers
                                               and all(_is_int(x) for x in layers)):
                    raise WorkbenchError(f"{where}: field 'layers' must be an integer or a list of integers")
                layers = None if layers is None else sorted({int(x) for x in layers}) if isinstance(layers, list) \
                    else [int(layers)]
                g = dict(c, op=c.get("op", "zero"), layers=layers)
                same = next((j for j, h in self.generated if h == g), None)
                if same is not None:  # their conditions would be the same ones, under the same names
                    raise WorkbenchError(f"{where}: generates what conditions[{same}] generates (the same generator, "
                                         "op, k and layers)")
                self.generated.append((i, g))
                continue
            unknown = sorted(set(c) - {"name", "interventions", "group", "seed"})
            if unknown:
                raise WorkbenchError(f"{where}: unknown field {unknown[0]!r}; known: name, interventions, group, seed, generate")
            if not isinstance(c.get("name"), (str, int)) or not str(c["name"]).strip():
                raise WorkbenchError(f"{where}: field 'name' is required (a non-empty name)"
                                     + (f", got {c['name']!r}" if "name" in c else ""))
            if not isinstance(c.get("interventions") or [], list):
                raise WorkbenchError(f"{where}: field 'interventions' must be a list of interventions (each a mapping: "
                                     f"'- {{op: ..., layers: ...}}'), got a {type(c['interventions']).__name__}")
            ivs = []
            for j, d in enumerate(c.get("interventions") or []):
                w = (f"{source} line {self.lines[(i, j)]}" if (i, j) in self.lines else source)
                if isinstance(d, dict) and d.get("op") == "sae_steer" and isinstance(d.get("sae"), str) and d["sae"]:
                    d = dict(d, sae=self._beside(d["sae"]))
                ivs.append(Intervention.from_dict(d, f"{w}: conditions[{i}].interventions[{j}]"))
            seed = c.get("seed")
            if seed is not None and not _is_int(seed):
                raise WorkbenchError(f"{where}: field 'seed' must be an integer, got {seed!r}")
            self.explicit.append(Condition(str(c["name"]), ivs, str(c.get("group") or ""), None if seed is None else int(seed)))
        _check_names(["baseline", *(c.name for c in self.explicit)], source)

    def _beside(self, path: str) -> str:
        """A relative path of the study: the study file's neighbour, else the current folder's (as given where
        neither exists); absolute where found, so study.resolved.yaml, written elsewhere, runs from anywhere."""
        given = Path(path).expanduser()
        found = given if self.base is None else self.base / given
        if not found.exists() and given.exists():
            found = given
        return str(found.resolve()) if found.exists() else str(found)

    def _at(self, key: str) -> str:
        """Where top-level field ``key`` is: the source, and its line where known."""
        return f"{self.source} line {self.lines[(key,)]}" if (key,) in self.lines else self.source

    def _count(self, spec: dict, key: str, default: int) -> int:
        v = spec.get(key, default)
        if not _is_int(v) or v < 1:
            raise WorkbenchError(f"{self._at(key)}: field {key!r} must be an integer >= 1, got {v!r}")
        return v

    @classmethod
    def from_file(cls, path: str | Path) -> "Study":
        spec, text = read_structured(path, "study")
        study = cls(spec, str(path), _lines(text), base=Path(path).parent)
        if isinstance(study.texts_file, str):
            study.texts_file = study._beside(study.texts_file)
        return study

    # ----- resolution -----------------------------------------------------------------------------
    def texts(self) -> list[str]:
        t = self.texts_file
        texts = list(t) if isinstance(t, list) else read_prompts(t) if t else default_prompts()
        return texts[: self.num_texts]

    def resolve(self, lm, progress: bool = False) -> list[Condition]:
        """All conditions, generated ones spelled out, validated against the model (before any study run)."""
        out = [Condition("baseline")] + list(self.explicit)
        limit = lm.context_length
        if "generations" in self.metrics and self.generation_prompts and limit and self.max_new_tokens >= limit:
            raise WorkbenchError(f"{self._at('max_new_tokens')}: field 'max_new_tokens': {self.max_new_tokens} new "
                                 f"tokens leave no room for a generation prompt in the model's context of {limit} "
                                 "positions")
        self._validate(lm, out)  # explicit conditions: before any forward pass
        if self.generated:
            n = len(lm.layer_infos())
            for i, g in self.generated:  # before the profile, as explicit conditions are
                bad = [x for x in g["layers"] or () if not 0 <= x < n]
                if bad:
                    raise WorkbenchError(f"{self.source}: conditions[{i}] ({g['generate']}): field 'layers': layer "
                                         f"{bad[0]} out of range (model has {n})")
            supers = self._super_experts(lm, progress)
            generated = [c for i, g in self.generated for c in self._generate(lm, g, supers, f"conditions[{i}]")]
            self._validate(lm, generated)
            out += generated
            _check_names([c.name for c in out], self.source)
        return out

    def _validate(self, lm, conditions: list[Condition]) -> None:
        """Each intervention against the model, and its ``prompts`` and ``positions`` against what the study runs
        (a scope that touches no token would make a condition silently equal to the baseline)."""
        texts = extent = None
        for c in conditions:
            for i, iv in enumerate(c.interventions):
                where = f"{self.source}: condition {c.name!r} intervention {i}"
                iv.validate(lm, where)
                if iv.prompts is not None:
                    if not set(self.metrics) & set(TEXT_METRICS):
                        raise WorkbenchError(f"{where}: field 'prompts' picks texts, which only the metrics "
                                             f"{', '.join(TEXT_METRICS)} run; the study has none of them")
                    texts = self.texts() if texts is None else texts
                    bad = [p for p in iv.prompts if not 0 <= p < len(texts)]
                    if bad:
                        raise WorkbenchError(f"{where}: field 'prompts': text {bad[0]} out of range (the study has "
                                             f"{len(texts)} texts)")
                if iv.positions is not None:
                    texts = self.texts() if texts is None else texts
                    extent = self._extent(lm, texts) if extent is None else extent
                    lengths, other, _ = extent
                    picked = [lengths[p] for p in iv.prompts] if iv.prompts is not None else [*lengths, other]
                    longest = max(picked, default=0)
                    if not reaches(iv.positions, longest):
                        what = "text it picks" if iv.prompts is not None else "input"
                        raise WorkbenchError(f"{where}: field 'positions': {list(iv.positions)} touch no token (the "
                                             f"longest {what} of the study has {longest} tokens; positions count "
                                             "from 0, negative from the end)")
                if iv.token is not None and "generations" not in self.metrics:  # (new tokens may hold it)
                    texts = self.texts() if texts is None else texts
                    if not any(iv.token in t for t in self._all_inputs(texts)):
                        warnings.warn(f"{where}: field 'token': {iv.token!r} is in none of the study's inputs, so "
                                      "it touches no token and the condition equals the baseline", stacklevel=3)
            check_set(lm, c.interventions, f"{self.source}: condition {c.name!r}")

    def _item_sets(self) -> list[tuple[str, list]]:
        """The cloze and task items the study's metrics run, by name ("cloze" or the task's)."""
        want = set(self.metrics)
        return ([("cloze", M.default_cloze())] if "accuracy" in want else []) + [(t, T.items(t)) for t in T.TASKS
                                                                                if t in want]

    def _all_inputs(self, texts: list[str]) -> list[str]:
        """Every text the study's metrics run: its texts, and the cloze and task prompts with their options."""
        return ((texts if set(self.metrics) & set(TEXT_METRICS) else [])
                + [p for _, items in self._item_sets() for c in items for p in (c.prompt, *c.options)])

    def _extent(self, lm, texts: list[str]) -> tuple[list[int], int, list[str]]:
        """As the study runs them: each text's token count (0 where no text metric runs), the longest of its other
        inputs (a generation prompt with its new tokens, a cloze or task prompt with an option), and what was cut to
        the model's context, a phrase a kind."""
        want, limit = set(self.metrics), lm.context_length
        lengths, other, cut = [0] * len(texts), 0, []
        if want & set(TEXT_METRICS):
            ids, n = M.token_ids(lm, texts)
            lengths = [len(x) for x in ids]
            if n:
                cut.append(f"{n} of {len(texts)} texts to {limit} tokens")
        if "generations" in want and self.generation_prompts:
            new = self.max_new_tokens
            ids, n = M.token_ids(lm, self.generation_prompts, "generation prompt", new)
            other = max(len(x) for x in ids) + new
            if n:
                cut.append(f"{n} of {len(ids)} generation prompts to {limit - new} tokens (room for max_new_tokens)")
        for name, items in self._item_sets():
            prompts, options, n = T.tokenized(lm, items)
            other = max([other, *(len(p) + max(map(len, opts)) for p, opts in zip(prompts, options))])
            if n:
                cut.append(f"{n} of {len(items)} {name} prompts to their last {max(map(len, prompts))} tokens (room "
                           f"for the options)")
        return lengths, other, cut

    def _inputs(self, lm, texts: list[str], cloze: list) -> dict:
        """What a condition's numbers depend on besides its interventions and the metrics; saved with each finished
        condition, which a re-run reuses only where all of it is the same."""
        want = set(self.metrics)
        # the device's kind: another kind runs other kernels (numbers differ by rounding); cuda:0 and cuda:1 do not
        out = {"model": lm.spec, "dtype": str(getattr(lm.model, "dtype", "")), "device": lm.device.type,
               "batch_size": self.batch_size,
               "texts": len(texts), "texts_sha256": _sha256(texts)}
        if "accuracy" in want:
            out["cloze_sha256"] = _sha256([[c.prompt, *c.options, c.answer] for c in cloze])
        tasks = [t for t in T.TASKS if t in want]
        if tasks:
            out["tasks_sha256"] = _sha256([[t, c.prompt, *c.options, c.answer] for t in tasks for c in T.items(t)])
        if "generations" in want:
            out.update(generation_prompts=self.generation_prompts, max_new_tokens=self.max_new_tokens)
        return out

    def _super_experts(self, lm, progress: bool) -> list[dict]:
        from workbench.experts.profile import ProfileOptions, profile

        p = profile(lm, self.texts(), ProfileOptions(sinks=False, qk=False, batch_size=self.batch_size), progress=progress)
        if not p["super_experts"]:
            from workbench.experts.super_experts import no_super_experts

            warnings.warn(f"{self.source}: the study texts' profile found {no_super_experts(p).splitlines()[0]}; "
                          "each_super_expert and all_super_experts generate no condition, and random_experts "
                          "only with its own layers and k", stacklevel=2)
        return p["super_experts"]

    def _generate(self, lm, g: dict, supers: list[dict], where: str) -> list[Condition]:
        op = g.get("op", "zero")
        where = f"{self.source}: {where} ({g['generate']}{', op ' + op if op != 'zero' else ''})"
        shared = []

        def ablate(e: dict) -> Intervention:
            if e["kind"] == "dense":  # a dense "expert" is an MLP: remove its outlier channel from the stream
                return Intervention("zero_channel", (e["layer"],), channel=e["channel"])
            if e["kind"] == "shared" and op == "drop":  # always on, never routed: zeroing is its removal
                shared.append(label(e))
                return Intervention("zero", (e["layer"],), expert=e["expert"], kind="shared")
            return Intervention(op, (e["layer"],), expert=e["expert"], kind=e["kind"])

        def label(e: dict) -> str:
            return f"L{e['layer']}.C{e['channel']}" if e["kind"] == "dense" else f"L{e['layer']}.{e['kind'][0].upper()}{e['expert']}"

        kind, layers = g["generate"], g["layers"]
        # what tells these conditions apart from another generator's (each_super_expert's labels name the layer)
        tag = ("" if op == "zero" else f" {op}") + ("" if layers is None or kind == "each_super_expert" else
                                                   f" in L{','.join(map(str, layers))}")
        if layers is not None and kind != "random_experts":
            supers = [e for e in supers if e["layer"] in layers]
        if not supers and kind != "random_experts":
            if layers is not None:
                warnings.warn(f"{where}: no super expert in layers {layers}: no condition", stacklevel=3)
            return []  # no super experts (warned): nothing to ablate, and no empty stand-in for the baseline
        if kind == "each_super_expert":
            out = [Condition(f"super {label(e)}{tag}", [ablate(e)], group="each_super_expert") for e in supers]
        elif kind == "all_super_experts":
            out = [Condition(f"all super experts{tag}", [ablate(e) for e in supers], group="all_super_experts")]
        else:
            out = self._random(lm, g, supers, tag, where)
        if shared:
            warnings.warn(f"{where}: {', '.join(dict.fromkeys(shared))}: a shared expert is never routed, so it is "
                          "zeroed (op drop removes routed experts only)", stacklevel=3)
        return out

    def _random(self, lm, g: dict, supers: list[dict], tag: str, where: str) -> list[Condition]:
        """random_experts: k random experts (or channels, for dense layers) of the layers, per seed."""
        op = g.get("op", "zero")
        # a shared super expert is not in the pool (routed experts, or channels): it neither sizes nor takes a slot
        drawn = [e for e in supers if e["kind"] != "shared"]
        k = int(g.get("k", len(drawn) or len(supers)))
        layers = g["layers"] or sorted({e["layer"] for e in supers})
        if k < 1 or not layers:  # no super experts to size or place the control (warned)
            return []
        infos = lm.layer_infos()
        taken = {(e["layer"], e["expert"] if e["kind"] != "dense" else e["channel"]) for e in drawn}
        pool = []
        for L in layers:
            n = infos[L].num_experts if infos[L].kind == "moe" else int(lm.config.hidden_size)
            pool += [(L, x) for x in range(n) if (L, x) not in taken]
        if k > len(pool):
            warnings.warn(f"{where}: k={k}, but layers {layers} have {len(pool)} experts (or channels) besides the "
                          f"super experts: each condition takes those {len(pool)}", stacklevel=3)
            k = len(pool)
        # Each seed draws a set no earlier seed drew (redrawing from its own generator), while there are such sets: the
        # same set twice would count one control twice in the pooled mean and interval (k cut to the pool: every seed).
        out, first, same, sets = [], set(), [], math.comb(len(pool), k)
        for seed in self.seeds:
            if len(first) == sets:
                same.append(str(seed))
                continue
            rng = random.Random(seed)
            picks = tuple(sorted(rng.sample(pool, k)))
            while picks in first:
                picks = tuple(sorted(rng.sample(pool, k)))
            first.add(picks)
            ivs = [Intervention(op, (L, ), expert=x) if infos[L].kind == "moe" else
                   Intervention("zero_channel", (L,), channel=x) for L, x in picks]
            out.append(Condition(f"random x{k}{tag} seed {seed}", ivs, group="random_experts", seed=seed))
        if same:
            warnings.warn(f"{where}: there are {sets} set(s) of {k} of those {len(pool)}, and every one is drawn "
                          f"before seed(s) {few(same, 6)}: the control has "
                          f"{len(out)} seed(s)", stacklevel=3)
        return out

    # ----- running ------------------------------------------------------------------------------
    def run(self, lm, out_dir: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
        from workbench.experts.sinks import eager_attention

        if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():  # (pathlib's error, late)
            raise WorkbenchError(f"out_dir {out_dir} is a file, not a folder")

        conditions = self.resolve(lm, progress)
        texts, cloze = self.texts(), M.default_cloze()
        if self.num_texts is not None and len(texts) < self.num_texts:  # (texts() keeps at most num_texts)
            warnings.warn(f"{self._at('num_texts')}: num_texts {self.num_texts}, but there are {len(texts)} texts: "
                          f"the study runs on those {len(texts)}", stacklevel=2)
        lengths, _, cut = self._extent(lm, texts)  # before anything is written: a text of no tokens fails here
        single = {i for i, n in enumerate(lengths) if n == 1}
        if single:  # no next token to predict, no query past the first: NaN there, which is not the model's doing
            warnings.warn(f"{self.source}: {len(single)} text(s) of one token (text {few(sorted(single))}) have no "
                          "next token to predict and no query to read: "
                          "perplexity and sink leave them out (n)", stacklevel=2)
        if cut:
            warnings.warn(f"{self.source}: longer than the model's context of {lm.context_length} positions, cut: "
                          + "; ".join(cut), stacklevel=2)
        elsewhere = [m for m in self.metrics if m not in TEXT_METRICS]
        for c in conditions if elsewhere else ():
            scoped = sum(iv.prompts is not None for iv in c.interventions)
            if scoped:  # a `prompts` scope numbers the texts: cloze items, tasks and generation prompts have no number
                warnings.warn(f"condition {c.name!r}: {scoped} of its {len(c.interventions)} intervention(s) pick "
                              f"texts (field 'prompts'), which {', '.join(elsewhere)} do not run: there they change "
                              "nothing"
                              + ("; those rows are the baseline's" if scoped == len(c.interventions) else ""),
                              stacklevel=2)
        inputs = self._inputs(lm, texts, cloze)
        out = Path(out_dir) if out_dir else None
        reuse = self._saved(out, conditions, inputs) if out else {}
        if out:
            # An earlier run's results would pass for this one's beside its study file until this run ends.
            for name in ("results.csv", "results.parquet", "results.png"):
                (out / name).unlink(missing_ok=True)
            # Runs unchanged with `workbench ablate` (the baseline is implicit, so it is not listed).
            write_text(out / "study.resolved.yaml", yaml.safe_dump(
                {"name": self.name, "model": lm.spec, "dtype": lm.dtype_name, "device": lm.device.type,
                 "metrics": self.metrics, "num_texts": len(texts),
                 "texts": self.texts_file, "seeds": self.seeds, "generation_prompts": self.generation_prompts,
                 "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
                 "conditions": [c.to_dict() for c in conditions if c.name != "baseline"]},
                sort_keys=False))
        want = set(self.metrics)
        rows: list[dict] = []
        baseline_lp = None
        bar = tqdm(conditions, desc=f"study {self.name}", disable=not progress, leave=False)
        ctx = eager_attention(lm.model) if "sink" in want else _Null()
        with ctx:
            for c in bar:
                bar.set_postfix_str(c.name)
                saved = out / "conditions" / f"{_slug(c.name)}.json" if out else None
                if c.name in reuse:
                    rows += reuse[c.name]
                    if c.name == "baseline" and "kl" in want:
                        _, baseline_lp = M.text_metrics(lm, texts, {"kl"}, None, self.batch_size)
                    continue
                start = time.perf_counter()
                with apply(lm, c.interventions) as applied:
                    values, lp = {}, []
                    if want & set(TEXT_METRICS):  # one pass over the texts for these
                        values, lp = M.text_metrics(lm, texts, want, baseline_lp, self.batch_size, applied)
                    if c.name == "baseline":
                        baseline_lp = lp
                        if "kl" in want:
                            values["kl"] = [0.0] * len(texts)
                    if "accuracy" in want:
                        values["accuracy"] = M.cloze_accuracy(lm, cloze, self.batch_size)
                    for task in T.TASKS:
                        if task in want:
                            values[task] = T.choice_scores(lm, T.items(task), self.batch_size)
                    gens = M.generations(lm, self.generation_prompts, self.max_new_tokens, self.batch_size) \
                        if "generations" in want else []
                _say_not_finite(c.name, values, single)
                crow = []
                for metric in self.metrics:
                    if metric == "generations":
                        for p, g in zip(self.generation_prompts, gens):
                            crow.append(_row(c, metric, [], text=f"{p} -> {g}"))
                    else:
                        crow.append(_row(c, metric, values[metric]))
                for r in crow:
                    r["seconds"] = round(time.perf_counter() - start, 3)
                rows += crow
                if saved:  # full float precision, so a resumed run equals an uninterrupted one
                    write_text(saved, json.dumps({"condition": c.to_dict(), "metrics": self.metrics, "inputs": inputs,
                                                  "rows": crow}))
        df = pd.DataFrame(rows, columns=COLUMNS)
        if out:
            write_results(df, out)
            mine = {f"{_slug(c.name)}.json" for c in conditions}  # other studies' conditions: not this run's results
            for f in (out / "conditions").glob("*.json"):
                if f.name not in mine:
                    f.unlink()
        return df

    def _saved(self, out: Path, conditions: list[Condition], inputs: dict) -> dict[str, list[dict]]:
        """The rows of the conditions saved under ``out/conditions`` by a run of this very study (same condition,
        metrics and inputs: :meth:`_inputs`), by name; the others are computed again, said once."""
        reuse, stale = {}, []
        for c in conditions:
            f = out / "conditions" / f"{_slug(c.name)}.json"
            if not f.is_file():
                continue
            try:
                done = json.loads(f.read_text())
            except (OSError, ValueError):
                done = None
            if not isinstance(done, dict) or not isinstance(done.get("rows"), list):
                stale.append((f, ["unreadable"]))
                continue
            was = done.get("inputs")
            if not isinstance(was, dict):
                why = ["no record of the model and texts it was computed on"]
            else:
                keys = [k for k in dict.fromkeys([*inputs, *was]) if was.get(k) != inputs.get(k)]
                why = [_differs(k, was.get(k), inputs.get(k)) for k in keys
                       if not (k.endswith("_sha256") and k[:-len("_sha256")] in keys)]  # "texts 4, now 2" says it
            if done.get("condition") != c.to_dict():
                why.append("other interventions")
            if done.get("metrics") != self.metrics:
                why.append(_differs("metrics", done.get("metrics"), self.metrics))
            if why:
                stale.append((f, why))
            else:
                reuse[c.name] = done["rows"]
        if stale:
            f, why = stale[0]
            more = f" and {len(stale) - 1} more" if len(stale) > 1 else ""
            warnings.warn(f"{f.parent.name}/{f.name}{more} {'were' if more else 'was'} computed for another run "
                          f"({', '.join(why)}): recomputing", stacklevel=3)
        return reuse


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()


def _differs(key: str, was, now) -> str:
    """A phrase for an input that differs from a saved condition's (``was``; None: one of the two has none)."""
    if key.endswith("_sha256"):
        return f"other {key[:-len('_sha256')]}"
    return f"{key} {was!r}, now {now!r}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "condition"


def _check_names(names: list[str], source: str) -> None:
    """Every condition has its own name and its own ``conditions/*.json`` file: names that differ only in case,
    spaces or punctuation would share one (and case-insensitive file systems fold case)."""
    seen: dict[str, str] = {}
    for n in names:
        key = _slug(n).lower()
        if key in seen:
            why = ("is used twice" if seen[key] == n else
                   f"and {seen[key]!r} would share the file conditions/{_slug(n)}.json (they differ only in case, "
                   "spaces or punctuation)")
            raise WorkbenchError(f"{source}: condition name {n!r} {why} (baseline is implicit)")
        seen[key] = n


def _say_not_finite(condition: str, values: dict[str, list[float]], single: set[int] = frozenset()) -> None:
    """Warn where a condition's metric values are NaN or inf (the model's outputs were not finite under its
    interventions): each mean is over the finite values only, which the table's ``n`` shows but nothing else says.
    ``single``: the texts of one token, whose text metrics are NaN by definition (said once, before the run)."""
    counts = {m: sum(not math.isfinite(x) for i, x in enumerate(v) if not (m in TEXT_METRICS and i in single))
              for m, v in values.items()}
    bad = {m: k for m, k in counts.items() if k}
    if bad:  # (an inf is left out of the mean too: the `massive` of an fp16 overflow)
        warnings.warn(f"condition {condition!r}: " + ", ".join(f"{m} is not finite on {k} of {len(values[m])}"
                                                              for m, k in bad.items())
                      + " (the model's outputs are not finite there); its means are over the rest, n says how many",
                      stacklevel=3)


def _row(c: Condition, metric: str, values: list[float], text: str = "") -> dict:
    bounds = M.METRIC_RANGE.get(metric, (-math.inf, math.inf))
    mean, lo, hi, n = M.mean_ci(values, share=metric in M.SHARE_METRICS, bounds=bounds) if values \
        else (float("nan"),) * 3 + (0,)
    return {"condition": c.name, "group": c.group, "seed": c.seed, "metric": metric, "mean": mean, "ci_low": lo,
            "ci_high": hi, "n": n, "text": text}


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Numeric metrics, one row per condition (random seeds pooled by group), columns = metrics (means)."""
    num = df[df.metric != "generations"].copy()
    # each random_experts generator's seeds pooled in a row of their own ("random x4 drop": its name without the seed);
    # they were all one row, whatever their k, op or layers
    num["label"] = [c.removesuffix(f" seed {int(s)}") if g == "random_experts" and s == s and s is not None else c
                    for c, g, s in zip(num.condition, num.group, num.seed)]
    return num.pivot_table(index="label", columns="metric", values="mean", aggfunc="mean", sort=False, dropna=False)


def write_results(df: pd.DataFrame, out: Path) -> None:
    with atomic_path(out / "results.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(out / "results.csv") as tmp:
        df.to_csv(tmp, index=False)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num = df[df.metric != "generations"]
    metrics = list(dict.fromkeys(num.metric))
    if not metrics:  # generations only: nothing to plot
        (out / "results.png").unlink(missing_ok=True)
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 4), dpi=100, squeeze=False)
    for ax, m in zip(axes[0], metrics):
        d = num[num.metric == m]
        ax.barh(range(len(d)), d["mean"], xerr=[d["mean"] - d["ci_low"], d["ci_high"] - d["mean"]], color="tab:blue")
        ax.set_yticks(range(len(d)))
        ax.set_yticklabels(d.condition if m == metrics[0] else [], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(m, fontsize=9)
    fig.tight_layout()
    with atomic_path(out / "results.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
