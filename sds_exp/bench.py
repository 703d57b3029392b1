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


@torch.no_grad()
def plain_loop_perplexity(model, ids: torch.Tensor, seqlen: int, device: str, max_windows: int | None) -> dict:
    """The Wanda/SparseGPT evaluation loop as their repositories write it (``eval_ppl_wikitext``): batch 1,
    full logits, ``CrossEntropyLoss`` over the shifted window, nll = loss * seqlen, ppl = exp(sum nll / tokens).
    Written here as the peer baseline of the throughput ratio; not the project's code path."""
    model.to(device)
    nwindows = ids.numel() // seqlen
    if max_windows is not None:
        nwindows = min(nwindows, max_windows)
    loss_fct = torch.nn.CrossEntropyLoss()
    nlls = []
    start = time.perf_counter()
    for i in range(nwindows):
        inputs = ids[i * seqlen : (i + 1) * seqlen].reshape(1, seqlen).to(device)
        logits = model(inputs).logits
        shift_logits = logits[:, :-1, :].contiguous()
        shift_labels = inputs[:, 1:]
        loss = loss_fct(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1))
        nlls.append(loss.float() * seqlen)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ppl = float(torch.exp(torch.stack(nlls).sum() / (nwindows * seqlen)))
    return {"ppl": ppl, "windows": nwindows, "seconds": seconds, "tokens_per_s": nwindows * seqlen / seconds}


def legacy_sds_config(config):
    """The SDS settings as they were before the cost work: iterative re-activation, no teacher cache, a fixed
    number of adjustment steps (same objective and hyperparameters: the numbers must agree)."""
    from dataclasses import replace

    return replace(
        config,
        reactivate=replace(config.reactivate, solver="iterative", prox_steps=0),
        adjustment=replace(config.adjustment, tol=0.0),
        cache_teacher=False,
    )


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


def teacher_cache_widths(model) -> list[int]:
    """Input widths of the first block's layer groups (q/k/v, o, gate/up, down): what a TeacherCache holds
    per token."""
    from sds_exp.models.blocks import capture_block_inputs
    from sds_exp.sds.sequential import layer_groups

    path, blocks = decoder_blocks(model)
    inputs = capture_block_inputs(model, torch.zeros(1, 8, dtype=torch.long), "cpu", 1)
    layers = find_linears(blocks[0], f"{path}.0")
    return [layers[group[0]].in_features for group in layer_groups(blocks[0], f"{path}.0", inputs)]


