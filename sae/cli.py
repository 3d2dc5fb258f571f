"""``workbench sae train|features``: wired into workbench/cli.py with :func:`add_sae_parser`."""

from __future__ import annotations

import argparse
import re
import sys

from workbench.args import COUNT, COUNT_OR_OFF, SEED, Number
from workbench.errors import WorkbenchError, few
from workbench.io import output_dir


def _prompts(args) -> tuple[list[str], str]:
    from workbench.data import DATA_DIR, check_prompts, default_prompts, read_prompts

    if args.prompts and args.text is not None:
        raise WorkbenchError("give --prompts FILE or --text, not both")
    if args.text is not None:
        return check_prompts(args.text), "--text"
    if args.prompts:
        return read_prompts(args.prompts), str(args.prompts)
    return default_prompts(), str(DATA_DIR / "prompts.txt")


def _experts(text: str) -> list[tuple[int, int]]:
    out = []
    for part in [t.strip() for t in text.split(",") if t.strip()]:
        m = re.fullmatch(r"L?(\d+)(?::|\.E)(\d+)", part)
        if not m:
            raise argparse.ArgumentTypeError(f"expected LAYER:EXPERT pairs like 3:5,3:7 (or L3.E5), got {part!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", help="text file, one prompt per line (default: the built-in prompt set)")
    p.add_argument("--text", action="append", help="a prompt (repeatable)")
    p.add_argument("--max-tokens", type=COUNT, default=128, help="truncate each prompt to this many tokens")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (CUDA where there is one); default cpu")
    p.add_argument("--out", required=True, help="output folder")


def add_sae_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("sae", help="train SAELens SAEs and read experts / circuit nodes through their features",
                              description="Sparse autoencoders (SAELens) on workbench models: train one at a site, "
                                          "or rank the SAE features each expert or circuit node raises.")
    sub = s.add_subparsers(dest="sae_command", metavar="SAE_COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train a small SAE at a site with SAELens' trainer",
                       description="Stream SITE's activations of MODEL over the prompts (the built-in corpus by "
                                   "default; every --holdout-every-th prompt held out) into SAELens' SAETrainer and "
                                   "save the SAE in SAELens' format (cfg.json + sae_weights.safetensors) with "
                                   "metrics.json (held-out explained variance, L0, dead features, time).")
    t.add_argument("model", help="model spec (see `workbench models`)")
    t.add_argument("--site", required=True, help="site key, e.g. L6.resid_post, L2.mlp_out, L1.expert.E5")
    t.add_argument("--tokens", type=COUNT, default=150_000,
                   help="activation vectors to train on (the corpus repeats; default 150000)")
    t.add_argument("--architecture", choices=["topk", "standard"], default="topk",
                   help="topk: --k active features per token (default); standard: ReLU with an --l1 penalty")
    t.add_argument("--expansion", type=COUNT, default=4, help="d_sae = EXPANSION x d_in (default 4)")
    t.add_argument("--d-sae", type=COUNT, default=None, help="number of features (overrides --expansion)")
    t.add_argument("--k", type=COUNT, default=32, help="topk: active features per token (default 32)")
    t.add_argument("--l1", type=Number(float, 0), default=5.0, help="standard: L1 coefficient (default 5)")
    t.add_argument("--lr", type=Number(float, 0, open_low=True), default=1e-3,
                   help="learning rate (default 1e-3)")
    t.add_argument("--batch-size", type=COUNT, default=1024, help="activation vectors per step (default 1024)")
    t.add_argument("--prompt-batch", type=COUNT, default=16, help="prompts per forward pass (default 16)")
    t.add_argument("--holdout-every", type=COUNT_OR_OFF, default=10, help="hold out every N-th prompt for evaluation "
                                                                 "(0: evaluate on the training prompts)")
    t.add_argument("--keep-first", action="store_true",
                   help="keep each prompt's first token (dropped by default: massive activations / attention sink)")
    t.add_argument("--seed", type=SEED, default=0,
                   help="seed of the SAE's initialisation and of the activations' shuffling (default 0)")
    t.add_argument("--quiet", action="store_true", help="no progress bars (SAELens' training bar and norm estimate)")
    _common(t)
    t.set_defaults(func=cmd_train)

    f = sub.add_parser("features", help="SAE features raised by each expert (or circuit node), with top tokens",
                       description="For each expert (default: every routed expert / dense MLP whose output reaches "
                                   "the SAE's site; or --experts, or the top experts of --profile) rank the SAE "
                                   "features by the mean of act(x) - act(x - c) over the tokens it wrote c on. "
                                   "Writes OUT/expert_features.parquet|csv|png|json and feature_tokens.parquet|csv. "
                                   "With --circuit: the same for the circuit's heads, MLPs and experts, written as "
                                   "node_features.* and OUT/circuit.json / circuit.graphml with the features as node attributes.")
    f.add_argument("model", help="model spec (see `workbench models`)")
    f.add_argument("--sae", required=True, help="SAE folder in SAELens' format (cfg.json + sae_weights.safetensors)")
    f.add_argument("--site", default=None, help="attach the SAE here instead of its own hook (site key)")
    which = f.add_mutually_exclusive_group()
    which.add_argument("--experts", type=_experts, default=None, help="LAYER:EXPERT pairs, e.g. 3:5,3:7")
    which.add_argument("--profile", default=None, help="profile.json from `workbench profile`: use its top experts")
    which.add_argument("--circuit", default=None, help="circuit.json from `workbench circuit`: rank its nodes")
    f.add_argument("--top-experts", type=COUNT, default=10, help="with --profile: how many experts (default 10)")
    f.add_argument("--top", type=COUNT, default=5, help="features kept per expert / node (default 5)")
    f.add_argument("--top-tokens", type=COUNT, default=8, help="top activating tokens kept per feature (default 8)")
    f.add_argument("--batch-size", type=COUNT, default=8, help="prompts per forward pass (default 8)")
    f.add_argument("--keep-first", action="store_true", help="include each prompt's first token (left out by "
                                                               "default, as in `sae train`)")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    _common(f)
    f.set_defaults(func=cmd_features)
    return s


