"""Block-by-block passes over the calibration stream.

Linear layers that receive the very same input tensor in a forward (q/k/v, gate/up) share one
statistics object: their Wanda norms, SparseGPT Hessians and Gram matrices are identical, so they are
accumulated once (the references compute them once per layer).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sds_exp.faults import fault_point
from sds_exp.models.blocks import BlockInputs, StopForward, decoder_blocks, find_linears
from sds_exp.sds.gram import GramStats, LayerProblem

__all__ = [
    "walk_blocks",
    "collect_stats",
    "paired_pass",
    "LayerGrams",
    "TeacherCache",
    "dense_copy",
    "layer_groups",
    "output_energy",
]

log = logging.getLogger(__name__)


def walk_blocks(model: nn.Module, device: torch.device | str, desc: str) -> Iterator[tuple[int, nn.Module, str]]:
    """Yield (index, block, dotted prefix) with the block moved to ``device``; moved back afterwards."""
    path, blocks = decoder_blocks(model)
    for i, block in enumerate(tqdm(blocks, desc=desc, leave=False)):
        home = next(block.parameters()).device
        block.to(device)
        fault_point(f"block:{desc}:{i}")
        yield i, block, f"{path}.{i}"
        block.to(home)


def dense_copy(block: nn.Module, prefix: str, dense_weights: dict[str, Tensor]) -> nn.Module:
    """A copy of ``block`` with its linear weights replaced by the stored dense (teacher) weights."""
    teacher = copy.deepcopy(block)
    for name, layer in find_linears(teacher, prefix).items():
        if name in dense_weights:
            layer.weight.data.copy_(dense_weights[name])
    return teacher


class _SharedInputs:
    """Maps layers to one statistics object per distinct input tensor, decided on the first batch."""

    def __init__(self, layers: dict[str, nn.Linear], make: Callable[[nn.Linear], object]) -> None:
        self.layers, self.make = layers, make
        self.stats: dict[str, object] = {}
        self.leader: dict[str, str] = {}  # layer -> the layer whose statistics it shares
        self._seen: dict[int, tuple[str, Tensor]] = {}  # id(input) -> (first layer, input) in this batch

    def new_batch(self) -> None:
        self._seen.clear()

    def route(self, name: str, x: Tensor) -> str | None:
        """The layer whose statistics ``x`` must be added to, or None when already added in this batch."""
        if name not in self.leader:  # first batch: group layers by input identity
            first = self._seen.get(id(x))
            self.leader[name] = first[0] if first is not None and first[1] is x else name
            if self.leader[name] == name:
                self.stats[name] = self.make(self.layers[name])
        lead = self.leader[name]
        if lead != name:
            return None
        self._seen[id(x)] = (name, x)  # holding x keeps its id unique for the batch
        return name

    def result(self) -> dict[str, object]:
        return {name: self.stats[lead] for name, lead in self.leader.items()}


def _hooks(layers: dict[str, nn.Linear], fn: Callable[[str, Tensor], None]) -> list:
    return [layer.register_forward_hook(lambda m, a, o, _n=name: fn(_n, a[0])) for name, layer in layers.items()]


@torch.no_grad()
def collect_stats(
    block: nn.Module,
    layers: dict[str, nn.Linear],
    inputs: BlockInputs,
    make: Callable[[nn.Linear], object],
    out: Tensor | None = None,
) -> dict[str, object]:
    """Forward ``inputs`` through ``block`` feeding each layer's input to ``make(layer).add_batch``.

    If ``out`` is given, the block outputs are written there (one pass gives statistics and outputs).
    """
    shared = _SharedInputs(layers, make)

    def fn(name: str, x: Tensor) -> None:
        lead = shared.route(name, x)
        if lead is not None:
            shared.stats[lead].add_batch(x)

    handles = _hooks(layers, fn)
    try:
        for sl, kwargs in inputs.batches(block):
            shared.new_batch()
            y = block(inputs.hidden[sl], **kwargs)
            if out is not None:
                out[sl] = y[0] if isinstance(y, tuple) else y
    finally:
        for h in handles:
            h.remove()
    return shared.result()


@torch.no_grad()
def layer_groups(
    block: nn.Module, prefix: str, inputs: BlockInputs, ignore: list[str] | tuple[str, ...] = ()
) -> list[list[str]]:
    """The block's linear layers in forward order, grouped by shared input (q/k/v, o, gate/up, down).

    A layer's input depends on the groups before it, so reconstructing group by group, with fresh
    statistics after each, keeps every layer's inputs those of the block it will live in.
    """
    layers = find_linears(block, prefix, ignore)
    order: list[tuple[str, int]] = []
    held: list[Tensor] = []  # keep inputs alive so ids stay unique during the forward

    def fn(name: str, x: Tensor) -> None:
        order.append((name, id(x)))
        held.append(x)

    handles = _hooks(layers, fn)
    try:
        sl, kwargs = next(iter(inputs.batches(block)))
        block(inputs.hidden[sl], **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_id = None
    for name, ident in order:
        if groups and ident == last_id:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_id = ident
    return groups


def output_energy(y: Tensor) -> float:
    """Sum of squares of ``y``, accumulated in fp64.

    An fp32 ``vector_norm`` over a batch of layer outputs (millions of entries) loses up to ~1e-3 of the
    sum on CPU (measured: -4.8e-5 at 1.2M entries, -1.1e-3 at 9.4M); c0 then sat below the exact optimum
    and per-layer losses were reported negative.
    """
    return float(torch.linalg.vector_norm(y, dtype=torch.float64) ** 2)


class TeacherCache:
    """The teacher block's per-layer inputs and output energies for every batch of one block.

    The teacher (the dense block on the dense stream) never changes within a stage, so the group passes of
    re-activation and adjustment need its inputs only once: the first pass records them (a full teacher
    forward), the later ones skip the teacher. Memory: one tensor per distinct layer input (q/k/v share
    one) per token, in the model's dtype, e.g. 4 inputs x 65,536 tokens x (3 x 576 + 1536) x 4 bytes = 0.85 GB
    for SmolLM2 at 32 x 2048 in fp32.
    """

    def __init__(self) -> None:
        self.inputs: list[dict[str, Tensor]] = []  # per batch: layer -> input
        self.out_sq: dict[str, float] = {}
        self.ready = False

    def nbytes(self) -> int:
        seen: dict[int, int] = {}
        for batch in self.inputs:
            for x in batch.values():
                seen[id(x)] = x.numel() * x.element_size()
        return sum(seen.values())


class LayerGrams:
    """Per-layer Gram statistics of a paired pass and the teacher's output energy of each layer."""

    def __init__(self, grams: dict[str, GramStats], out_sq: dict[str, float] | None = None) -> None:
        self.grams, self.out_sq = grams, out_sq or {}

    def __contains__(self, name: str) -> bool:
        return name in self.grams

    def problem(self, name: str, dense_weight: Tensor) -> LayerProblem:
        return self.grams[name].problem(dense_weight, self.out_sq.get(name))


