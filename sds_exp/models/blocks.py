"""Generic decoder-block walking: find the blocks and their linear layers, capture the first block's
inputs and every block's call arguments, and run blocks one at a time on the compute device.

Nothing here is model-family specific: blocks are the ``nn.ModuleList`` whose children are of a class
named in ``model._no_split_modules`` (transformers' own list of decoder-layer classes), and the blocks'
keyword arguments (attention masks, position ids, LLaMA's ``position_embeddings``, OPT's masks) are captured
as they are passed, whatever they are. They are captured for EVERY block, not only the first: models with
``config.layer_types`` (Gemma 3, Qwen2/3 with sliding windows) give their sliding-window and full-attention
layers different masks and, for Gemma 3, different RoPE tables (local base 1e4, global 1e6).

Parameters of the blocks that are not ``nn.Linear`` weights (the fused 3-D expert tensors of transformers 5
MoE models, their routers) cannot be pruned here: :func:`check_unprunable_params` refuses them by name.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "NoDecoderBlocksError",
    "UnprunableParametersError",
    "decoder_blocks",
    "find_linears",
    "unprunable_params",
    "check_unprunable_params",
    "BlockInputs",
    "BLOCK_INDEX",
    "capture_block_inputs",
    "run_block",
    "move_non_blocks",
    "StopForward",
]

log = logging.getLogger(__name__)

# Set on every block by capture_block_inputs: which block's keyword arguments a block (or a deep copy of it,
# such as the dense teacher of SDS) takes. A plain attribute: copied by deepcopy, never saved.
BLOCK_INDEX = "sds_block_index"


class NoDecoderBlocksError(ValueError):
    """The model has no recognisable stack of decoder blocks."""


class UnprunableParametersError(ValueError):
    """The decoder blocks hold weight tensors that are not ``nn.Linear`` weights (fused MoE experts, routers)."""


def _describe(module: nn.Module) -> str:
    name = type(module).__name__
    if isinstance(module, nn.ModuleList) and len(module):
        classes = Counter(type(child).__name__ for child in module)
        return f"{name}[{', '.join(f'{n} x {c}' for c, n in classes.items())}]"
    return name


def _tree_top(module: nn.Module, depth: int = 2, width: int = 8) -> str:
    """The first levels of the module tree, e.g. ``model: LlamaModel {embed_tokens: Embedding, layers:
    ModuleList[2 x LlamaDecoderLayer], ...}, lm_head: Linear``."""
    children = list(module.named_children())
    parts = []
    for name, child in children[:width]:
        text = f"{name}: {_describe(child)}"
        if depth > 1 and not isinstance(child, nn.ModuleList) and next(child.children(), None) is not None:
            text += " {" + _tree_top(child, depth - 1, width) + "}"
        parts.append(text)
    if len(children) > width:
        parts.append(f"... {len(children) - width} more")
    return ", ".join(parts) or "(no submodules)"


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (dotted path, ModuleList) of the model's decoder blocks.

    Raises:
        NoDecoderBlocksError: naming the model class, what was looked for and the top of its module tree.
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
        f"containing nn.Linear layers (looked for classes {sorted(wanted) or 'from _no_split_modules'}). "
        f"Top of its module tree: {_tree_top(model)}. sds_exp prunes transformers causal LMs whose blocks "
        "are an nn.ModuleList of nn.Linear-holding layers (LLaMA, OPT, Qwen2/3, Mistral, Gemma 3, Phi-3, ...)"
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


def _is_norm_or_embedding(module: nn.Module) -> bool:
    if isinstance(module, (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    name = type(module).__name__
    return "Norm" in name or "Embedding" in name


def unprunable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weight tensors of the decoder blocks that the pruners cannot reach, by full dotted name.

    The generic rule: every floating parameter with two or more dimensions that is not held by an
    ``nn.Linear`` (whose weight is pruned) nor by a norm or an embedding. In transformers 5 this finds the
    fused expert tensors of MoE blocks (``mlp.experts.gate_up_proj`` / ``down_proj``, 3-D ``nn.Parameter``)
    and their routers (``mlp.gate.weight`` of a ``*TopKRouter``, 2-D, not an ``nn.Linear``); GPT-2 style
    ``Conv1D`` weights too. Dense LLaMA, OPT, Qwen, Mistral, Gemma 3 and Phi-3 blocks have none.
    """
    path, blocks = decoder_blocks(model)
    found: dict[str, nn.Parameter] = {}
    for name, module in blocks.named_modules():
        if isinstance(module, nn.Linear) or _is_norm_or_embedding(module):
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param.dim() >= 2 and param.is_floating_point():
                found[f"{path}.{name}.{pname}" if name else f"{path}.{pname}"] = param
    return found


def _owner(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0]


