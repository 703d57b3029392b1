"""Where the time goes: ``python -m sds_exp.bench [options]`` (a benchmark, not a test).

Measures in one run, on the chosen model, calibration size and device: the machine's matmul peak per
dtype; calibration capture; statistics collection; each pruner's mask/update time; re-activation and
adjustment time (total and per layer); perplexity throughput (tokens/s and achieved FLOP/s against the
measured peak, fp32 and bf16 with the perplexity difference); and peak memory against the bound
"model + one block's activation streams + one block's Gram statistics + 1 GiB". Runs at two calibration
sizes to show which costs grow with tokens. Writes ``bench.json`` and ``bench.md`` and prints the ratios.

Everything comes from the job's own config (``conf/``, composed with :func:`sds_exp.compose.compose_config`):
``--model X`` is ``model=X``, ``--pruner`` the SDS run's ``pruner=``, ``--pruners`` the ``conf/pruner`` options
timed as plain one-shot prunes, and any trailing ``key=value`` (or ``-o key=value``) is a Hydra override, e.g.
``python -m sds_exp.bench --sizes 8,4 model=tiny_opt pruner.percdamp=0.1 sds.adjustment.damp=0.01``.

FLOP counts: a linear layer costs 2*in*out per token; causal attention 2*seqlen*d_attn per token and
layer (QK^T and AV over on average seqlen/2 keys). The matmul peak is the best of a few square products.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from sds_exp.compose import add_override_arguments, choices, compose_config, compose_for_command, options, override_key
from sds_exp.evaluation.perplexity import eval_token_ids, perplexity
from sds_exp.models.blocks import decoder_blocks, find_linears
from sds_exp.models.loading import DTYPES, resolve_dtype
from sds_exp.regularizers.norms import RegularizerSum
from sds_exp.sds.pipeline import run_sds
from sds_exp.sds.stages import prune_model
from sds_exp.sds.timing import PhaseTimer
from sds_exp.spec import SparsitySpec

log = logging.getLogger("sds_exp.bench")


def matmul_peak(dtype: torch.dtype, device: str, n: int = 2048, seconds: float = 2.0) -> float:
    """Best FLOP/s of repeated n x n x n products.

    The size grows from 256 to ``n`` only while the next one (8x the work) fits in ``seconds``: where a dtype has
    no fast kernel (bf16 on a CPU without AMX/AVX512-BF16 runs at ~0.1 GFLOP/s, 2 minutes a 2048 product) the
    measurement stays within its budget instead of taking minutes.
    """

    def product(size: int) -> float:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    size = min(256, n)
    while size < n and 8 * product(size) < seconds:
        size *= 2
    size = min(size, n)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - t))
    return best


def flops_per_token(model, seqlen: int) -> float:
    path, blocks = decoder_blocks(model)
    linear = sum(2 * lin.in_features * lin.out_features for lin in find_linears(blocks, path).values())
    head = model.get_output_embeddings()
    linear += 2 * head.in_features * head.out_features
    attn = find_linears(blocks[0], "")
    d_attn = next(lin.out_features for n, lin in attn.items() if n.endswith("q_proj"))
    return linear + len(blocks) * 2 * seqlen * d_attn


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PassMemory:
    """Peak resident memory of one pass above what was resident before it (Linux).

    Writing "5" to ``/proc/self/clear_refs`` resets the process's high-water mark (VmHWM) to its current
    RSS, so ``peak - before`` is the pass's own working set: streams, statistics, teacher copies,
    temporaries; not the model, the tokenizer or earlier garbage. ``gib`` stays None where /proc lacks it.
    """

    def __enter__(self) -> PassMemory:
        self.gib = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.before = None
            return self
        self.before = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kib("VmHWM")
        if self.before is not None and peak is not None:
            self.gib = (peak - self.before) / 2**20


def memory_bound_gib(model, nsamples: int, seqlen: int, act_bytes: int, with_model: bool = True) -> float:
    """model + 4 streams (dense/pruned x in/out) of one block + 3 Gram matrices per distinct input + 1 GiB."""
    params = sum(p.numel() * p.element_size() for p in model.parameters()) if with_model else 0
    hidden = model.config.hidden_size
    streams = 4 * nsamples * seqlen * hidden * act_bytes
    path, blocks = decoder_blocks(model)
    widths = {lin.in_features for lin in find_linears(blocks[0], "").values()}
    grams = sum(3 * 4 * w * w for w in widths) * 3  # q/k/v, o, gate/up, down: at most ~3 inputs per width
    return (params + streams + grams) / 2**30 + 1.0


def instantiate_regularizer(cfg: DictConfig) -> RegularizerSum | None:
    """The job's regulariser (``cfg.regularizer``, a mapping of terms), None when it has none."""
    reg = RegularizerSum({k: instantiate(v) for k, v in (cfg.regularizer or {}).items()})
    return reg or None


