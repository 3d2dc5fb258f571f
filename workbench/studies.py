"""Scripted ablation studies: named conditions (intervention sets) x metrics -> a table with intervals.

A study file (YAML or JSON)::

    name: super-experts
    metrics: [perplexity, accuracy, sink, massive, kl, generations]   # the default; also passkey, override,
                                                                      # label_copy, recall (workbench.tasks)
    num_texts: 48            # built-in texts (or `texts: FILE`, one per line)
    seeds: [0, 1, 2]         # for generated random controls
    conditions:
      - name: drop-L1-E3
        interventions: [{op: drop, layers: 1, expert: 3}]
      - generate: each_super_expert      # one condition per super expert (profiled on the texts)
      - generate: all_super_experts
      - generate: random_experts         # k random routed experts in the super experts' layers, per seed
        k: 2

A baseline condition (no intervention) is always run first. Every generated condition is spelled
out in ``study.resolved.yaml``, which ``workbench ablate`` runs unchanged; each finished condition is saved under ``conditions/`` at once, so an
interrupted run keeps them and a re-run resumes.
"""

from __future__ import annotations

import json
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
from workbench.errors import WorkbenchError
from workbench.interventions import Intervention, apply
from workbench.io import atomic_path, read_structured, write_text

GENERATORS = ("each_super_expert", "all_super_experts", "random_experts")
TOP_KEYS = {"name", "metrics", "texts", "num_texts", "seeds", "conditions", "generation_prompts", "max_new_tokens",
            "batch_size", "model"}  # model: recorded in study.resolved.yaml, for the reader (the CLI names the model)
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
    """Line numbers (1-based) of the condition mappings and their interventions, from the YAML node tree."""
    out: dict[tuple, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return out
    if not isinstance(root, yaml.MappingNode):
        return out
    for k, v in root.value:
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

    def __init__(self, spec: dict, source: str = "study", lines: dict | None = None):
        self.source, self.lines = source, lines or {}
        if not isinstance(spec, dict):
            raise WorkbenchError(f"{source}: a study is a mapping with 'conditions'")
        unknown = sorted(set(spec) - TOP_KEYS)
        if unknown:
            raise WorkbenchError(f"{source}: unknown field {unknown[0]!r}; known: {', '.join(sorted(TOP_KEYS))}")
        self.name = str(spec.get("name", "study"))
        self.metrics = list(spec.get("metrics", M.DEFAULT_METRICS))
        bad = [m for m in self.metrics if m not in M.METRICS]
        if bad:
            raise WorkbenchError(f"{source}: field 'metrics': unknown metric {bad[0]!r}; known: {', '.join(M.METRICS)}")
        self.texts_file = spec.get("texts")
        self.num_texts = int(spec.get("num_texts", 48))
        self.seeds = [int(s) for s in spec.get("seeds", [0, 1, 2])]
        self.generation_prompts = list(spec.get("generation_prompts", DEFAULT_GENERATION_PROMPTS))
        self.max_new_tokens = int(spec.get("max_new_tokens", 20))
        self.batch_size = int(spec.get("batch_size", 8))
        conds = spec.get("conditions", [])
        if not isinstance(conds, list):
            raise WorkbenchError(f"{source}: field 'conditions' must be a list")
        self.explicit: list[Condition] = []
        self.generated: list[dict] = []
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
                self.generated.append(dict(c))
                continue
            unknown = sorted(set(c) - {"name", "interventions", "group", "seed"})
            if unknown:
                raise WorkbenchError(f"{where}: unknown field {unknown[0]!r}; known: name, interventions, group, seed, generate")
            if "name" not in c:
                raise WorkbenchError(f"{where}: field 'name' is required")
            ivs = []
            for j, d in enumerate(c.get("interventions") or []):
                w = (f"{source} line {self.lines[(i, j)]}" if (i, j) in self.lines else source)
                ivs.append(Intervention.from_dict(d, f"{w}: conditions[{i}].interventions[{j}]"))
            seed = c.get("seed")
            self.explicit.append(Condition(str(c["name"]), ivs, str(c.get("group") or ""), None if seed is None else int(seed)))
        names = [c.name for c in self.explicit]
        dup = {n for n in names if names.count(n) > 1} | ({"baseline"} & set(names))
        if dup:
            raise WorkbenchError(f"{source}: condition name {sorted(dup)[0]!r} is used twice (baseline is implicit)")

    @classmethod
    def from_file(cls, path: str | Path) -> "Study":
        spec, text = read_structured(path, "study")
        return cls(spec, str(path), _lines(text))

    # ----- resolution -----------------------------------------------------------------------------
    def texts(self) -> list[str]:
        texts = read_prompts(self.texts_file) if self.texts_file else default_prompts()
        return texts[: self.num_texts]

    def resolve(self, lm, progress: bool = False) -> list[Condition]:
        """All conditions, generated ones spelled out, validated against the model (before any study run)."""
        out = [Condition("baseline")] + list(self.explicit)
        self._validate(lm, out)  # explicit conditions: before any forward pass
        if self.generated:
            supers = self._super_experts(lm, progress)
            generated = [c for g in self.generated for c in self._generate(lm, g, supers)]
            self._validate(lm, generated)
            out += generated
        return out

    def _validate(self, lm, conditions: list[Condition]) -> None:
        for c in conditions:
            for i, iv in enumerate(c.interventions):
                iv.validate(lm, f"{self.source}: condition {c.name!r} intervention {i}")

    def _super_experts(self, lm, progress: bool) -> list[dict]:
        from workbench.experts.profile import ProfileOptions, profile

        p = profile(lm, self.texts(), ProfileOptions(sinks=False, qk=False, batch_size=self.batch_size), progress=progress)
        if not p["super_experts"]:
            from workbench.experts.super_experts import no_super_experts

            warnings.warn(f"{self.source}: the study texts' profile found {no_super_experts(p).splitlines()[0]}; "
                          "each_super_expert and all_super_experts generate no condition, and random_experts "
                          "only with its own layers and k", stacklevel=2)
        return p["super_experts"]

    def _generate(self, lm, g: dict, supers: list[dict]) -> list[Condition]:
        op = g.get("op", "zero")

        def ablate(e: dict) -> Intervention:
            if e["kind"] == "dense":  # a dense "expert" is an MLP: remove its outlier channel from the stream
                return Intervention("zero_channel", (e["layer"],), channel=e["channel"])
            return Intervention(op, (e["layer"],), expert=e["expert"], kind=e["kind"] if op == "zero" else "routed")

        def label(e: dict) -> str:
            return f"L{e['layer']}.C{e['channel']}" if e["kind"] == "dense" else f"L{e['layer']}.{e['kind'][0].upper()}{e['expert']}"

        kind = g["generate"]
        if not supers and kind != "random_experts":
            return []  # no super experts (warned): nothing to ablate, and no empty stand-in for the baseline
        if kind == "each_super_expert":
            return [Condition(f"super {label(e)}", [ablate(e)], group="each_super_expert") for e in supers]
        if kind == "all_super_experts":
            return [Condition("all super experts", [ablate(e) for e in supers], group="all_super_experts")]
        # random controls: k random experts (or channels, for dense layers) from the same layers
        k = int(g.get("k", len(supers)))
        layers = g.get("layers") or sorted({e["layer"] for e in supers})
        layers = layers if isinstance(layers, list) else [layers]
        if k < 1 or not layers:  # no super experts to size or place the control (warned)
            return []
        infos = lm.layer_infos()
        taken = {(e["layer"], e["expert"] if e["kind"] != "dense" else e["channel"]) for e in supers}
        out = []
        for seed in self.seeds:
            rng = random.Random(seed)
            pool = []
            for L in layers:
                n = infos[L].num_experts if infos[L].kind == "moe" else int(lm.config.hidden_size)
                pool += [(L, x) for x in range(n) if (L, x) not in taken]
            picks = rng.sample(pool, min(k, len(pool)))
            ivs = [Intervention(op, (L, ), expert=x) if infos[L].kind == "moe" else
                   Intervention("zero_channel", (L,), channel=x) for L, x in sorted(picks)]
            out.append(Condition(f"random x{k} seed {seed}", ivs, group="random_experts", seed=seed))
        return out

    # ----- running ------------------------------------------------------------------------------
    def run(self, lm, out_dir: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
        from workbench.experts.sinks import eager_attention

        conditions = self.resolve(lm, progress)
        texts, cloze = self.texts(), M.default_cloze()
        out = Path(out_dir) if out_dir else None
        if out:
            # Runs unchanged with `workbench ablate` (the baseline is implicit, so it is not listed).
            write_text(out / "study.resolved.yaml", yaml.safe_dump(
                {"name": self.name, "model": lm.spec, "metrics": self.metrics, "num_texts": len(texts),
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
                if saved and saved.is_file():
                    done = json.loads(saved.read_text())
                    if done.get("condition") == c.to_dict() and done.get("metrics") == self.metrics:
                        rows += done["rows"]
                        if c.name == "baseline" and "kl" in want:
                            _, baseline_lp = M.text_metrics(lm, texts, {"kl"}, None, self.batch_size)
                        continue
                start = time.perf_counter()
                with apply(lm, c.interventions) as applied:
                    values, lp = {}, []
                    if want & {"perplexity", "sink", "massive", "kl"}:  # one pass over the texts for these
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
                    write_text(saved, json.dumps({"condition": c.to_dict(), "metrics": self.metrics, "rows": crow}))
        df = pd.DataFrame(rows, columns=COLUMNS)
        if out:
            write_results(df, out)
        return df


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "condition"


def _row(c: Condition, metric: str, values: list[float], text: str = "") -> dict:
    mean, lo, hi, n = M.mean_ci(values) if values else (float("nan"),) * 3 + (0,)
    return {"condition": c.name, "group": c.group, "seed": c.seed, "metric": metric, "mean": mean, "ci_low": lo,
            "ci_high": hi, "n": n, "text": text}


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Numeric metrics, one row per condition (random seeds pooled by group), columns = metrics (means)."""
    num = df[df.metric != "generations"].copy()
    num["label"] = [g if g == "random_experts" else c for c, g in zip(num.condition, num.group)]
    return num.pivot_table(index="label", columns="metric", values="mean", aggfunc="mean", sort=False)


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
    if not metrics:
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