def cmd_train(args) -> int:
    from workbench.models.specs import load
    from workbench.sae.train import TrainOptions, train_sae
    from workbench.tracing.sites import Site

    prompts, source = _prompts(args)  # reject bad input before loading a model
    site = Site.from_key(args.site)
    opts = TrainOptions(tokens=args.tokens, architecture=args.architecture, expansion=args.expansion, d_sae=args.d_sae,
                        k=args.k, l1_coefficient=args.l1, lr=args.lr, batch_size=args.batch_size,
                        prompt_batch=args.prompt_batch, max_tokens=args.max_tokens, holdout_every=args.holdout_every,
                        skip_first=not args.keep_first, seed=args.seed)
    opts.check()
    out = output_dir(args.out, command="sae train")
    lm = load(args.model, device=args.device)
    _, m = train_sae(lm, site, prompts, opts, out, source, progress=not args.quiet)
    corpus = (f"{m['passes']:.3g} passes over the {m['corpus_tokens']} tokens of {m['train_prompts']} prompts, the "
              "norm estimate's included" if m["passes"] is not None else
              f"less than one pass over the tokens of {m['train_prompts']} prompts")
    print(f"trained a {m['architecture']} SAE ({m['d_in']} -> {m['d_sae']} features) at {m['site']} of {m['model']} "
          f"on {m['tokens_trained']} activations ({corpus}), "
          f"{m['steps']} steps in {m['seconds_train']:.1f} s "
          f"({m['seconds_total']:.1f} s in all, {m['threads']} threads)")
    print(f"explained variance {m['explained_variance']:.4f} on {m['eval_tokens']} tokens of {m['eval_split']} "
          f"(training tokens: {m['train_explained_variance']:.4f}); L0 {m['l0']:.2f}; "
          f"dead features {m['dead_features']}/{m['d_sae']} (SAELens: silent for the last "
          f"{m['trainer']['dead_feature_window']} steps); training MSE (normalised units) {m['mse_first']:.4g} -> {m['mse_last']:.4g}")
    print(f"wrote {out / 'cfg.json'}, sae_weights.safetensors (SAELens format) and metrics.json")
    return 0