def calibration(cfg: DictConfig, tokenizer, **data_overrides):
    """The job's calibration windows (``cfg.data``), with e.g. ``nsamples=`` replaced."""
    return instantiate(cfg.data, **data_overrides)(tokenizer=tokenizer, data_dir=cfg.paths.data_dir, seed=cfg.seed)


def pruner_config(cfg: DictConfig, overrides: list[str], name: str, chosen: str):
    """The ``pruner=<name>`` node: the composed one for the chosen option, else composed afresh with the same
    overrides except those of ``pruner.*`` (they belong to the chosen pruner)."""
    from hydra.core.hydra_config import HydraConfig

    if name == chosen:
        return cfg.pruner
    keep = [o for o in overrides if override_key(o) != "pruner" and not override_key(o).startswith("pruner.")]
    saved = HydraConfig.instance().cfg
    try:
        return compose_config(keep + [f"pruner={name}"]).pruner
    finally:
        HydraConfig.instance().cfg = saved  # the benchmark's own choices again


def run(args, cfg: DictConfig | None = None, overrides: list[str] | None = None) -> dict:
    overrides = list(overrides if overrides is not None else bench_overrides(args))
    cfg = cfg if cfg is not None else compose_config(overrides, output_dir=args.out)
    chosen = choices()
    device, dtype, seqlen = cfg.device, resolve_dtype(cfg.dtype), int(cfg.data.seqlen)
    sizes = args.sizes or sorted({int(cfg.data.nsamples), max(1, int(cfg.data.nsamples) // 2)}, reverse=True)
    sds_pruner = chosen["pruner"]
    pruners = list(dict.fromkeys([*args.pruners, sds_pruner]))
    settings = {
        **vars(args),
        "sizes": sizes,
        "seqlen": seqlen,
        "pruners": pruners,
        "overrides": overrides,
        "choices": chosen,
        "device": device,
        "dtype": cfg.dtype,
        "sparsity": cfg.sparsity,
        "pattern": cfg.pattern,
        "data_dir": cfg.paths.data_dir,
        "steps": {"reactivate": cfg.sds.reactivate.steps, "adjustment": cfg.sds.adjustment.steps},
        "batch_size": cfg.calib_batch_size,
    }
    results: dict = {
        "settings": settings,
        "machine": {
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
    }
    spec = SparsitySpec.parse(cfg.sparsity, cfg.pattern)
    pruner_nodes = {
        name: pruner_config(cfg, overrides, name, sds_pruner) for name in pruners
    }  # unknown options fail here, early
    sds_config = instantiate(cfg.sds)
    regularizer = instantiate_regularizer(cfg)
    ignore = list(cfg.ignore)
    results["peak_flops"] = {name: matmul_peak(resolve_dtype(name), device) for name in ("float32", "bfloat16")}
    log.info("matmul peak: %s", {k: f"{v / 1e9:.0f} GFLOP/s" for k, v in results["peak_flops"].items()})
    lm = instantiate(cfg.model)
    base = lm.model.to(dtype)
    log.info("model %s (%s), %s, pruners %s, SDS with %s", lm.name, dtype, spec, ", ".join(pruners), sds_pruner)

    # perplexity throughput, fp32 and bf16
    ids = eval_token_ids("wikitext2", lm.tokenizer, cfg.paths.data_dir, seqlen)
    fpt = flops_per_token(base, seqlen)
    results["ppl"] = {}
    for name in ("float32", "bfloat16"):
        model = copy.deepcopy(base).to(resolve_dtype(name))
        r = perplexity(model, ids, seqlen, device, max_windows=args.eval_windows, desc=f"bench ppl {name}")
        tps = r.ntokens / r.seconds
        results["ppl"][name] = {
            "ppl": r.ppl,
            "windows": r.nwindows,
            "tokens_per_s": tps,
            "flops": fpt * tps,
            "fraction_of_peak": fpt * tps / results["peak_flops"][name],
        }
        del model
    results["ppl"]["bf16_vs_fp32_rel_diff"] = abs(
        results["ppl"]["bfloat16"]["ppl"] / results["ppl"]["float32"]["ppl"] - 1
    )

    results["sizes"] = {}
    for nsamples in sizes:
        calib = calibration(cfg, lm.tokenizer, nsamples=nsamples)
        size: dict = {}
        for pname in pruners:
            model, timer = copy.deepcopy(base), PhaseTimer()
            pruner = instantiate(pruner_nodes[pname])
            t = time.perf_counter()
            with PassMemory() as mem:
                prune_model(
                    model,
                    calib,
                    pruner,
                    spec,
                    device=device,
                    batch_size=cfg.calib_batch_size,
                    ignore=ignore,
                    timer=timer,
                )
            size[pname] = {"total_s": time.perf_counter() - t, **{k: v for k, v in timer.seconds.items()}}
            size[pname + "_pass_memory_gib"] = mem.gib
            log.info("%d samples, %s: %s", nsamples, pname, {k: round(v, 2) for k, v in size[pname].items()})
            del model
        model, timer = copy.deepcopy(base), PhaseTimer()
        sds_key = f"sds_{sds_pruner}"
        t = time.perf_counter()
        with PassMemory() as mem:
            result = run_sds(
                model,
                calib,
                instantiate(pruner_nodes[sds_pruner]),
                spec,
                sds_config,
                regularizer,
                device=device,
                batch_size=cfg.calib_batch_size,
                ignore=ignore,
                timer=timer,
            )
        size[sds_key + "_pass_memory_gib"] = mem.gib
        nlayers = max(1, len(result.masks))
        size[sds_key] = {
            "total_s": time.perf_counter() - t,
            **dict(timer.seconds),
            "per_layer_reactivate_optimise_s": timer.seconds.get("reactivate/optimise", 0.0) / nlayers,
            "per_layer_adjust_optimise_s": timer.seconds.get("adjust/optimise", 0.0) / nlayers,
        }
        log.info("%d samples, %s: %s", nsamples, sds_key, {k: round(v, 2) for k, v in size[sds_key].items()})
        del model
        results["sizes"][str(nsamples)] = size
    big = results["sizes"][str(max(sizes))]
    results["memory"] = {
        "peak_rss_gib": peak_rss_gib(),
        "bound_gib": memory_bound_gib(base, max(sizes), seqlen, base.dtype.itemsize),
        "sds_pass_gib": big[f"sds_{sds_pruner}_pass_memory_gib"],
        "pass_bound_gib": memory_bound_gib(base, max(sizes), seqlen, base.dtype.itemsize, with_model=False),
    }
    if torch.cuda.is_available():
        results["memory"]["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    results["ratios"] = ratios(results)
    return results


def _div(a: float, b: float) -> float | None:
    return a / b if b else None


def ratios(r: dict) -> dict:
    """The summary ratios; those of a pruner that was not run (or of a phase it has not) are left out."""
    big = r["sizes"][str(max(map(int, r["sizes"])))]
    sds_key = next(k for k, v in big.items() if k.startswith("sds_") and isinstance(v, dict))
    sds, plain = big[sds_key], big[sds_key.removeprefix("sds_")]

    def forward(phases: dict) -> float:
        return phases.get("prune/stats_forward", 0.0) + phases.get("prune/forward", 0.0)

    extra = sds["total_s"] - sum(
        sds.get(k, 0.0) for k in ("prune/capture", "prune/stats_forward", "prune/mask", "prune/forward")
    )
    out = {
        "ppl_fp32_fraction_of_peak": r["ppl"]["float32"]["fraction_of_peak"],
        "ppl_bf16_fraction_of_peak": r["ppl"]["bfloat16"]["fraction_of_peak"],
        "ppl_bf16_vs_fp32_rel_diff": r["ppl"]["bf16_vs_fp32_rel_diff"],
    }
    if "wanda" in big:
        out["wanda_mask_over_calib_forward"] = _div(big["wanda"]["prune/mask"], forward(big["wanda"]))
    if "sparsegpt" in big:
        out["sparsegpt_obs_over_calib_forward"] = _div(big["sparsegpt"]["prune/mask"], forward(big["sparsegpt"]))
    out["sds_extra_over_plain_prune"] = _div(extra, plain["total_s"])
    out["memory_peak_over_bound"] = r["memory"]["peak_rss_gib"] / r["memory"]["bound_gib"]
    if r["memory"].get("sds_pass_gib") is not None:
        out["sds_pass_memory_over_pass_bound"] = r["memory"]["sds_pass_gib"] / r["memory"]["pass_bound_gib"]
    if len(r["sizes"]) >= 2:
        lo, hi = sorted(map(int, r["sizes"]))[:2]
        a, b = r["sizes"][str(lo)][sds_key], r["sizes"][str(hi)][sds_key]
        out[f"forward_time_ratio_{hi}_vs_{lo}_samples"] = _div(forward(b), forward(a))
        if "reactivate/optimise" in a and "reactivate/optimise" in b:
            out[f"reactivate_optimise_ratio_{hi}_vs_{lo}_samples"] = _div(
                b["reactivate/optimise"], a["reactivate/optimise"]
            )
    return {k: v for k, v in out.items() if v is not None}


def markdown(r: dict) -> str:
    lines = [
        "# sds_exp benchmark",
        "",
        f"settings: `{json.dumps(r['settings'])}`",
        "",
        f"machine: {r['machine']}",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    for k, v in r["peak_flops"].items():
        lines.append(f"| matmul peak {k} | {v / 1e9:.0f} GFLOP/s |")
    for k in ("float32", "bfloat16"):
        p = r["ppl"][k]
        lines.append(
            f"| ppl eval {k} | ppl {p['ppl']:.4f} on {p['windows']} windows, {p['tokens_per_s']:.0f} tok/s, "
            f"{p['flops'] / 1e9:.0f} GFLOP/s = {100 * p['fraction_of_peak']:.0f}% of peak |"
        )
    for n, size in r["sizes"].items():
        for name, phases in size.items():
            if not isinstance(phases, dict):
                continue
            cells = ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
            lines.append(f"| {n} samples: {name} (s) | {cells} |")
    m = r["memory"]
    lines.append(
        f"| peak memory | {m['peak_rss_gib']:.2f} GiB RSS of the whole process (bound {m['bound_gib']:.2f} GiB) |"
    )
    if m.get("sds_pass_gib") is not None:
        lines.append(
            f"| SDS pass working set | {m['sds_pass_gib']:.2f} GiB above the resident model "
            f"(bound without the model {m['pass_bound_gib']:.2f} GiB) |"
        )
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in r["ratios"].items()]
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def bench_overrides(args) -> list[str]:
    """The Hydra overrides the flags stand for, then the passthrough ones (which win)."""
    o = []
    if args.model:
        o.append(f"model={args.model}")
    if args.pruner:
        o.append(f"pruner={args.pruner}")
    if args.device:
        o.append(f"device={args.device}")
    elif torch.cuda.is_available():
        o.append("device=cuda")
    if args.dtype:
        o.append(f"dtype={args.dtype}")
    if args.seqlen is not None:
        o.append(f"data.seqlen={args.seqlen}")
    if args.pattern is not None:
        o.append(f"pattern='{args.pattern}'")
    if args.steps is not None:
        o += [f"sds.reactivate.steps={args.steps}", f"sds.adjustment.steps={args.steps}"]
    if args.batch_size is not None:
        o.append(f"calib_batch_size={args.batch_size}")
    if args.data_dir is not None:
        o.append(f"paths.data_dir={args.data_dir}")
    return o + list(args.overrides) + list(args.extra_overrides)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sds_exp.bench",
        description=__doc__.splitlines()[0],
        epilog="Flags left out take the config's value (conf/config.yaml and its groups, conf/local/ where present).",
    )
    p.add_argument(
        "--model",
        help="a conf/model option, i.e. model=X (default: the config's, smollm2_135m); "
        f"options: {', '.join(options('model'))}",
    )
    p.add_argument("--pruner", help="pruner of the SDS run, i.e. pruner=X (default: the config's, wanda)")
    p.add_argument(
        "--pruners",
        default="magnitude,wanda,sparsegpt",
        type=_names,
        help=f"conf/pruner options timed as plain one-shot prunes (options: {', '.join(options('pruner'))})",
    )
    p.add_argument("--device", help="device=X (default: cuda when available, else the config's)")
    p.add_argument("--dtype", choices=list(DTYPES), help="dtype=X (default: the config's, float32)")
    p.add_argument(
        "--sizes",
        type=_ints,
        help="calibration sample counts to run (two sizes show the scaling; "
        "default: data.nsamples and half of it, 128,64)",
    )
    p.add_argument("--seqlen", type=int, help="data.seqlen=N, also the perplexity window (default: the config's, 2048)")
    p.add_argument("--pattern", default="2:4", help="pattern=X (default: 2:4)")
    p.add_argument(
        "--steps", type=int, help="sds.reactivate.steps and sds.adjustment.steps (default: the config's, 200)"
    )
    p.add_argument("--batch-size", type=int, help="calib_batch_size=N (default: the config's, 8)")
    p.add_argument("--eval-windows", default=8, type=int, help="perplexity windows timed per dtype")
    p.add_argument("--data-dir", help="paths.data_dir=X (default: the config's: $SDS_DATA_DIR, else ../shared/data)")
    p.add_argument("--out", default="outputs/bench")
    add_override_arguments(p)
    return p


def main(argv=None) -> None:
    p = parser()
    args = p.parse_intermixed_args(argv)
    overrides = bench_overrides(args)
    cfg = compose_for_command(p, overrides, output_dir=args.out)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args, cfg, overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "bench.md").write_text(markdown(result))
    lines = [f"{key}: {value:.4g}" for key, value in result["ratios"].items()]
    sys.stdout.write("\n".join(lines) + f"\nwrote {out / 'bench.json'} and {out / 'bench.md'}\n")


if __name__ == "__main__":
    main()
