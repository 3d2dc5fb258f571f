"""Train a small SAE with SAELens' own trainer on activations streamed from a workbench model.

SAELens' ``SAETrainer`` takes any iterator of ``[batch, d_in]`` activation batches as its data
provider (its ``LanguageModelSAETrainingRunner`` passes ``iter(ActivationsStore)``; the store needs a
TransformerLens model and a Hugging Face dataset, and has no hook for a single MoE expert). Here the
provider is :class:`ActivationStream`: the site's rows, captured with :class:`Capture` while the
model runs over the prompts (the built-in corpus by default), shuffled in a mixing pool. The first
epoch streams from the model; when one pass fits in ``cache_rows`` later epochs reshuffle the kept
rows instead of running the model again (the built-in corpus is ~5k tokens, so a run sees it many
times). Every ``holdout_every``-th prompt is held out: explained variance and L0 are measured there.

The SAE is SAELens' ``TopKTrainingSAE`` (default; L0 is fixed at k) or ``StandardTrainingSAE`` (ReLU
+ L1), with ``normalize_activations="expected_average_only_in"`` (the trainer estimates the scale and
folds it into the weights at the end) and saved with ``save_inference_model`` in SAELens' format.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.io import write_json
from workbench.sae.loading import check_fit, hook_name
from workbench.sae.stream import Buffer, Tokens, forward_batches
from workbench.tracing.sites import Site

ARCHITECTURES = ("topk", "standard")
SAMPLE_ROWS = 65536  # training rows kept to measure the trained SAE on (train_explained_variance)


@dataclass
class TrainOptions:
    tokens: int = 150_000  # activation vectors the trainer consumes (the corpus repeats in epochs)
    architecture: str = "topk"  # topk | standard
    expansion: int = 4  # d_sae = expansion x d_in, unless d_sae is given
    d_sae: int | None = None
    k: int = 32  # topk: active features per token
    l1_coefficient: float = 5.0  # standard
    lr: float = 1e-3
    batch_size: int = 1024  # activation vectors per training step
    prompt_batch: int = 16  # prompts per forward pass
    max_tokens: int | None = 128  # truncate prompts
    holdout_every: int = 10  # every N-th prompt is held out for evaluation (0: evaluate on training tokens)
    skip_first: bool = True  # drop each prompt's first token (massive activations / attention sink)
    cache_rows: int = 400_000  # keep one epoch's rows in memory if it has at most this many
    seed: int = 0

    def check(self) -> None:
        from workbench.args import SEED, Number
        from workbench.tracing.runner import check_number

        # of the right kind first (k=2.5 failed inside SAELens mid-training, lr=-1 inside torch's Adam, "2000" in a
        # comparison), then in range with the flags' messages
        for name in ("tokens", "expansion", "k", "batch_size", "prompt_batch", "holdout_every", "cache_rows"):
            check_number(name, getattr(self, name), Number(int))
        for name in ("d_sae", "max_tokens"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), Number(int, 1))
        check_number("lr", self.lr, Number(float, 0, open_low=True))
        check_number("l1_coefficient", self.l1_coefficient, Number(float, 0))
        check_number("seed", self.seed, SEED)
        if not isinstance(self.skip_first, bool):
            raise WorkbenchError(f"skip_first must be True or False, got {self.skip_first!r}")
        if self.holdout_every < 0 or self.cache_rows < 0:  # (-1 held nothing out: the fit was read on training rows)
            name = "holdout_every" if self.holdout_every < 0 else "cache_rows"
            raise WorkbenchError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.architecture not in ARCHITECTURES:
            raise WorkbenchError(f"unknown SAE architecture {self.architecture!r}; use one of {', '.join(ARCHITECTURES)}")
        for name in ("tokens", "expansion", "k", "batch_size", "prompt_batch"):
            if getattr(self, name) < 1:
                raise WorkbenchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.d_sae is not None and self.d_sae < 1:
            raise WorkbenchError(f"--d-sae must be at least 1, got {self.d_sae}")
        if self.architecture == "topk" and self.d_sae is not None and self.k > self.d_sae:  # before the model loads
            raise WorkbenchError(f"--k {self.k} is larger than the SAE ({self.d_sae} features)")
        if self.tokens < self.batch_size:
            raise WorkbenchError(f"--tokens {self.tokens} is less than one batch ({self.batch_size})")
        if self.holdout_every == 1:
            raise WorkbenchError("--holdout-every 1 holds out every prompt, leaving none to train on; use 2 or more, "
                                 "or 0 to evaluate on the training prompts")


class ActivationStream:
    """Endless iterator of shuffled ``[batch_size, d]`` float32 batches of ``site``'s rows on some prompts."""

    def __init__(self, lm, site: Site, tokens: Tokens, prompts: Sequence[int], opts: TrainOptions):
        self.lm, self.site, self.tokens, self.prompts, self.opts = lm, site, tokens, list(prompts), opts
        self._gen = torch.Generator().manual_seed(opts.seed)
        self._cache: list[torch.Tensor] | None = []
        self._cache_complete = False
        self._sample: list[torch.Tensor] = []  # the first rows streamed, kept to measure the fit on training rows
        self._sampled = 0
        self.rows_per_epoch = 0  # once the first pass completed
        self.drawn = 0  # rows handed to the trainer (its norm estimate's batches included)

    def one_pass(self, prompts: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        """The site's rows, batch of prompts by batch of prompts (first tokens dropped if ``skip_first``)."""
        buf = Buffer()
        order = self.prompts if prompts is None else list(prompts)
        for _ in forward_batches(self.lm, self.tokens, {self.site: [buf]}, batch_size=self.opts.prompt_batch,
                                 prompt_order=order):
            p = buf.take()
            if p is None:
                continue
            rows = p.values
            if self.opts.skip_first:
                rows = rows[self.tokens.position[p.tokens.cpu()] > 0]
            if rows.numel():
                yield rows.float().cpu()

    def _epoch(self) -> Iterator[torch.Tensor]:
        if self._cache_complete:
            yield self._cache[0]
            return
        kept = 0
        for rows in self.one_pass():
            kept += rows.shape[0]
            if self._sampled < SAMPLE_ROWS:
                self._sample.append(rows[:SAMPLE_ROWS - self._sampled])
                self._sampled += self._sample[-1].shape[0]
            if self._cache is not None:
                if kept <= self.opts.cache_rows:
                    self._cache.append(rows)
                else:
                    self._cache = None  # one epoch is too big to keep: stream every epoch
            yield rows
        self.rows_per_epoch = kept
        if self._cache is not None and self._cache:
            self._cache, self._cache_complete = [torch.cat(self._cache)], True

    def training_sample(self) -> torch.Tensor | None:
        """The first (up to ``SAMPLE_ROWS``) training rows streamed: rows the trainer read when a pass
        completed; otherwise some of them may not have reached it (None before any row)."""
        return torch.cat(self._sample) if self._sample else None

    def passes(self) -> float | None:
        """Passes over the training rows the trainer drew (None while the first pass is not complete)."""
        return self.drawn / self.rows_per_epoch if self.rows_per_epoch else None

    def __iter__(self) -> Iterator[torch.Tensor]:
        bs, pool_rows = self.opts.batch_size, 8 * self.opts.batch_size
        pool = torch.empty(0, 0)
        while True:
            got = False
            for rows in self._epoch():
                got = True
                pool = rows if pool.numel() == 0 else torch.cat([pool, rows])
                if pool.shape[0] >= pool_rows:
                    pool = yield from self._deal(pool)
            if not got:
                raise WorkbenchError(f"no activations at {self.site} in the training prompts ("
                                     + ("no token of them is routed to this expert; more or other prompts"
                                        if self.site.component.value == "expert" else "all prompts too short?") + ")")
            if pool.shape[0] >= bs:  # epoch boundary: flush what is there, keep the remainder
                pool = yield from self._deal(pool)

    def _deal(self, pool: torch.Tensor):
        """Shuffle ``pool``, hand out its whole batches (counted in ``drawn``); return the rest."""
        bs = self.opts.batch_size
        pool = pool[torch.randperm(pool.shape[0], generator=self._gen)]
        n = pool.shape[0] // bs
        for i in range(n):
            self.drawn += bs
            yield pool[i * bs:(i + 1) * bs]
        return pool[n * bs:]


@torch.no_grad()
def evaluate(sae, acts: torch.Tensor, batch: int = 4096) -> dict:
    """Explained variance (1 - sum |x - x_hat|^2 / sum |x - mean x|^2, SAELens' definition), L0, MSE, dead features."""
    if acts.shape[0] == 0:
        raise WorkbenchError("no activations to evaluate the SAE on")
    acts = acts.float()
    mean = acts.mean(0)
    err = tot = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for i in range(0, acts.shape[0], batch):
        x = acts[i:i + batch].to(sae.device)
        f = sae.encode(x.to(sae.dtype))
        x_hat = sae.decode(f).float()
        err += float((x - x_hat).pow(2).sum())
        tot += float((x - mean.to(x.device)).pow(2).sum())
        l0 += float((f != 0).sum())
        fired |= (f != 0).any(0).cpu()
    n = acts.shape[0]
    return {"explained_variance": 1.0 - err / tot if tot > 0 else float("nan"), "l0": l0 / n, "mse": err / n,
            "dead_features": int((~fired).sum()), "tokens": n}


def _trainer_class():
    from sae_lens import SAETrainer

    class RecordingTrainer(SAETrainer):
        """SAELens' trainer, recording each step's total loss, MSE and explained variance (scaled units)."""

        history: list[tuple[float, float, float]]

        def step(self, batch):
            out = super().step(batch)
            with torch.no_grad():
                x, x_hat = out.sae_in.float(), out.sae_out.float()
                ev = 1 - float((x - x_hat).pow(2).sum()) / max(float((x - x.mean(0)).pow(2).sum()), 1e-30)
            self.history.append((float(out.loss.detach()), float(out.losses["mse_loss"].detach()), ev))
            return out

    return RecordingTrainer


def _build_sae(lm, site: Site, d_in: int, opts: TrainOptions, source: str):
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(model_name=lm.spec, hook_name=hook_name(site), workbench_site=site.key,
                       context_size=opts.max_tokens, prepend_bos=False, dataset_path=source,
                       model_class_name=type(lm.model).__name__)
    d_sae = opts.d_sae or opts.expansion * d_in
    common = dict(d_in=d_in, d_sae=d_sae, normalize_activations="expected_average_only_in", metadata=meta)
    torch.manual_seed(opts.seed)
    if opts.architecture == "topk":
        if opts.k > d_sae:
            raise WorkbenchError(f"--k {opts.k} is larger than the SAE ({d_sae} features)")
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=opts.k, **common))
    return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=opts.l1_coefficient, **common))


