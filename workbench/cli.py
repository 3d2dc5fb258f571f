"""The ``workbench`` command line: a thin layer over the Python API.

Every user error becomes one ``error: ...`` line and exit status 2 (``--debug`` shows the
traceback); nothing partial is left behind.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from pathlib import Path

from workbench.args import COUNT, COUNT_OR_OFF, Number, NumberList, Parser
from workbench.errors import WorkbenchError
from workbench.io import clear_stale_temps, output_dir
from workbench.report import announce

BATCH_ORDER_HELP = ("length (default): prompts of similar length share a batch (sorted within windows of 64 "
                    "batches), so less of each forward is padding; given: batches in the prompts' order. Results "
                    "are the same up to float rounding")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _model_args(p: argparse.ArgumentParser, placement: bool = False) -> None:
    """The flags of every subcommand that loads a model."""
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (CUDA when available); default cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                   help="cast the weights (default: as loaded, float32)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the checkpoint's own modelling code (off by default; only for checkpoints you trust)")
    if placement:
        p.add_argument("--device-map", choices=["auto"], default=None,
                       help="spread a local/hub checkpoint over all GPUs and the CPU with accelerate "
                            "(for models larger than one GPU)")
        p.add_argument("--offload", choices=["layers"], default=None,
                       help="layers: build the model on the meta device and run all prompts through one decoder "
                            "layer at a time, loading its weights from the safetensors files and freeing them after "
                            "(peak memory: one layer plus the activations of all prompts); local/hub checkpoints "
                            "and smollm2-135m")


def quiet_loading(args) -> None:
    """With ``--quiet``, transformers' weight-loading bar stays off too."""
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _load(args, device: str | None = None):
    from workbench.models.specs import load

    quiet_loading(args)
    if getattr(args, "offload", None):
        if getattr(args, "device_map", None):
            raise WorkbenchError("--offload layers and --device-map auto do not combine")
        from workbench.models.offload import load_streamed

        return load_streamed(args.model, device=device or args.device, dtype=args.dtype,
                             trust_remote_code=args.trust_remote_code)
    return load(args.model, device=device or args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                device_map=getattr(args, "device_map", None))


def cmd_models(args) -> int:
    from workbench.models.catalog import catalog

    rows = catalog()
    cols = ["spec", "architecture", "params", "layers", "experts", "shared", "top_k", "layout", "description"]
    table = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    for t in [cols, *table]:  # the last column unpadded: no trailing blanks
        print("  ".join(v.ljust(w) for v, w in zip(t[:-1], widths)) + "  " + t[-1])
    return 0


def _prompts(args) -> list[str]:
    from workbench.data import check_prompts, default_prompts, read_prompts

    if args.prompts and args.text is not None:
        raise WorkbenchError("give --prompts FILE or --text, not both")
    if args.text is not None:
        return check_prompts(args.text)
    return read_prompts(args.prompts) if args.prompts else default_prompts()