def _covered(param_name: str, ignore: list[str] | tuple[str, ...]) -> bool:
    """An ``ignore`` pattern covers a parameter when it matches the module holding it (``*.mlp.experts``)
    or the parameter's own full name (``*.experts.down_proj``)."""
    return any(fnmatch.fnmatchcase(n, pat) for n in (_owner(param_name), param_name) for pat in ignore)


def _ignore_pattern(param_name: str, blocks_path: str) -> str:
    """The pattern that covers this parameter in every block: its owner's path below the block index."""
    rest = param_name[len(blocks_path) + 1 :].split(".", 1)[1]  # drop "<block index>."
    if "." not in rest:  # a parameter held by the block itself: name it, not the block (that covers all)
        return f"{blocks_path}.*.{rest}"
    return "*." + rest.rsplit(".", 1)[0]


def check_unprunable_params(model: nn.Module, ignore: list[str] | tuple[str, ...] = ()) -> None:
    """Refuse a model whose decoder blocks hold weights the pruners would silently skip.

    Per-expert pruning of fused MoE tensors is not implemented: they must be left dense explicitly with
    ``ignore`` (then the reported sparsity counts only the ``nn.Linear`` layers that were pruned). Call it
    before any work (calibration, dense evaluation).

    Raises:
        UnprunableParametersError: naming a few of the parameters, how many there are, and the ``ignore``
            value that leaves them dense.
    """
    path, _ = decoder_blocks(model)
    found = unprunable_params(model)
    left = [name for name in found if not _covered(name, ignore)]
    if not left:
        if found:
            log.info("%d fused/unprunable block parameters stay dense (covered by ignore=%s)", len(found), list(ignore))
        return
    patterns = sorted({_ignore_pattern(name, path) for name in left})
    shown = ", ".join(f"{name} {tuple(found[name].shape)}" for name in left[:4])
    more = f", ... ({len(left) - 4} more)" if len(left) > 4 else ""
    suggested = json.dumps(list(dict.fromkeys([*ignore, *patterns])))
    raise UnprunableParametersError(
        f"{type(model).__name__}: {len(left)} parameters of the decoder blocks are not nn.Linear weights and "
        f"cannot be pruned (fused MoE experts, routers: per-expert pruning is not implemented): {shown}{more}. "
        f"Leave them dense with 'ignore={suggested}' (the reported sparsity then counts only the nn.Linear "
        "layers that are pruned)"
    )


class StopForward(Exception):
    """Raised by a hook to end a forward early (capture: after the first block's inputs are seen)."""


@dataclass
class BlockInputs:
    """The calibration stream at a block boundary.

    Attributes:
        hidden: (nsamples, seqlen, hidden) activations entering the next block.
        kwargs: the first block's keyword arguments by batch size (they depend only on batch size and seqlen).
        batch_size: sequences per block forward.
        block_kwargs: block index -> keyword arguments by batch size, for the blocks whose arguments differ
            from the first block's (Gemma 3's full-attention layers); empty when all blocks take the same.
    """

    hidden: Tensor
    kwargs: dict[int, dict] = field(default_factory=dict)
    batch_size: int = 8
    block_kwargs: dict[int, dict[int, dict]] = field(default_factory=dict)
    _warned: bool = field(default=False, repr=False, compare=False)

    def kwargs_for(self, block: nn.Module | None = None) -> dict[int, dict]:
        """``block``'s keyword arguments by batch size (the first block's when every block takes the same).

        Raises:
            ValueError: the blocks take different arguments and ``block`` was never seen by the capture.
        """
        if not self.block_kwargs:
            return self.kwargs
        if block is None:
            if not self._warned:  # a caller that does not say which block: right for block 0 only
                self._warned = True
                log.warning(
                    "the decoder blocks take different keyword arguments (sliding-window vs full attention), but "
                    "BlockInputs.batches() was called without the block: using the first block's for all"
                )
            return self.kwargs
        index = getattr(block, BLOCK_INDEX, None)
        if index is None:
            raise ValueError(
                f"{type(block).__name__} was not a block of the model when its inputs were captured, and this "
                "model's blocks take different keyword arguments: which ones it needs is unknown"
            )
        return self.block_kwargs.get(index, self.kwargs)

    def batches(self, block: nn.Module | None = None) -> Iterator[tuple[slice, dict]]:
        """(rows, keyword arguments) per batch; pass the block that will run them (its own arguments)."""
        kwargs = self.kwargs_for(block)
        n = self.hidden.shape[0]
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            yield slice(start, stop), kwargs[stop - start]

    def clone(self) -> BlockInputs:
        return BlockInputs(self.hidden.clone(), self.kwargs, self.batch_size, self.block_kwargs)


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


def _same(a, b) -> bool:
    """Equal call arguments: the same object, or equal tensors / containers / values."""
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # objects without a boolean equality (e.g. flex-attention block masks): keep both
        return False


_DROPPED = ("past_key_value", "past_key_values", "cache")  # no KV cache in block-by-block passes
_MISSING = object()