@torch.no_grad()
def paired_pass(
    student: nn.Module,
    teacher: nn.Module,
    prefix: str,
    xs: BlockInputs,
    xd: BlockInputs,
    ignore: list[str] | tuple[str, ...] = (),
    make_extra: Callable[[nn.Linear], object] | None = None,
    teacher_out: Tensor | None = None,
    only: set[str] | None = None,
    grams_needed: bool = True,
    cache: TeacherCache | None = None,
) -> tuple[LayerGrams, dict[str, object]]:
    """One pass over a block with two streams: the teacher (dense block, dense inputs ``xd``) and the
    student (current block, inputs ``xs``), token-aligned.

    Returns per-layer Gram statistics (X_s X_s^T, X_s X_d^T, and the teacher's output energy for c0)
    and, if ``make_extra`` is given, extra statistics (e.g. a pruner's) of the student inputs. Block
    outputs go to ``teacher_out`` when given. With ``only`` and no ``teacher_out``, each forward stops
    as soon as the last layer of ``only`` has been seen (a group early in the block costs little).
    With a ``cache``, the first call records the teacher's inputs of every layer and later calls reuse them
    instead of running the teacher (same numbers: the teacher and its inputs are fixed).
    """
    s_layers = find_linears(student, prefix, ignore)
    t_layers = find_linears(teacher, prefix, ignore)
    record = cache is not None and not cache.ready
    replay = cache is not None and cache.ready
    if replay and teacher_out is not None:
        raise ValueError("a replayed teacher cache has no block outputs; pass teacher_out on the recording call")
    if only is not None:  # statistics for these layers only (group-by-group reconstruction)
        s_layers = {n: lin for n, lin in s_layers.items() if n in only}
        if not record:  # the recording pass sees every layer of the teacher
            t_layers = {n: lin for n, lin in t_layers.items() if n in only}
    stop_teacher = only is not None and teacher_out is None and not record  # the block output is not needed
    stop_student = only is not None
    device = xs.hidden.device
    grams = _SharedInputs(s_layers, lambda lin: GramStats(lin.in_features, device, cross=True, teacher_gram=False))
    extra = _SharedInputs(s_layers, make_extra) if make_extra is not None else None
    teacher_inputs: dict[str, Tensor] = {}
    out_sq: dict[str, float] = dict.fromkeys(t_layers, 0.0)
    seen: set[str] = set()

    def maybe_stop(name: str, layers: dict, stop: bool) -> None:
        seen.add(name)
        if stop and len(seen) == len(layers):
            raise StopForward

    def on_teacher(name: str, x: Tensor, y: Tensor) -> None:
        teacher_inputs[name] = x
        if record:
            cache.inputs[-1][name] = x
        layer = t_layers[name]
        if y.dtype in (torch.float32, torch.float64):
            y = y.float() if layer.bias is None else y.float() - layer.bias.float()
        else:  # bf16/fp16 outputs: rounding the large (outlier) entries moves c0 by more than the loss itself
            y = x.reshape(-1, x.shape[-1]).float() @ layer.weight.float().t()
        out_sq[name] += output_energy(y)
        maybe_stop(name, t_layers, stop_teacher)

    def on_student(name: str, x: Tensor) -> None:
        if grams_needed:
            lead = grams.route(name, x)
            if lead is not None:
                grams.stats[lead].add(x, teacher_inputs[name])
        if extra is not None:
            lead = extra.route(name, x)
            if lead is not None:
                extra.stats[lead].add_batch(x)
        maybe_stop(name, s_layers, stop_student)

    t_handles = (
        [
            layer.register_forward_hook(lambda m, a, o, _n=name: on_teacher(_n, a[0], o))
            for name, layer in t_layers.items()
        ]
        if (grams_needed or record) and not replay
        else []
    )
    handles = t_handles + _hooks(s_layers, on_student)
    try:
        for b, (sl, kwargs) in enumerate(xs.batches(student)):
            grams.new_batch()
            if extra is not None:
                extra.new_batch()
            teacher_inputs.clear()
            seen.clear()
            if replay:
                teacher_inputs.update(cache.inputs[b])
            else:
                if record:
                    cache.inputs.append({})
                try:
                    yt = teacher(xd.hidden[sl], **kwargs)
                except StopForward:
                    yt = None
            seen.clear()
            with contextlib.suppress(StopForward):
                student(xs.hidden[sl], **kwargs)
            if teacher_out is not None:
                teacher_out[sl] = yt[0] if isinstance(yt, tuple) else yt
    finally:
        for h in handles:
            h.remove()
    if record:
        cache.out_sq, cache.ready = dict(out_sq), True
    if replay:
        out_sq = {n: cache.out_sq[n] for n in t_layers}
    elif record and only is not None:
        out_sq = {n: v for n, v in out_sq.items() if n in only}
    return LayerGrams(grams.result() if grams_needed else {}, out_sq), (extra.result() if extra is not None else {})