def cmd_trace(args) -> int:
    from workbench.io import write_json
    from workbench.tracing.report import trace_summary
    from workbench.tracing.runner import trace
    from workbench.tracing.sites import Component, all_sites

    prompts = _prompts(args)  # read (and reject) input before loading any model
    if not args.reducers and not args.dump:
        raise WorkbenchError("--reducers names no reducer; known: absmax, moments, log_histogram, expert_counts")
    args.components, args.reducers = list(dict.fromkeys(args.components)), list(dict.fromkeys(args.reducers))
    if args.layers is not None:
        args.layers = list(dict.fromkeys(args.layers))  # a layer named twice is one layer's sites
    for c in args.components:
        if c not in {x.value for x in Component}:
            raise WorkbenchError(f"unknown component {c!r}; known: {', '.join(x.value for x in Component)}")
    out = output_dir(args.out, command="trace")
    if args.dump:
        _check_dump_dir(args.dump)
    lm = _load(args)
    sites = all_sites(lm.adapter, lm.model, args.components, args.layers)
    for comp in ("q", "k", "v"):  # layers whose Q/K/V cannot be read are left out; none at all says why
        if comp in args.components and not any(s.component.value == comp for s in sites):
            from workbench.tracing.sites import qkv_unreadable

            layer = (args.layers or [0])[0]
            raise WorkbenchError(f"no {comp} sites: {qkv_unreadable(lm.adapter, lm.model, layer) or 'no layer chosen'}")
    many = args.layers is not None and len(args.layers) > 1
    scope = (f"layer{'s' if many else ''} {','.join(map(str, args.layers))} of {args.model} "
             f"{'have' if many else 'has'}") if args.layers else f"{args.model} has"
    dense = all(i.kind != "moe" for i in lm.layer_infos())
    no_moe = "no MoE layer" if not args.layers else "no MoE block (dense)"
    for comp, lacks in (("router", no_moe), ("experts", no_moe), ("shared_expert", "no shared expert")):
        if comp in args.components and not any(s.component.value == comp for s in sites):
            why = f"no {comp} sites: {scope} {lacks}" + (" (a dense model)" if dense else "")
            if not sites:
                raise WorkbenchError(why)
            print(f"warning: {why}; tracing the other components", file=sys.stderr)  # (one command for many models)
    result = trace(lm, prompts, sites, args.reducers, batch_size=args.batch_size, max_tokens=args.max_tokens,
                   dump_dir=args.dump, progress=not args.quiet, by_length=args.batch_order == "length")
    summary = trace_summary(result, lm.tokenizer)
    summary["meta"].update(components=args.components, reducers=args.reducers)
    path = write_json(out / "trace.json", summary)
    # the wall time in run.json, as profile's: trace.json is then the same bytes for the same run
    write_json(out / "run.json", {"seconds": round(result.seconds, 3), "device": str(lm.device)})
    print(f"traced {result.num_tokens} tokens of {len(prompts)} prompts through {len(sites)} sites "
          f"in {result.seconds:.1f} s")
    if summary["top_absmax"]:
        print("largest |activation| by site:")
        for p in summary["top_absmax"][:5]:
            print(f"  {p['site']:<18} {p['max_abs']:>12.4g}  channel {p['channel']:<5} "
                  f"prompt {p['prompt_index']} pos {p['position']} token {p['token_text']!r}")
    bad = non_finite_sites(summary["sites"])
    if bad:  # the table above shows an inf as a maximum and a site with NaN rows as clean
        first = bad[0]
        print(f"warning: non-finite activations at {len(bad)} site(s), first {first[0]}: {first[1]} NaN and "
              f"{first[2]} inf (counted; a NaN is never a maximum, an inf is one; see nan_count and inf_count in "
              "trace.json)", file=sys.stderr)
    print(f"wrote {path} and run.json (wall time)")
    if args.dump:
        print(f"wrote dump {Path(args.dump) / 'index.json'}")
    return 0


def non_finite_sites(sites: dict) -> list[tuple[str, int, int]]:
    """(site, NaN, inf) for each site of a trace summary where a reducer counted non-finite values, in layer order."""
    def total(v) -> int:  # a per-expert list, or one count
        return sum(v) if isinstance(v, list) else int(v)

    out = []
    for key, reducers in sites.items():
        counts = [r for r in reducers.values() if isinstance(r, dict) and "nan_count" in r]
        nan = max((total(r["nan_count"]) for r in counts), default=0)
        inf = max((total(r.get("inf_count", 0)) for r in counts), default=0)
        if nan or inf:
            out.append((key, nan, inf))
    return out


def _check_dump_dir(path: str) -> None:
    """``--dump DIR`` before any work: a folder that is writable, and empty or an earlier dump's
    (:func:`workbench.tracing.dump.check_dump_dir`)."""
    from workbench.tracing.dump import check_dump_dir

    check_dump_dir(output_dir(path, "--dump"), "--dump")