def _record_calls(model: nn.Module, blocks: nn.ModuleList, ids: Tensor, every_block: bool) -> tuple[Tensor, list]:
    """One model forward with each block replaced by a recorder of its call (no block computes anything).

    Returns the first block's hidden input and the keyword arguments of every block (of the first only
    when not ``every_block``: the forward then stops there).
    """
    last = len(blocks) - 1 if every_block else 0
    state: dict = {"seen": []}

    def recorder(i: int):
        def forward(*args, **kwargs):
            if len(args) > 1:  # the stream replays keyword arguments only
                raise TypeError(f"decoder block {i} ({type(blocks[i]).__name__}) got {len(args)} positional arguments")
            x = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                state["x"] = x
            state["seen"].append({k: v for k, v in kwargs.items() if k not in _DROPPED})
            if i == last:
                raise StopForward
            return x  # the next block is called with what the model computes for it, bar the hidden states

        return forward

    saved = [block.__dict__.get("forward", _MISSING) for block in blocks]
    try:
        for i, block in enumerate(blocks):
            block.forward = recorder(i)  # an instance attribute shadows the class's forward
        try:
            model(input_ids=ids, use_cache=False)
        except StopForward:
            pass
        else:
            raise RuntimeError("the decoder blocks were never all called during capture")
    finally:
        for block, old in zip(blocks, saved, strict=True):
            if old is _MISSING:
                block.__dict__.pop("forward", None)
            else:
                block.forward = old
    if len(state["seen"]) != last + 1:
        raise RuntimeError(f"capture saw {len(state['seen'])} block calls, expected {last + 1}")
    return state["x"], state["seen"]


def _group_kwargs(per_bs: dict[int, list[dict]], device) -> tuple[dict[int, dict], dict[int, dict[int, dict]]]:
    """Block 0's keyword arguments by batch size, and those of the blocks that take other ones; equal
    argument sets are moved to ``device`` once and shared."""
    kwargs: dict[int, dict] = {}
    block_kwargs: dict[int, dict[int, dict]] = {}
    for bs, seen in per_bs.items():
        kinds: list[tuple[dict, dict]] = []  # (as recorded, on device)

        def moved(raw: dict, kinds=kinds) -> dict:
            for recorded, on_device in kinds:
                if _same(recorded, raw):
                    return on_device
            kinds.append((raw, _to(raw, device)))
            return kinds[-1][1]

        kwargs[bs] = moved(seen[0])
        for i, raw in enumerate(seen[1:], start=1):
            own = moved(raw)
            if own is not kwargs[bs]:
                block_kwargs.setdefault(i, {})[bs] = own
        if len(kinds) > 1:
            log.info("the %d decoder blocks take %d different sets of keyword arguments", len(seen), len(kinds))
    for by_bs in block_kwargs.values():  # a block that differs at one batch size takes block 0's at another
        for bs, first in kwargs.items():
            by_bs.setdefault(bs, first)
    return kwargs, block_kwargs


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, input_ids: Tensor, device: torch.device | str, batch_size: int = 8
) -> BlockInputs:
    """Run the model up to its first decoder block and keep what the block receives, and every block's
    keyword arguments (recorded once per batch size, in a forward where no block computes).

    Args:
        model: the causal LM (blocks may stay on CPU; the rest is moved to ``device``).
        input_ids: (nsamples, seqlen) calibration windows.
        device: where the activations live and blocks will run.
        batch_size: sequences per forward.
    """
    path, blocks = decoder_blocks(model)
    move_non_blocks(model, path, device)
    for i, block in enumerate(blocks):
        setattr(block, BLOCK_INDEX, i)
    n, seqlen = input_ids.shape
    hidden: Tensor | None = None
    per_bs: dict[int, list[dict]] = {}
    for start in range(0, n, batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        x, seen = _record_calls(model, blocks, ids, every_block=ids.shape[0] not in per_bs)
        if hidden is None:
            hidden = torch.empty((n, seqlen, x.shape[-1]), dtype=x.dtype, device=device)
        hidden[start : start + x.shape[0]] = x
        per_bs.setdefault(x.shape[0], seen)
    assert hidden is not None
    kwargs, block_kwargs = _group_kwargs(per_bs, device)
    return BlockInputs(hidden=hidden, kwargs=kwargs, batch_size=batch_size, block_kwargs=block_kwargs)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, out: Tensor | None = None) -> Tensor:
    """Forward every batch of ``inputs`` through ``block`` (with its own keyword arguments); returns
    (nsamples, seqlen, hidden)."""
    result = out if out is not None else torch.empty_like(inputs.hidden)
    for sl, kwargs in inputs.batches(block):
        y = block(inputs.hidden[sl], **kwargs)
        result[sl] = y[0] if isinstance(y, tuple) else y
    return result
