"""Per-weight gradient statistics of the prunable linear layers from full-model backward passes.

Pruner-Zero's ``G`` (pprp/Pruner-Zero @ db70134, ``lib/gradient_computation.py``, taken from GBLM-Pruner):
the fp16 model runs over the calibration windows one window per backward, loss = the causal-LM
cross-entropy with labels = inputs (mean over the window's predicted tokens), and every weight gets

    G_ij = sqrt( sum_s (scale * dL_s / dW_ij)^2 )     (l2; scale = 100, the result stored in fp16)

Here the sum runs over per-window gradients for any batch size: a linear's per-window weight gradient is
``dL_s/dW = dY_s^T X_s`` from its input X_s and output gradient dY_s of that window (the backward of the
sum of per-window losses gives every window its own dY_s), so batching changes speed, never the result.
No parameter needs ``requires_grad``: the graph is built from the embeddings' output, and autograd only
propagates activation gradients. The statistic stays fp32 and unscaled (``scale`` cancels in Pruner-Zero's
min-max scaling of G).
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["GRAD_NORMS", "check_backward_ready", "gradient_stats", "window_losses"]

log = logging.getLogger(__name__)

GRAD_NORMS = ("l2", "l1")  # l2: sqrt(sum_s g_s^2) (the released metric's G); l1: sum_s |g_s|


def check_backward_ready(model: nn.Module, layers: dict[str, nn.Linear], calib: Tensor) -> None:
    """Refuse, before any work, a model or input that a float backward pass cannot run on.

    Raises:
        ValueError: naming the parameter and its dtype (integer / quantized weights have no autograd),
            a layer that is not an ``nn.Linear``, or calibration ids that are not (nsamples, seqlen >= 2) integers.
    """
    bad = [(n, p.dtype) for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if bad:
        listed = ", ".join(f"{n} ({d})" for n, d in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise ValueError(
            f"Pruner-Zero's gradients need a backward pass through the whole model, but {len(bad)} parameter(s) "
            f"have a dtype without autograd support: {listed}. Allowed: floating-point parameters "
            "(float32, bfloat16, float16); load the model dequantized (dtype=float32|bfloat16|float16)"
        )
    for name, layer in layers.items():
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"layer {name} is a {type(layer).__name__}, not an nn.Linear; gradients need linears")
    if calib.dim() != 2 or calib.shape[1] < 2 or calib.dtype.is_floating_point:
        raise ValueError(
            f"calibration ids of shape {tuple(calib.shape)} and dtype {calib.dtype}: gradients need integer token "
            "ids of shape (nsamples, seqlen) with seqlen >= 2 (a next-token loss)"
        )


def window_losses(logits: Tensor, ids: Tensor) -> Tensor:
    """(batch,) next-token cross-entropy of each window, mean over its seqlen-1 predicted tokens, in fp32.

    The loss of transformers' ``model(input_ids=ids, labels=ids)`` for one window (logits upcast to fp32).
    """
    b, t = ids.shape
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="none")
    return ce.view(b, t - 1).mean(1)


class _PerWindowGrads:
    """Forward hooks that keep each linear's input and hook its output's gradient; on the backward they add
    each window's weight gradient dY_s^T X_s to the running statistic (fp32, on the compute device)."""

    def __init__(self, layers: dict[str, nn.Linear], norm: str, device) -> None:
        self.norm = norm
        self.acc = {n: torch.zeros(lin.weight.shape, dtype=torch.float32, device=device) for n, lin in layers.items()}
        self.calls = dict.fromkeys(layers, 0)
        self.windows = 1  # windows in the current batch (OPT flattens the MLP inputs to (b * tokens, in))

    def hook(self, name: str):
        def forward_hook(module, args, output):
            self.calls[name] += 1
            if not output.requires_grad:  # an input that does not depend on the embeddings
                raise RuntimeError(f"layer {name}'s output has no gradient path from the embeddings")
            x = args[0].detach()
            output.register_hook(lambda dy: self.add(name, x, dy))

        return forward_hook

    def add(self, name: str, x: Tensor, dy: Tensor) -> None:
        b = self.windows
        x = x.reshape(b, -1, x.shape[-1]).float()  # (b, tokens, in)
        dy = dy.reshape(b, -1, dy.shape[-1]).float()  # (b, tokens, out)
        g = torch.bmm(dy.transpose(1, 2), x)  # (b, out, in): each window's dL_s/dW
        self.acc[name] += g.square().sum(0) if self.norm == "l2" else g.abs().sum(0)

    def check_calls(self) -> None:
        wrong = {n: c for n, c in self.calls.items() if c != 1}
        if wrong:
            name, count = next(iter(wrong.items()))
            raise RuntimeError(
                f"layer {name} was called {count} times in one forward ({len(wrong)} layer(s) not called exactly "
                "once); a per-window weight gradient needs one call per layer"
            )
        self.calls = dict.fromkeys(self.calls, 0)

    def result(self) -> dict[str, Tensor]:
        return {n: (a.sqrt() if self.norm == "l2" else a).cpu() for n, a in self.acc.items()}