def cmd_profile(args) -> int:
    from workbench import distributed
    from workbench.experts.profile import ProfileOptions, profile
    from workbench.experts.report import OUTPUTS, write
    from workbench.experts.super_experts import SuperExpertRule, no_super_experts
    from workbench.models.specs import resolve_device
    from workbench.tracing.state import Checkpoint

    from workbench.experts.routing import parse_domains

    prompts = _prompts(args)
    domains = parse_domains(args.domains)  # read (and reject) every input before loading the model
    try:
        rule = SuperExpertRule(rule=args.rule, quantile=args.quantile, ratio=args.ratio,
                               layer_fraction=args.layer_fraction, median_factor=args.median_factor,
                               next_factor=args.next_factor, residual_factor=args.residual_factor)
    except ValueError as e:
        raise WorkbenchError(f"bad super-expert rule: {e}") from None
    if args.quantile <= 1:
        print(f"warning: --quantile is a percentile (0-100]: {args.quantile:g} is the {args.quantile:g}th percentile, "
              f"not the {100 * args.quantile:g}th", file=sys.stderr)
    out = output_dir(args.out, command="profile")
    shard, device = distributed.from_env(resolve_device(args.device))
    main_rank = shard is None or shard.is_main
    if args.offload and args.checkpoint_every:
        raise WorkbenchError("--offload layers cannot resume (--checkpoint-every): it runs every batch through one "
                             "layer at a time, so there is no batch cursor to save; drop --checkpoint-every")
    ckpt = None
    every = 25 if args.checkpoint_every is None else args.checkpoint_every  # 25 unless asked (off when streamed)
    if every and not args.offload:
        name = "profile.checkpoint" + (f".rank{shard.rank}of{shard.world}" if shard else "") + ".safetensors"
        ckpt = Checkpoint(out / name, every)
    clear_stale_temps(out, ([ckpt.path.name] if ckpt else []) + (list(OUTPUTS) if main_rank else []))
    lm = _load(args, device)
    opts = ProfileOptions(rule=rule, batch_size=args.batch_size, max_tokens=args.max_tokens,
                          top_massive=args.top_massive, sinks=not args.no_sinks, qk=args.qk, domains=domains,
                          vocab_predicted=args.vocab_predicted, by_length=args.batch_order == "length")
    p = profile(lm, prompts, opts, progress=not args.quiet and main_rank, checkpoint=ckpt, shard=shard)
    ok = False
    try:
        if main_rank:
            files = write(p, out, plots=not args.no_plots)
        ok = True
    finally:
        if shard is not None:
            ok = shard.agree(ok)  # every rank learns whether rank 0 wrote the outputs
            distributed.finish(shard)
    if not ok:
        raise WorkbenchError("rank 0 failed to write the outputs; checkpoints are kept for a rerun")
    if ckpt is not None:
        ckpt.discard()
    if not main_rank:
        return 0
    # an earlier run's checkpoints of another layout (other rank count, or checkpoints off now) resume nothing here
    world = shard.world if shard is not None else 1
    mine = {f"profile.checkpoint.rank{r}of{world}.safetensors" for r in range(world)} if world > 1 else \
        {"profile.checkpoint.safetensors"}
    old = [f for f in out.glob("profile.checkpoint*.safetensors") if not (ckpt is not None and f.name in mine)]
    for f in old:
        f.unlink(missing_ok=True)
    if old:
        print(f"removed {len(old)} checkpoint file(s) of an earlier run ({', '.join(sorted(f.name for f in old))})",
              file=sys.stderr)
    m = p["meta"]
    print(f"profiled {m['spec']}: {m['num_tokens']} tokens of {m['num_prompts']} prompts in {m['seconds']:.1f} s")
    if p["super_experts"]:
        print("super experts (largest first):")
        for e in p["super_experts"][:8]:
            print(f"  layer {e['layer']:>3} expert {e['expert']:>3} ({e['kind']})  max|out| {e['max_abs']:.4g}  "
                  f"channel {e['channel']}  prompt {e['prompt_index']} pos {e['position']} token {e['token']!r}")
    else:
        print(no_super_experts(p))
    nf = p["non_finite"]
    if nf["first_layer"] is not None:
        print(f"warning: non-finite activations from layer {nf['first_layer']}: {nf['expert_nan']} NaN and "
              f"{nf['expert_inf']} inf in the outputs of {nf['experts_affected']} experts, {nf['residual_nan']} NaN and "
              f"{nf['residual_inf']} inf in the residual stream (counted; a NaN is never a maximum, an inf is one; "
              "see non_finite in profile.json)", file=sys.stderr)
    massive = [l for l in p["massive_activations"]["layers"] if l["massive"]]
    if massive:
        l = massive[0]
        t = l["top"][0]
        print(f"massive activations from layer {l['layer']}: {t['value']:.4g} ({t['ratio_to_median']:.0f}x median) "
              f"in channel {t['channel']} at position {t['position']} ({t['token']!r})")
    if "attention_sinks" in p:
        import numpy as np

        share = np.array(p["attention_sinks"]["share_pos0"], dtype=float)
        skipped = p["attention_sinks"].get("no_attention", [])
        if np.isnan(share).all():
            why = ("no layer has softmax attention" if len(skipped) == len(share) else
                   "every prompt's attention was non-finite" if any(p["attention_sinks"].get("nonfinite_prompts", []))
                   else "no prompt has 2 tokens or more")
            print(f"attention sinks: not measured ({why})")
        else:
            l, h = np.unravel_index(np.nanargmax(share), share.shape)
            lost = [i for i in range(len(share)) if i not in skipped and np.isnan(share[i]).any()]
            left = p["attention_sinks"].get("nonfinite_prompts", [])
            part = [f"L{i}: {n}" for i, n in enumerate(left) if n and i not in lost]
            why = ([f"{len(skipped)} have no softmax attention"] if skipped else []) + (
                [f"layer(s) {', '.join(map(str, lost))} are NaN: non-finite activations there"] if lost else [])
            if part:
                print("warning: attention sinks: prompts with non-finite attention left out (" + ", ".join(part)
                      + "); the shares are over the rest", file=sys.stderr)
            learned = p["attention_sinks"].get("share_learned_sink")
            print(f"attention sinks: mean share on position 0 {np.nanmean(share):.2f}; strongest head L{l}.H{h} "
                  f"{share[l, h]:.2f}" + (f" (over {len(share) - len(skipped) - len(lost)} of {len(share)} layers: "
                                          f"{'; '.join(why)})" if why else "")
                  + (f"; the learned sinks take {np.nanmean(np.array(learned, dtype=float)):.2f} of the attention"
                     if learned else ""))
    from workbench.experts.qk import largest_dims

    dims = largest_dims(p.get("qk_values"))  # each projection's own place (the query's is often another head's)
    if dims:
        print("massive values in attention: largest top-dim / median ratio "
              + ", ".join(f"{proj} {where}" for proj, where in dims.items()))
    shown = sum(f.suffix in (".parquet", ".png", ".html") for f in files)
    print(f"wrote {out / 'profile.json'}, run.json and {shown} tables/plots in {out}")
    announce(out)
    return 0