def train_sae(lm, site: Site | str, prompts: Sequence[str], opts: TrainOptions = TrainOptions(),
              out_dir: str | Path | None = None, source: str = "workbench/data/prompts.txt", progress: bool = True):
    """Train an SAE at ``site`` on ``prompts``; save it (SAELens format) and ``metrics.json`` in ``out_dir``.

    Returns ``(sae, metrics)``; ``sae`` is the SAELens training SAE with the activation scale folded in,
    so it reads the model's raw activations. ``progress=False``: no progress bars (SAELens' either).
    """
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig

    if not isinstance(opts, TrainOptions):
        raise WorkbenchError(f"opts must be a TrainOptions, not {type(opts).__name__}"
                             + (": TrainOptions(**opts)" if isinstance(opts, dict) else ""))
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():  # (found after training)
        raise WorkbenchError(f"out_dir {out_dir} is a file, not a folder")
    opts.check()
    d_in = int(lm.config.hidden_size)
    site = check_fit(lm, site, d_in, f"SAE training on {lm.spec}")
    start = time.perf_counter()
    tokens = Tokens.of(lm, prompts, opts.max_tokens)
    every = opts.holdout_every
    held = [i for i in range(len(tokens.ids)) if every and i % every == every - 1]
    train = [i for i in range(len(tokens.ids)) if i not in set(held)]
    stream = ActivationStream(lm, site, tokens, train, opts)
    steps = opts.tokens // opts.batch_size
    cfg = SAETrainerConfig(total_training_samples=opts.tokens, train_batch_size_samples=opts.batch_size, lr=opts.lr,
                           lr_end=opts.lr / 10, lr_warm_up_steps=min(50, steps // 10),
                           lr_decay_steps=steps // 5, dead_feature_window=max(20, min(1000, steps // 8)),
                           feature_sampling_window=max(1, min(2000, steps)), device=str(lm.device),
                           n_batches_for_norm_estimate=min(20, max(1, steps)),
                           logger=LoggingConfig(log_to_wandb=False))
    sae = _build_sae(lm, site, d_in, opts, source)
    provider = iter(stream)
    trainer = _trainer_class()(cfg=cfg, sae=sae, data_provider=provider)
    trainer.history = []
    t0 = time.perf_counter()
    try:
        with _bars(progress):
            # SAELens' fit opens its training bar, then estimates the activations' norm (20 batches of model forwards)
            # under it, so the bar's clock ran through the estimate and its first rate and ETA were wrong. The same
            # estimate, from the same stream, made first: fit skips its own once the scale is set.
            if sae.cfg.normalize_activations == "expected_average_only_in":
                trainer.activation_scaler.estimate_scaling_factor(
                    d_in=sae.cfg.d_in, data_provider=provider,
                    n_batches_for_norm_estimate=cfg.n_batches_for_norm_estimate)
            sae = trainer.fit()
    finally:
        # a pass stopped part-way keeps its forward's hooks installed until its generator is closed; a later
        # forward (the evaluation's) would meet them
        provider.close()
    train_seconds = time.perf_counter() - t0
    sae.eval()
    eval_rows = list(stream.one_pass(held)) if held else []
    split = "held-out prompts"
    if not eval_rows:  # an expert the held-out prompts route no token to: measured on the training rows, said
        if held:
            warnings.warn(f"no held-out token reaches {site} (no held-out prompt routes one to it): the fit is "
                          "measured on the training prompts", stacklevel=2)
        eval_rows, split = list(stream.one_pass(train)), "training prompts"
    metrics = evaluate(sae, torch.cat(eval_rows))
    train_sample = stream.training_sample()
    hist = trainer.history
    head = hist[: max(1, len(hist) // 20)]
    tail = hist[-max(1, len(hist) // 20):]
    metrics = {
        "explained_variance": metrics["explained_variance"], "l0": metrics["l0"], "mse": metrics["mse"],
        "dead_features": int(sae.cfg.metadata.get("num_dead_features", -1)),
        "silent_on_eval": metrics["dead_features"], "eval_tokens": metrics["tokens"],
        "eval_split": split,
        "train_explained_variance": evaluate(sae, train_sample)["explained_variance"] if train_sample is not None
        else float("nan"),
        "loss_first": _mean(h[0] for h in head), "loss_last": _mean(h[0] for h in tail),
        "mse_first": _mean(h[1] for h in head), "mse_last": _mean(h[1] for h in tail),
        "step_explained_variance_first": _mean(h[2] for h in head), "step_explained_variance_last": _mean(h[2] for h in tail),
        "steps": trainer.n_training_steps, "tokens_trained": trainer.n_training_samples,
        "passes": None if stream.passes() is None else round(stream.passes(), 3),
        "corpus_tokens": stream.rows_per_epoch or None, "train_prompts": len(train),
        "heldout_prompts": len(held), "seconds_train": round(train_seconds, 2),
        "seconds_total": round(time.perf_counter() - start, 2), "threads": torch.get_num_threads(),
        "model": lm.spec, "model_dtype": lm.dtype_name,
        "site": site.key, "hook_name": hook_name(site), "d_in": d_in, "d_sae": sae.cfg.d_sae,
        "architecture": opts.architecture, "options": asdict(opts),
        "trainer": {"dead_feature_window": cfg.dead_feature_window, "lr_warm_up_steps": cfg.lr_warm_up_steps,
                    "lr_decay_steps": cfg.lr_decay_steps, "feature_sampling_window": cfg.feature_sampling_window},
    }
    broken = [n for n, p in sae.named_parameters() if not bool(torch.isfinite(p).all())]
    if broken or not math.isfinite(metrics["mse"]):  # an SAE of inf / NaN weights reads nothing: not written
        raise WorkbenchError(f"training diverged (explained variance {metrics['explained_variance']:.3g}, mse "
                             f"{metrics['mse']:.3g}" + (f", non-finite {', '.join(broken)}" if broken else "")
                             + f"); nothing written: a lower --lr (now {opts.lr:g}) keeps it stable")
    if out_dir is not None:
        save(sae, metrics, out_dir)
    return sae, metrics


@contextlib.contextmanager
def _bars(show: bool):
    """SAELens' progress bars (its trainer's and its norm estimate's), or none while this lasts."""
    if show:
        yield
        return
    import functools

    from sae_lens.training import activation_scaler, sae_trainer

    saved = [(m, m.tqdm) for m in (activation_scaler, sae_trainer)]
    try:
        for m, bar in saved:
            m.tqdm = functools.partial(bar, disable=True)
        yield
    finally:
        for m, bar in saved:
            m.tqdm = bar


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def save(sae, metrics: dict, out_dir: str | Path) -> Path:
    """Write the SAE (SAELens' ``save_inference_model``) and metrics.json; files appear complete or not at all."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sae-", dir=out))
    try:
        sae.save_inference_model(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(out / "metrics.json", metrics)
    return out