def memory_bound_gib(
    model, nsamples: int, seqlen: int, act_bytes: int, with_model: bool = True, teacher_cache: bool = False
) -> float:
    """model + 4 streams (dense/pruned x in/out) of one block + 3 Gram matrices per distinct input + 1 GiB,
    + the teacher's cached group inputs of one block when ``teacher_cache``."""
    params = sum(p.numel() * p.element_size() for p in model.parameters()) if with_model else 0
    hidden = model.config.hidden_size
    streams = 4 * nsamples * seqlen * hidden * act_bytes
    path, blocks = decoder_blocks(model)
    widths = {lin.in_features for lin in find_linears(blocks[0], "").values()}
    grams = sum(3 * 4 * w * w for w in widths) * 3  # q/k/v, o, gate/up, down: at most ~3 inputs per width
    cache = sum(teacher_cache_widths(model)) * nsamples * seqlen * act_bytes if teacher_cache else 0
    return (params + streams + grams + cache) / 2**30 + 1.0


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
    spec = SparsitySpec.from_config(cfg)
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
        # one untimed window first: the first forward of a fresh copy pays page faults and kernel set-up
        # (measured on CPU: 83 s for 8 windows cold, 11 s warm)
        perplexity(model, ids, seqlen, device, max_windows=1, desc=f"bench warm-up {name}")
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
    # the project's evaluation as a job runs it (its dtype and batch size) against the references' loop
    eval_batch = int(cfg.benchmark.ppl.batch_size) if cfg.get("benchmark") and cfg.benchmark.get("ppl") else 1
    model = copy.deepcopy(base)
    ours = perplexity(
        model, ids, seqlen, device, batch_size=eval_batch, max_windows=args.eval_windows, desc="bench ppl job"
    )
    plain = plain_loop_perplexity(model, ids, seqlen, device, args.eval_windows)
    del model
    results["ppl"]["job"] = {
        "dtype": cfg.dtype,
        "batch_size": eval_batch,
        "ppl": ours.ppl,
        "tokens_per_s": ours.ntokens / ours.seconds,
        "fraction_of_peak": fpt
        * ours.ntokens
        / ours.seconds
        / results["peak_flops"][str(dtype).removeprefix("torch.")],
    }
    results["ppl"]["plain_loop"] = {**plain, "dtype": cfg.dtype, "batch_size": 1}

    results["sizes"] = {}
    val_ids = eval_token_ids("wikitext2_val", lm.tokenizer, cfg.paths.data_dir, seqlen) if args.sds_eval else None
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
        variants = {f"sds_{sds_pruner}": sds_config}
        if args.legacy and nsamples == max(sizes):  # the ratios are read at the largest size
            variants[f"sds_{sds_pruner}_legacy"] = legacy_sds_config(sds_config)
        finals = {}
        for sds_key, config in variants.items():
            model, timer = copy.deepcopy(base), PhaseTimer()
            t = time.perf_counter()
            with PassMemory() as mem:
                result = run_sds(
                    model,
                    calib,
                    instantiate(pruner_nodes[sds_pruner]),
                    spec,
                    config,
                    regularizer,
                    device=device,
                    batch_size=cfg.calib_batch_size,
                    ignore=ignore,
                    timer=timer,
                )
            size[sds_key + "_pass_memory_gib"] = mem.gib
            nlayers = max(1, len(result.masks))
            steps = [r["adjust_steps"] for r in result.reports.get("reprune", {}).values() if "adjust_steps" in r]
            size[sds_key] = {
                "total_s": time.perf_counter() - t,
                **{f"stage/{k}": v for k, v in result.seconds.items()},
                **dict(timer.seconds),
                "per_layer_reactivate_optimise_s": timer.seconds.get("reactivate/optimise", 0.0) / nlayers,
                "per_layer_adjust_optimise_s": timer.seconds.get("adjust/optimise", 0.0) / nlayers,
                "adjust_steps_mean": sum(steps) / len(steps) if steps else 0.0,
                "adjust_steps_max": max(steps) if steps else 0.0,
                "reprune_loss_adjusted_mean": _mean(result.reports.get("reprune", {}), "loss_adjusted"),
                "reactivate_loss_after_mean": _mean(result.reports.get("reactivate", {}), "loss_after"),
            }
            log.info("%d samples, %s: %s", nsamples, sds_key, {k: round(v, 2) for k, v in size[sds_key].items()})
            if args.eval_windows and args.sds_eval:  # the final model's ppl: the cheap path must not cost quality
                # on the validation rows: settings (tol, prox_steps) are chosen on what this prints
                r = perplexity(model, val_ids, seqlen, device, max_windows=args.eval_windows, desc=f"bench {sds_key}")
                size[sds_key]["final_val_ppl"] = r.ppl
            finals[sds_key] = {n: layer.weight.detach().clone() for n, layer in find_linears(*_blocks(model)).items()}
            del model
        if len(finals) == 2:  # how far the cheap path's final weights are from the legacy path's
            a, b = finals.values()
            size["sds_vs_legacy_weight_rel_diff"] = max(
                float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-12)) for n in a
            )
        results["sizes"][str(nsamples)] = size
    big = results["sizes"][str(max(sizes))]
    results["memory"] = {
        "peak_rss_gib": peak_rss_gib(),
        "bound_gib": memory_bound_gib(base, max(sizes), seqlen, base.dtype.itemsize),
        "sds_pass_gib": big[f"sds_{sds_pruner}_pass_memory_gib"],
        "pass_bound_gib": memory_bound_gib(
            base, max(sizes), seqlen, base.dtype.itemsize, with_model=False, teacher_cache=sds_config.cache_teacher
        ),
        "teacher_cache_gib": sum(teacher_cache_widths(base)) * max(sizes) * seqlen * base.dtype.itemsize / 2**30
        if sds_config.cache_teacher
        else 0.0,
    }
    if torch.cuda.is_available():
        results["memory"]["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    # the peak again at the end, the best of both: a slow spell at the start (another process on the cores)
    # once put the fp32 peak below what the evaluation itself then achieved
    for name in list(results["peak_flops"]):
        results["peak_flops"][name] = max(results["peak_flops"][name], matmul_peak(resolve_dtype(name), device))
    for name in ("float32", "bfloat16"):
        p = results["ppl"][name]
        p["fraction_of_peak"] = p["flops"] / results["peak_flops"][name]
    job = results["ppl"]["job"]
    job["fraction_of_peak"] = fpt * job["tokens_per_s"] / results["peak_flops"][str(dtype).removeprefix("torch.")]
    results["ratios"] = ratios(results)
    return results


def _blocks(model):
    path, blocks = decoder_blocks(model)
    return blocks, path


def _mean(report: dict, key: str) -> float:
    vals = [r[key] for r in report.values() if key in r]
    return sum(vals) / len(vals) if vals else float("nan")


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

    def sds_cost(phases: dict) -> float:  # re-activate + re-prune + adjust: what SDS adds to the one-shot prune
        return phases.get("stage/reactivate", 0.0) + phases.get("stage/reprune", 0.0)

    def oneshot(phases: dict) -> float:  # the run's own first prune: same process state, code and data
        return phases.get("stage/prune") or plain["total_s"]

    out = {
        "sds_over_oneshot": _div(sds_cost(sds), oneshot(sds)),
        "sds_over_separate_oneshot_run": _div(sds_cost(sds), plain["total_s"]),
        "eval_over_plain_loop": _div(r["ppl"]["job"]["tokens_per_s"], r["ppl"]["plain_loop"]["tokens_per_s"]),
        "eval_fraction_of_peak": r["ppl"]["job"]["fraction_of_peak"],
        "eval_vs_plain_loop_ppl_rel_diff": abs(r["ppl"]["job"]["ppl"] / r["ppl"]["plain_loop"]["ppl"] - 1),
        "ppl_fp32_fraction_of_peak": r["ppl"]["float32"]["fraction_of_peak"],
        "ppl_bf16_fraction_of_peak": r["ppl"]["bfloat16"]["fraction_of_peak"],
        "ppl_bf16_vs_fp32_rel_diff": r["ppl"]["bf16_vs_fp32_rel_diff"],
    }
    if "wanda" in big:
        out["wanda_mask_over_calib_forward"] = _div(big["wanda"]["prune/mask"], forward(big["wanda"]))
    if "sparsegpt" in big:
        out["sparsegpt_obs_over_calib_forward"] = _div(big["sparsegpt"]["prune/mask"], forward(big["sparsegpt"]))
    out["sds_extra_over_plain_prune"] = _div(extra, plain["total_s"])
    legacy = big.get(sds_key + "_legacy")
    if isinstance(legacy, dict):
        out["legacy_sds_over_oneshot"] = _div(sds_cost(legacy), oneshot(legacy))
        out["sds_speedup_over_legacy"] = _div(sds_cost(legacy), sds_cost(sds))
        if "final_val_ppl" in sds and "final_val_ppl" in legacy:
            out["sds_vs_legacy_final_val_ppl_rel_diff"] = sds["final_val_ppl"] / legacy["final_val_ppl"] - 1
    if "sds_vs_legacy_weight_rel_diff" in big:
        out["sds_vs_legacy_weight_rel_diff"] = big["sds_vs_legacy_weight_rel_diff"]
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
    p.add_argument(
        "--legacy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run SDS the way it ran before the cost work (iterative re-activation, no teacher cache, "
        "fixed adjustment steps) in the same process, for the before/after ratios (default: on)",
    )
    p.add_argument(
        "--sds-eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate each SDS variant's final model on the --eval-windows windows (default: on)",
    )
    p.add_argument(
        "--sparse-kernels",
        action="store_true",
        help="only time 2:4 sparse kernels (torch.sparse.to_sparse_semi_structured) against dense on the model's "
        "linear shapes and end to end; on a CPU it says that no kernel exists and measures nothing",
    )
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sparse_kernels:
        from sds_exp import sparse_kernels

        info = sparse_kernels.availability(cfg.device)
        model = instantiate(cfg.model).model if info["available"] else None  # no load where nothing is measured
        result = sparse_kernels.run(model, cfg.device, resolve_dtype(cfg.dtype))
        (out / "sparse_kernels.json").write_text(json.dumps(result, indent=2, default=str))
        (out / "sparse_kernels.md").write_text(sparse_kernels.markdown(result))
        sys.stdout.write(sparse_kernels.markdown(result) + f"wrote {out / 'sparse_kernels.json'}\n")
        return
    result = run(args, cfg, overrides)
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "bench.md").write_text(markdown(result))
    lines = [f"{key}: {value:.4g}" for key, value in result["ratios"].items()]
    sys.stdout.write("\n".join(lines) + f"\nwrote {out / 'bench.json'} and {out / 'bench.md'}\n")


if __name__ == "__main__":
    main()
