"""The speed a 2:4 model actually gets: ``python -m sds_exp.bench --sparse-kernels``.

Times the model's own linear shapes dense (``F.linear``) against ``torch.sparse.to_sparse_semi_structured``
(the CUTLASS and cuSPARSELt backends where torch has them) at several token counts, then prefill and decode
end to end with every 2:4-prunable linear swapped for its semi-structured copy. The weights are a 2:4
magnitude prune of the model's own (the kernel's speed does not depend on which 2:4 mask). Needs CUDA on
compute capability >= 8.0 in fp16/bf16; elsewhere :func:`run` says so and measures nothing.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from sds_exp.models.blocks import decoder_blocks, find_linears
from sds_exp.pruners.masks import nm_mask

__all__ = ["availability", "run", "TOKENS"]

log = logging.getLogger(__name__)

TOKENS = (1, 16, 128, 2048)


def availability(device: str) -> dict:
    """Whether a 2:4 kernel can run on ``device``, with the reason when not and the backends when so."""
    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "available": False}
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        info["reason"] = (
            "no 2:4 sparse kernel exists for CPUs in torch (to_sparse_semi_structured needs CUDA, compute "
            "capability >= 8.0): nothing was measured"
        )
        return info
    cap = torch.cuda.get_device_capability(device)
    info.update(gpu=torch.cuda.get_device_name(device), capability=f"{cap[0]}.{cap[1]}")
    if cap < (8, 0):
        info["reason"] = f"compute capability {cap[0]}.{cap[1]} < 8.0: no semi-structured sparse tensor cores"
        return info
    try:
        from torch.sparse import SparseSemiStructuredTensor  # noqa: F401
    except ImportError as exc:
        info["reason"] = f"this torch has no semi-structured sparsity ({exc})"
        return info
    info["available"] = True
    info["backends"] = _backends()
    return info


def _backends() -> list[str]:
    backends = ["cutlass"]
    try:
        if torch.backends.cusparselt.is_available():
            backends.append("cusparselt")
    except AttributeError:
        pass
    return backends


def _use_backend(name: str) -> None:
    from torch.sparse import SparseSemiStructuredTensor

    SparseSemiStructuredTensor._FORCE_CUTLASS = name == "cutlass"


def _time(fn, repeats: int = 20) -> float:
    """Median seconds of ``fn()`` on CUDA (events), after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def _sparse_copy(weight: torch.Tensor):
    from torch.sparse import to_sparse_semi_structured

    pruned = weight * nm_mask(weight.abs().float(), 2, 4).to(weight.dtype)
    return to_sparse_semi_structured(pruned)


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    path, blocks = decoder_blocks(model)
    return sorted({(lin.out_features, lin.in_features) for lin in find_linears(blocks, path).values()})


@torch.no_grad()
def time_shapes(shapes, dtype: torch.dtype, device: str, backends: list[str], tokens=TOKENS) -> list[dict]:
    rows = []
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, dtype=dtype, device=device)
        for backend in backends:
            _use_backend(backend)
            try:
                ws = _sparse_copy(w)
            except Exception as exc:  # a shape the backend refuses (alignment): say so, keep going
                rows.append({"shape": [out_f, in_f], "backend": backend, "error": f"{type(exc).__name__}: {exc}"})
                continue
            for n in tokens:
                # the semi-structured kernels need the token count padded to their tile; time what a model pays
                x = torch.randn(n, in_f, dtype=dtype, device=device)
                dense = _time(lambda: F.linear(x, w))  # noqa: B023
                try:
                    sparse = _time(lambda: F.linear(x, ws))  # noqa: B023
                except Exception as exc:
                    rows.append({"shape": [out_f, in_f], "backend": backend, "tokens": n, "error": str(exc)})
                    continue
                rows.append(
                    {
                        "shape": [out_f, in_f],
                        "backend": backend,
                        "tokens": n,
                        "dense_s": dense,
                        "sparse_s": sparse,
                        "speedup": dense / sparse,
                    }
                )
    return rows