def cmd_ablate(args) -> int:
    from workbench.studies import Study, summarise

    study = Study.from_file(args.study)  # a malformed study fails here, before any model work
    study.texts()  # and a missing or empty texts file
    out = output_dir(args.out, command="ablate")
    clear_stale_temps(out, ["results.*", "study.resolved.yaml"])  # what a killed run left half-written
    clear_stale_temps(out / "conditions", ["*.json"])
    lm = _load(args)
    df = study.run(lm, out, progress=not args.quiet)
    import pandas as pd

    table = summarise(df)
    if not table.empty:  # generations only: no numbers to tabulate
        with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 4):
            print(table)
    gens = df[df.metric == "generations"]
    for c, t in zip(gens.condition, gens.text):
        print(f"  [{c}] {t!r}")
    plot = ", results.png" if (out / "results.png").exists() else ""
    print(f"wrote {out / 'results.csv'}, results.parquet{plot} and study.resolved.yaml")
    announce(out)
    return 0


def cmd_contrast(args) -> int:
    from workbench.data import read_prompts
    from workbench.experts.contrast import contrast, write

    positive, negative = read_prompts(args.positive), read_prompts(args.negative)
    out = output_dir(args.out, command="contrast")
    lm = _load(args)
    df = contrast(lm, positive, negative, batch_size=args.batch_size, progress=not args.quiet)
    if min(len(positive), len(negative)) < 2:
        print(f"warning: Welch's test needs at least 2 prompts on each side ({len(positive)} positive, "
              f"{len(negative)} negative): p-values are NaN", file=sys.stderr)
    if not (df.freq_diff > 0).any():
        print(f"warning: no expert is routed more on the positive prompts; interventions.yaml still lists the top "
              f"{args.top} by frequency difference", file=sys.stderr)
    dtype = lm.dtype_name
    write(df, out, args.top, args.op, made_from=f"workbench contrast of {args.model} ({dtype} on {lm.device.type}): "
                                                f"{args.positive} vs {args.negative}")
    cols = ["rank", "layer", "expert", "freq_pos", "freq_neg", "freq_diff", "p_value", "q_value"]
    print(df[cols].head(args.top).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {out / 'contrast.csv'}, contrast.parquet, contrast.png and {out / 'interventions.yaml'} "
          f"(run it with: workbench ablate {args.model} --study {out / 'interventions.yaml'} --out DIR)")
    return 0


