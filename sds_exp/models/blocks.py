"""Generic decoder-block walking: find the blocks and their linear layers, capture the first block's
inputs and call arguments, and run blocks one at a time on the compute device.

Nothing here is model-family specific: blocks are the ``nn.ModuleList`` whose children are of a class
named in ``model._no_split_modules`` (transformers' own list of decoder-layer classes), and the first
block's keyword arguments (attention masks, position ids, LLaMA's ``position_embeddings``, OPT's masks)
are captured as they are passed, whatever they are.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "NoDecoderBlocksError",
    "decoder_blocks",
    "find_linears",
    "BlockInputs",
    "capture_block_inputs",
    "run_block",
    "move_non_blocks",
    "StopForward",
]

log = logging.getLogger(__name__)


class NoDecoderBlocksError(ValueError):
    """The model has no recognisable stack of decoder blocks."""


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (dotted path, ModuleList) of the model's decoder blocks.

    Raises:
        NoDecoderBlocksError: naming the model class and what was looked for.
    """
    wanted = set(getattr(model, "_no_split_modules", None) or [])
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child).__name__ for child in module}
        if len(classes) != 1:
            continue
        has_linear = any(isinstance(m, nn.Linear) for m in module[0].modules())
        if classes & wanted:
            return name, module
        if has_linear:
            candidates.append((len(module), name, module))
    if candidates:  # no _no_split_modules: the longest homogeneous list of blocks holding linears
        _, name, module = max(candidates, key=lambda c: c[0])
        log.warning("no block class in _no_split_modules=%s; using %s (%d blocks)", sorted(wanted), name, len(module))
        return name, module
    raise NoDecoderBlocksError(
        f"{type(model).__name__} has no recognisable decoder blocks: no nn.ModuleList of identical modules "
        f"containing nn.Linear layers (looked for classes {sorted(wanted) or 'from _no_split_modules'})"
    )


def find_linears(module: nn.Module, prefix: str = "", ignore: list[str] | tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` layers under ``module`` by full dotted name, minus those matching ``ignore``
    (fnmatch patterns on the full name, e.g. ``*.mlp.down_proj``)."""
    found = {}
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            full = f"{prefix}.{name}" if prefix else name
            if not any(fnmatch.fnmatchcase(full, pat) for pat in ignore):
                found[full] = sub
    return found


class StopForward(Exception):
    """Raised by a hook to end a forward early (capture: after the first block's inputs are seen)."""


@dataclass
class BlockInputs:
    """The calibration stream at a block boundary.

    Attributes:
        hidden: (nsamples, seqlen, hidden) activations entering the next block.
        kwargs: the block's keyword arguments by batch size (they depend only on batch size and seqlen).
        batch_size: sequences per block forward.
    """

    hidden: Tensor
    kwargs: dict[int, dict] = field(default_factory=dict)
    batch_size: int = 8

    def batches(self) -> Iterator[tuple[slice, dict]]:
        n = self.hidden.shape[0]
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            yield slice(start, stop), self.kwargs[stop - start]

    def clone(self) -> BlockInputs:
        return BlockInputs(self.hidden.clone(), self.kwargs, self.batch_size)


def move_non_blocks(model: nn.Module, blocks_path: str, device: torch.device | str) -> None:
    """Move every parameter and buffer outside the decoder blocks (embeddings, rotary tables, final
    norm, head) to ``device``, leaving the blocks where they are."""
    for name, module in model.named_modules():
        if name == blocks_path or name.startswith(blocks_path + "."):
            continue
        for param in module._parameters.values():
            if param is not None and param.device != torch.device(device):
                param.data = param.data.to(device)
        for key, buf in module._buffers.items():
            if buf is not None:
                module._buffers[key] = buf.to(device)


def _to(obj, device):
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, input_ids: Tensor, device: torch.device | str, batch_size: int = 8
) -> BlockInputs:
    """Run the model up to its first decoder block and keep what the block receives.

    Args:
        model: the causal LM (blocks may stay on CPU; the rest is moved to ``device``).
        input_ids: (nsamples, seqlen) calibration windows.
        device: where the activations live and blocks will run.
        batch_size: sequences per forward.
    """
    path, blocks = decoder_blocks(model)
    move_non_blocks(model, path, device)
    n, seqlen = input_ids.shape
    hidden: Tensor | None = None
    kwargs_by_bs: dict[int, dict] = {}
    state: dict = {}

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        state["x"] = x
        state["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, n, batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except StopForward:
                pass
            else:
                raise RuntimeError("the first decoder block was never called during capture")
            x = state["x"]
            if hidden is None:
                hidden = torch.empty((n, seqlen, x.shape[-1]), dtype=x.dtype, device=device)
            hidden[start : start + x.shape[0]] = x
            kwargs_by_bs.setdefault(x.shape[0], _to(state["kwargs"], device))
    finally:
        handle.remove()
    assert hidden is not None
    kwargs_by_bs = {
        bs: {k: v for k, v in kw.items() if k not in ("past_key_value", "past_key_values")}
        for bs, kw in kwargs_by_bs.items()
    }
    return BlockInputs(hidden=hidden, kwargs=kwargs_by_bs, batch_size=batch_size)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, out: Tensor | None = None) -> Tensor:
    """Forward every batch of ``inputs`` through ``block``; returns (nsamples, seqlen, hidden)."""
    result = out if out is not None else torch.empty_like(inputs.hidden)
    for sl, kwargs in inputs.batches():
        y = block(inputs.hidden[sl], **kwargs)
        result[sl] = y[0] if isinstance(y, tuple) else y
    return result