@torch.no_grad()
def swap_in_sparse(model: nn.Module) -> int:
    """Replace every decoder linear's weight by its 2:4 semi-structured copy; returns how many were swapped."""
    path, blocks = decoder_blocks(model)
    count = 0
    for lin in find_linears(blocks, path).values():
        if lin.in_features % 64 or lin.out_features % 32:  # the kernels' minimum alignment
            continue
        lin.weight = nn.Parameter(_sparse_copy(lin.weight.data), requires_grad=False)
        count += 1
    return count


@torch.no_grad()
def end_to_end(model: nn.Module, device: str, prefill_tokens: int = 2048, decode_tokens: int = 64) -> dict:
    """Prefill seconds for one ``prefill_tokens`` window, decode seconds per token with the KV cache."""
    ids = torch.randint(0, model.config.vocab_size, (1, prefill_tokens), device=device)

    def prefill():
        model(input_ids=ids, use_cache=False)

    prefill_s = _time(prefill, repeats=5)
    out = model(input_ids=ids[:, :128], use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    return {"prefill_s": prefill_s, "decode_s_per_token": (time.perf_counter() - start) / decode_tokens}


def run(model: nn.Module | None, device: str, dtype: torch.dtype) -> dict:
    """The whole measurement (or only the availability record where no kernel exists)."""
    info = availability(device)
    result = {"kernels": info}
    if not info["available"]:
        log.info("2:4 kernels: %s", info["reason"])
        return result
    if dtype not in (torch.float16, torch.bfloat16):
        log.info("2:4 kernels run in fp16/bf16; timing in bfloat16 instead of %s", dtype)
        dtype = torch.bfloat16
    result["dtype"] = str(dtype).removeprefix("torch.")
    model = model.to(device, dtype).eval()
    result["shapes"] = time_shapes(linear_shapes(model), dtype, device, info["backends"])
    result["end_to_end"] = {"dense": end_to_end(model, device)}
    for backend in info["backends"]:
        import copy

        _use_backend(backend)
        sparse_model = copy.deepcopy(model)
        swapped = swap_in_sparse(sparse_model)
        try:
            result["end_to_end"][backend] = {"swapped_linears": swapped, **end_to_end(sparse_model, device)}
        except Exception as exc:
            result["end_to_end"][backend] = {"swapped_linears": swapped, "error": f"{type(exc).__name__}: {exc}"}
        del sparse_model
    return result


def markdown(result: dict) -> str:
    info = result["kernels"]
    lines = ["# 2:4 sparse kernels", "", f"torch {info['torch']}, CUDA {info['cuda']}, device {info['device']}", ""]
    if not info["available"]:
        return "\n".join(lines + [f"Not measured: {info['reason']}.", ""])
    lines += [f"GPU {info['gpu']} (sm {info['capability']}), backends {', '.join(info['backends'])}", ""]
    lines += ["| shape (out x in) | backend | tokens | dense ms | 2:4 ms | speedup |", "|---|---|---:|---:|---:|---:|"]
    for row in result["shapes"]:
        if "error" in row:
            lines.append(f"| {row['shape']} | {row['backend']} | {row.get('tokens', '')} | | | {row['error'][:60]} |")
        else:
            lines.append(
                f"| {row['shape'][0]} x {row['shape'][1]} | {row['backend']} | {row['tokens']} | "
                f"{row['dense_s'] * 1e3:.3f} | {row['sparse_s'] * 1e3:.3f} | {row['speedup']:.2f} |"
            )
    lines += ["", "| end to end | prefill 2048 (ms) | decode (ms/token) |", "|---|---:|---:|"]
    for name, r in result["end_to_end"].items():
        if "error" in r:
            lines.append(f"| {name} | {r['error'][:80]} | |")
        else:
            lines.append(f"| {name} | {r['prefill_s'] * 1e3:.1f} | {r['decode_s_per_token'] * 1e3:.2f} |")
    return "\n".join(lines) + "\n"