def cmd_routing(args) -> int:
    from workbench.experts.routing import routing, write
    from workbench.models.specs import expand_series, load, step_of

    prompts = _prompts(args)
    specs = [s for spec in args.checkpoints for s in expand_series(spec)]
    out = output_dir(args.out, command="routing")
    clear_stale_temps(out, ["routing.*"])
    quiet_loading(args)  # (each checkpoint is loaded here, not through _load)
    if not args.quiet:
        print(f"routing over {len(specs)} checkpoints (final: {specs[-1]}), {len(prompts)} prompts", file=sys.stderr)
    loaded: list = []

    def load_one(spec):
        lm = load(spec, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        loaded.append(lm)
        return lm

    r = routing(specs, prompts, load=load_one, batch_size=args.batch_size, max_tokens=args.max_tokens,
                progress=not args.quiet)
    if loaded:  # what the numbers were computed in, as profile.json and trace.json say
        r["dtype"], r["device"] = loaded[-1].dtype_name, str(loaded[-1].device)
    files = write(r, out, plots=not args.no_plots)
    head = f"{'layer':>5}  " + " ".join(f"{(str(s) if s is not None else c):>7}" for c, s in
                                         enumerate(step_of(x) for x in specs))
    print(f"router saturation (mean |top-k ∩ final top-k| / k) over {r['num_tokens']} "
          f"token{'s' if r['num_tokens'] != 1 else ''}, by checkpoint:")
    print(head)
    for layer in r["layers"]:
        print(f"{layer['layer']:>5}  " + " ".join(f"{v:7.3f}" for v in layer["saturation"]))
    print("change rate vs the previous checkpoint (first, last) and utilization (Jain, first -> final):")
    for layer in r["layers"]:
        cr = [v for v in layer["change_rate"] if v is not None]
        print(f"  L{layer['layer']}: change rate first {cr[0]:.3f} last {cr[-1]:.3f}; "
              f"utilization {layer['utilization'][0]:.3f} -> {layer['utilization'][-1]:.3f}")
    print(f"wrote {out / 'routing.json'}" + (", routing.parquet and routing.png" if len(files) > 2 else " and routing.parquet"))
    announce(out)
    return 0


def cmd_report(args) -> int:
    from workbench.report import report

    print(f"wrote {report(args.folder, args.out)}")
    return 0


def cmd_check(args) -> int:
    from workbench.check import report, run_checks

    return report(args.model, run_checks(_load(args)))


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="workbench", description="Look inside (MoE) language models and change them.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    m = sub.add_parser("models", help="list the built-in model specs")
    m.set_defaults(func=cmd_models)

    ck = sub.add_parser("check", help="does the workbench understand this model? one line per check, non-zero exit on a failure",
                        description="Load MODEL and run the battery the family coverage test runs: adapter (declared or "
                                    "read from the module tree), hooks fire and are read-only, dense MLP output, routing "
                                    "and block rebuilt (MoE), zero interventions exact, attention probabilities, circuit "
                                    "graph, cost per token.")
    ck.add_argument("model", help="model spec (see `workbench models`) or a local checkpoint folder")
    _model_args(ck)
    ck.set_defaults(func=cmd_check)

    t = sub.add_parser("trace", help="run prompts through a model and reduce activations at chosen sites",
                       description="Run prompts through MODEL once, reducing each site's activations with "
                                   "streaming reducers; write OUT/trace.json (and OUT/run.json: wall time). "
                                   "MODEL is smollm2-135m, zoo:NAME, "
                                   "a local save_pretrained directory or a hub id.")
    t.add_argument("model", help="model spec (see `workbench models`)")
    t.add_argument("--prompts", help="text file, one prompt per line (default: the built-in prompt set)")
    t.add_argument("--text", action="append", help="a prompt (repeatable)")
    t.add_argument("--components", type=_csv, default=["expert"],
                   help="comma-separated: resid_pre, resid_post, attn_out, mlp_out, router, expert, experts (a "
                        "MoE layer's routed experts in one site, each row tagged with its expert), shared_expert, "
                        "q, k, v (queries and keys after RoPE, values; heads side by side) "
                        "(default: expert, i.e. every expert's / dense MLP's down_proj output)")
    t.add_argument("--layers", type=NumberList(Number(int, 0)), default=None, help="comma-separated layer indices (default: all)")
    t.add_argument("--reducers", type=_csv, default=["absmax"],
                   help="comma-separated: absmax, moments, log_histogram, expert_counts (default: absmax)")
    t.add_argument("--batch-size", type=COUNT, default=8, help="prompts per forward pass (default 8)")
    t.add_argument("--batch-order", choices=("length", "given"), default="length",
                   help=BATCH_ORDER_HELP + " (--dump keeps the given order)")
    t.add_argument("--max-tokens", type=COUNT, default=None, help="truncate each prompt to this many tokens")
    t.add_argument("--dump", default=None, help="also stream full activations to safetensors shards in this folder")
    _model_args(t, placement=True)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--out", required=True, help="output folder (trace.json, run.json)")
    t.set_defaults(func=cmd_trace)
    pr = sub.add_parser("profile", help="super experts, router statistics, massive activations, attention sinks",
                        description="Run MODEL over the prompts once and write OUT/profile.json, parquet tables "
                                    "and PNG/HTML plots. Super experts follow Su et al.: in the first "
                                    "round(layer_fraction x layers) layers, max |down_proj output| above the "
                                    "QUANTILE-th percentile of all candidates and above floor(RATIO x the "
                                    "largest) (--rule paper); the default rule also needs the expert to stand "
                                    "out (>= MEDIAN_FACTOR x the median expert maximum and >= NEXT_FACTOR x "
                                    "the next one) and to feed a massive activation (residual in its channel "
                                    ">= RESIDUAL_FACTOR x the layer median).")
    pr.add_argument("model", help="model spec (see `workbench models`)")
    pr.add_argument("--prompts", help="text file, one prompt per line (default: the built-in prompt set)")
    pr.add_argument("--text", action="append", help="a prompt (repeatable)")
    pr.add_argument("--max-tokens", type=COUNT, default=None, help="truncate each prompt to this many tokens")
    pr.add_argument("--batch-size", type=COUNT, default=8, help="prompts per forward pass (default 8)")
    pr.add_argument("--batch-order", choices=("length", "given"), default="length", help=BATCH_ORDER_HELP)
    pr.add_argument("--quantile", type=Number(float, 0, 100, open_low=True), default=99.5,
                    help="a super expert's max must exceed this percentile (0-100] of all expert maxima (default 99.5)")
    pr.add_argument("--ratio", type=Number(float, 0, 1), default=0.1,
                    help="... and this fraction of the largest expert maximum (default 0.1)")
    pr.add_argument("--layer-fraction", type=Number(float, 0, 1, open_low=True), default=0.75,
                    help="super expert candidates come from the first round(FRACTION x layers) layers (default 0.75)")
    pr.add_argument("--rule", choices=("default", "paper"), default="default",
                    help="super-expert rule: paper (the reference script's selection) or default (paper + stands "
                         "out + feeds a massive activation); recorded in profile.json")
    pr.add_argument("--median-factor", type=Number(float, 1), default=10.0,
                    help="default rule: max >= this x the median expert maximum")
    pr.add_argument("--next-factor", type=Number(float, 1), default=3.0,
                    help="default rule: max >= this x the next expert's")
    pr.add_argument("--residual-factor", type=Number(float, 1), default=30.0,
                    help="default rule: residual in the expert's channel >= this x the layer median")
    pr.add_argument("--top-massive", type=COUNT, default=8, help="residual entries kept per layer")
    pr.add_argument("--no-sinks", action="store_true", help="skip attention sinks (keeps the model's attention kernel)")
    pr.add_argument("--qk", action=argparse.BooleanOptionalAction, default=True,
                    help="measure the norm of every query, key and value dimension per head (massive values in "
                         "attention, Jin et al. 2025): the qk_values section of profile.json (on by default; "
                         "--no-qk skips it)")
    pr.add_argument("--no-plots", action="store_true", help="no PNG figures")
    pr.add_argument("--vocab-predicted", action="store_true",
                    help="vocabulary specialization by the model's predicted next token too (runs the LM head)")
    pr.add_argument("--domains", action="append", metavar="NAME=FILE",
                    help="domain specialization: a prompts file per domain (repeat the flag); each domain runs "
                         "once more through the routers")
    pr.add_argument("--checkpoint-every", type=COUNT_OR_OFF, default=None, metavar="K",
                    help="save the reducer state every K batches to OUT (atomically); rerunning the same command "
                         "resumes from it; 0 turns it off (default 25; off with --offload layers, which cannot "
                         "resume)")
    _model_args(pr, placement=True)
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.add_argument("--out", required=True, help="output folder")
    pr.set_defaults(func=cmd_profile)
    co = sub.add_parser("contrast", help="rank experts routed more on positive than negative prompts",
                        description="Rank every (layer, expert) of MODEL by routing frequency on the POSITIVE "
                                    "prompts minus the NEGATIVE ones, with Welch's t-test over prompts; write "
                                    "OUT/contrast.csv|parquet|png and OUT/interventions.yaml (a study of the top K).")
    co.add_argument("model", help="model spec (an MoE model)")
    co.add_argument("--positive", required=True, help="text file, one prompt per line")
    co.add_argument("--negative", required=True, help="text file, one prompt per line")
    co.add_argument("--top", type=COUNT, default=10, help="experts in the ready intervention set")
    co.add_argument("--op", choices=["drop", "zero"], default="drop",
                    help="what interventions.yaml does to the top experts: drop them from routing (default) or "
                         "zero them")
    co.add_argument("--batch-size", type=COUNT, default=8, help="prompts per forward pass (default 8)")
    _model_args(co)
    co.add_argument("--quiet", action="store_true", help="no progress bar")
    co.add_argument("--out", required=True, help="output folder (contrast.csv, interventions.yaml)")
    co.set_defaults(func=cmd_contrast)
    ro = sub.add_parser("routing", help="router saturation, change rate and utilization across training checkpoints",
                        description="Run every CHECKPOINT (training order; the last is the final one) over the same "
                                    "prompts, one checkpoint in memory at a time, and write OUT/routing.json "
                                    "(per MoE layer: saturation and top-1 saturation against the final checkpoint, "
                                    "change rate against the previous one, utilization), routing.parquet and "
                                    "routing.png. zoo:tiny-moe@all names the built-in training series "
                                    "(built on first use, ~3 min).")
    ro.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="model specs or folders, in training order")
    ro.add_argument("--prompts", help="text file, one prompt per line (default: the built-in prompts)")
    ro.add_argument("--text", action="append", help=argparse.SUPPRESS)
    ro.add_argument("--batch-size", type=COUNT, default=8, help="prompts per forward pass (default 8)")
    ro.add_argument("--max-tokens", type=COUNT, default=None, help="truncate each prompt to this many tokens")
    ro.add_argument("--no-plots", action="store_true", help="no routing.png")
    _model_args(ro)
    ro.add_argument("--quiet", action="store_true", help="no progress bars")
    ro.add_argument("--out", required=True, help="output folder (routing.json, routing.parquet)")
    ro.set_defaults(func=cmd_routing)
    rp = sub.add_parser("report", help="one self-contained HTML page for a profile, study, circuit or routing folder",
                        description="Write FOLDER/report.html: the findings in sentences, the tables and every plot, "
                                    "one file that opens offline (no server, no script, no network request).")
    rp.add_argument("folder", help="an output folder of profile, ablate, circuit, routing or circuit-evolution")
    rp.add_argument("--out", default=None, help="where to write the page (default FOLDER/report.html)")
    rp.set_defaults(func=cmd_report)

    from workbench.circuits.cli import add_circuit_parser
    from workbench.circuits.diff import add_circuit_diff_parser
    from workbench.circuits.evolution import add_evolution_parser
    from workbench.kernels.reduce_dump import add_reduce_parser
    from workbench.sae.cli import add_sae_parser
    from workbench.ui.cli import add_ui_parser

    add_reduce_parser(sub)
    add_circuit_parser(sub)
    add_circuit_diff_parser(sub)
    add_evolution_parser(sub)
    add_ui_parser(sub)
    add_sae_parser(sub)

    ab = sub.add_parser("ablate", help="run a scripted ablation study (conditions x metrics)",
                        description="Run the conditions of STUDY (YAML/JSON; see workbench/studies.py) on MODEL and "
                                    "write OUT/results.csv, results.parquet, results.png, study.resolved.yaml. "
                                    "Finished conditions are kept in OUT/conditions/; re-running resumes.")
    ab.add_argument("model", help="model spec (see `workbench models`)")
    ab.add_argument("--study", required=True, help="study file (.yaml or .json)")
    _model_args(ab)
    ab.add_argument("--quiet", action="store_true", help="no progress bar")
    ab.add_argument("--out", required=True, help="output folder")
    ab.set_defaults(func=cmd_ablate)
    _debug_everywhere(p)
    return p


def _debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--debug`` after the command too (``workbench trace ... --debug``), not only before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                   help="show tracebacks on errors")
                _debug_everywhere(child)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        from workbench.distributed import env_int

        if env_int("WORLD_SIZE", 1) > 1 and args.command != "profile":
            raise WorkbenchError(f"only `workbench profile` runs under torchrun (several ranks), not {args.command}")
        return args.func(args)
    except WorkbenchError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a user error: still one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"error: internal error ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              "rerun with --debug for the traceback", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