def cmd_features(args) -> int:
    from workbench.sae.features import (annotate_circuit, expert_features, node_features, profile_ranking, reaching,
                                        write_report)
    from workbench.sae.loading import load_sae, read_config, resolve_site
    from workbench.tracing.sites import Site

    prompts, _ = _prompts(args)
    read_config(args.sae)
    site = Site.from_key(args.site) if args.site else None
    circuit = experts = ranked = None
    if args.circuit:
        from workbench.circuits.export import read_json

        circuit = read_json(args.circuit)
    elif args.profile:
        ranking = profile_ranking(args.profile)  # read (and reject) before loading the model; chosen below
        ranked = [(layer, e) for layer, e, kind in ranking if kind != "shared"]
    else:
        experts = args.experts
    out = output_dir(args.out)
    from workbench.models.specs import load

    lm = load(args.model, device=args.device)
    sae = load_sae(args.sae, device=args.device)
    if ranked is not None:  # the profile's top experts among those that write into the SAE's site
        into = resolve_site(lm, sae, site)
        experts = reaching(ranked, into)[:args.top_experts]
        if not experts:
            raise WorkbenchError(f"none of the {len(ranked)} experts of {args.profile} writes into site {into} "
                                 "directly (an expert reaches resid_post of its layer and later residual sites)")
        top = ranking[:args.top_experts]
        passed = [f"L{l}.E{e}" for l, e, kind in top if kind != "shared" and (l, e) not in experts]
        shared = [f"L{l}.S{e}" for l, e, kind in top if kind == "shared"]
        why = ([f"{len(passed)} do not write into {into} directly ({few(passed)}: later layers)"] if passed else []) \
            + ([f"{len(shared)} are shared experts, not writers yet ({few(shared)})"] if shared else [])
        if why:  # said with --quiet too: which experts were read is the result
            print(f"warning: of the profile's top {args.top_experts} experts, " + "; ".join(why) + "; the next "
                  "experts that write into the site take their places", file=sys.stderr)
    kw = dict(site=site, top=args.top, top_tokens=args.top_tokens, batch_size=args.batch_size,
              max_tokens=args.max_tokens, skip_first=not args.keep_first, progress=not args.quiet)
    if circuit is not None:
        from workbench.circuits.export import write_graphml
        from workbench.circuits.export import write_json as write_circuit

        attrs, report = node_features(lm, sae, circuit, prompts, **kw)
        files = write_report(report, out, stem="node_features")
        annotated = annotate_circuit(circuit, attrs)
        files += [write_circuit(annotated, out / "circuit.json"), write_graphml(annotated, out / "circuit.graphml")]
    else:
        report = expert_features(lm, sae, prompts, experts, **kw)
        files = write_report(report, out)
    t = report.table
    print(f"{report.meta['writers']} writers into {report.meta['site']} of {lm.spec}, "
          f"{report.meta['scored_tokens']} tokens{' (first tokens left out)' if not args.keep_first else ''}; "
          "top feature per writer (mean activation raised):")
    for w, d in list(t.groupby("writer", sort=False))[:20]:
        r = d.iloc[0]
        print(f"  {w:<12} feature {int(r.feature):>6}  +{r.score:.4g}  raised on {r.frac_raised:.0%} of "
              f"{int(r.tokens)} tokens  top tokens: {r.top_tokens}")
    print(f"wrote {len(files)} files in {out}")
    return 0