def _embedding_hook(module, args, output: Tensor) -> Tensor:
    return output.detach().requires_grad_()  # the graph starts here: activation gradients only


def gradient_stats(
    model: nn.Module,
    calib: Tensor,
    layers: dict[str, nn.Linear],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    norm: str = "l2",
    desc: str = "gradients",
) -> dict[str, Tensor]:
    """Per-weight statistic of the per-window loss gradients of ``layers`` over the calibration windows.

    The model is moved to ``device`` for the pass and back afterwards, run in eval mode (no dropout) and
    restored; its weights (bit for bit), ``requires_grad`` flags and ``.grad`` are left as they were.

    Args:
        model: the causal LM, with every parameter floating point.
        calib: (nsamples, seqlen) token ids.
        layers: name -> the ``nn.Linear`` (inside ``model``) whose statistic is wanted.
        device: where the forward and backward run.
        batch_size: windows per backward (speed and memory only: the statistic is per window).
        norm: "l2" -> sqrt(sum_s g_s^2), "l1" -> sum_s |g_s|, with g_s = dL_s/dW.

    Returns:
        name -> fp32 CPU tensor of the layer's weight shape (out, in).
    """
    if norm not in GRAD_NORMS:
        raise ValueError(f"gradient norm={norm!r}; allowed: {', '.join(GRAD_NORMS)}")
    if batch_size < 1:
        raise ValueError(f"gradient batch_size={batch_size}; allowed: a positive integer")
    check_backward_ready(model, layers, calib)
    embed = model.get_input_embeddings()
    unique = {id(p): p for p in model.parameters()}.values()  # tied weights once
    flags = [(p, p.requires_grad, p.grad, p.device) for p in unique]
    buffers = [(m, k, b.device) for m in model.modules() for k, b in m._buffers.items() if b is not None]
    modes = [(m, m.training) for m in model.modules()]
    acc = _PerWindowGrads(layers, norm, device)
    start = time.perf_counter()
    with ExitStack() as stack:
        for p, *_ in flags:
            p.grad = None  # a stale .grad would move with the model; restored below
            p.requires_grad_(False)
        stack.callback(_restore, buffers, flags, modes)
        model.to(device).eval()
        handles = [embed.register_forward_hook(_embedding_hook)]
        handles += [lin.register_forward_hook(acc.hook(n)) for n, lin in layers.items()]
        stack.callback(lambda: [h.remove() for h in handles])
        stack.enter_context(torch.enable_grad())  # the stage functions run under no_grad
        batches = range(0, calib.shape[0], batch_size)
        for start_row in tqdm(batches, desc=desc, leave=False):
            ids = calib[start_row : start_row + batch_size].to(device)
            acc.windows = ids.shape[0]
            logits = model(input_ids=ids, use_cache=False).logits
            acc.check_calls()
            loss = window_losses(logits, ids).sum()  # sum of per-window means: each window its own gradient
            if not torch.isfinite(loss):
                raise RuntimeError(
                    f"non-finite calibration loss {loss.item()} at windows {start_row}..{start_row + ids.shape[0] - 1} "
                    f"(model dtype {next(model.parameters()).dtype}); try dtype=float32 or bfloat16"
                )
            del logits
            loss.backward()
    stats = acc.result()
    bad = [n for n, g in stats.items() if not torch.isfinite(g).all()]
    if bad:
        log.warning("non-finite gradient statistics in %d layer(s), first %s", len(bad), bad[0])
    log.info(
        "gradient statistics (%s) of %d layers over %d windows x %d tokens, %d per backward, on %s: %.1fs",
        norm,
        len(stats),
        calib.shape[0],
        calib.shape[1],
        batch_size,
        device,
        time.perf_counter() - start,
    )
    return stats


def _restore(buffers, flags, modes) -> None:
    """Put every parameter and buffer back on its device, with its requires_grad, .grad and module mode."""
    for module, key, device in buffers:
        module._buffers[key] = module._buffers[key].to(device)
    for p, requires_grad, grad, device in flags:
        if p.device != device:
            p.data = p.data.to(device)
        p.grad = grad
        p.requires_grad_(requires_grad)
    for module, training in modes:
        module.training = training
