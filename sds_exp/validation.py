"""Config checks that fail a job in seconds, with a message naming the key, the value and what is allowed.

:func:`validate_config` runs before anything heavy (it never loads the model); :func:`validate_loaded` runs
once the model is loaded, for what depends on it (context length, which layers ``ignore`` leaves).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

__all__ = ["ConfigError", "check_component", "locate_target", "normalize_ignore", "validate_config", "validate_loaded"]

log = logging.getLogger(__name__)

_DEVICES = "cpu, cuda, cuda:N, mps"
_PATH_PREFIXES = ("/", "./", "../", "~")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_at_least(key: str, value: object, low: int, what: str) -> None:
    if not _is_int(value) or value < low:
        raise ConfigError(f"{key}={value!r}: must be {what}")


def _positive(key: str, value: object) -> None:
    _int_at_least(key, value, 1, "a positive integer")


def _seqlen(key: str, value: object) -> None:
    _int_at_least(key, value, 2, "an integer > 1 (tokens per window, e.g. 2048)")


def _get(node, key: str, default=None, where: str = ""):
    """``node[key]`` or ``default`` when absent; a mandatory ``???`` value raises ConfigError naming
    ``where.key``."""
    if node is None:
        return default
    if isinstance(node, DictConfig) and key in node.keys() and OmegaConf.is_missing(node, key):  # noqa: SIM118 (`in node` is False for ???)
        raise ConfigError(f"{where + '.' if where else ''}{key} is not set (???); it is required here")
    if key not in node:
        return default
    try:
        return node[key]
    except MissingMandatoryValue:
        raise ConfigError(f"{where + '.' if where else ''}{key} is not set (???); it is required here") from None


def normalize_ignore(value: object) -> list[str]:
    """The ``ignore`` setting as a list of fnmatch patterns: a string is ONE pattern, None is none."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (ListConfig, list, tuple)):
        patterns = list(value)
        bad = [p for p in patterns if not isinstance(p, str) or not p]
        if bad:
            raise ConfigError(
                f"ignore={_plain(value)!r}: {bad[0]!r} is not a pattern; allowed: a list of "
                "non-empty fnmatch strings, e.g. ['*.mlp.down_proj']"
            )
        return patterns
    raise ConfigError(
        f"ignore={_plain(value)!r}: must be an fnmatch pattern or a list of them, "
        "e.g. '*.mlp.down_proj' or ['*.mlp.down_proj', '*.self_attn.o_proj']"
    )


def _plain(value: object) -> object:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _check_device(value: object) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"device={value!r}: must be a string; allowed: {_DEVICES}")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device={value!r}: not a torch device; allowed: {_DEVICES}") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={value!r}: CUDA is not available on this machine (torch "
                f"{torch.__version__}, CUDA build: {torch.version.cuda}); use device=cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device={value!r}: only {count} CUDA device(s) are visible; allowed: cuda, cuda:0 .. cuda:{count - 1}"
            )
        return
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device={value!r}: MPS is not available on this machine; use device=cpu")
        return
    raise ConfigError(f"device={value!r}: device type {device.type!r} is not supported; allowed: {_DEVICES}")


def _check_ppl(ppl) -> None:
    from sds_exp.evaluation.perplexity import DATASETS

    datasets = _get(ppl, "datasets", [], where="benchmark.ppl")
    if isinstance(datasets, str) or not isinstance(datasets, (ListConfig, list, tuple)):
        raise ConfigError(
            f"benchmark.ppl.datasets={_plain(datasets)!r}: must be a list of dataset names, "
            f"e.g. [wikitext2]; allowed names: {', '.join(DATASETS)}"
        )
    for name in datasets:
        if name not in DATASETS:
            raise ConfigError(
                f"benchmark.ppl.datasets={_plain(datasets)!r}: {name!r} is not known; allowed: {', '.join(DATASETS)}"
            )
    if "seqlen" in ppl:
        _seqlen("benchmark.ppl.seqlen", ppl.seqlen)
    if "batch_size" in ppl:
        _positive("benchmark.ppl.batch_size", ppl.batch_size)
    if _get(ppl, "max_windows") is not None:
        _int_at_least("benchmark.ppl.max_windows", ppl.max_windows, 1, "null (all windows) or a positive integer")
    stage_max = _get(ppl, "stage_max_windows")
    if stage_max is None:
        return
    if not isinstance(stage_max, (DictConfig, Mapping)):
        raise ConfigError(
            f"benchmark.ppl.stage_max_windows={_plain(stage_max)!r}: must be a mapping stage -> "
            "windows, e.g. {dense: 40}"
        )
    for stage, value in stage_max.items():
        if value is not None:
            _int_at_least(
                f"benchmark.ppl.stage_max_windows.{stage}", value, 1, "null (= max_windows) or a positive integer"
            )


def _check_data(data) -> None:
    if data is None:
        return
    for key, check in (("nsamples", _positive), ("seqlen", _seqlen)):
        value = _get(data, key, where="data")
        if value is not None:
            check(f"data.{key}", value)
    target = str(_get(data, "_target_", ""))
    pool = _get(data, "pool", where="data")
    if pool is not None:
        from sds_exp.data.calibration import C4_POOLS

        if pool not in C4_POOLS:
            raise ConfigError(f"data.pool={pool!r}; allowed: {', '.join(C4_POOLS)}")
    if not target.endswith("from_ids"):
        return
    try:
        raw = data["path"]
    except MissingMandatoryValue:
        raise ConfigError("data.path is not set; data=ids needs data.path=/path/windows.pt (.pt/.npy/.npz)") from None
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"data.path={raw!r}: must be the path of a .pt/.npy/.npz file of token ids")
    path = Path(raw).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"data.path={raw!r}: {path.resolve()} does not exist or is not a file; "
            "allowed: a .pt/.npy/.npz file of shape (nsamples, seqlen)"
        )
    from sds_exp.data.calibration import from_ids

    try:  # the loader's own read (a few MB) and checks: shape, nsamples/seqlen, negative ids
        from_ids(path, nsamples=_get(data, "nsamples"), seqlen=_get(data, "seqlen"))
    except ValueError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith("data.") else f"data.path={raw!r}: {msg}") from None


def _check_resume(value: object) -> None:
    if value in (None, ""):
        return
    if not isinstance(value, str):
        raise ConfigError(f"resume={value!r}: must be null or a run directory")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"resume={value!r}: {path.resolve()} is not a directory; allowed: null or a run "
            "directory of an earlier job (holding checkpoint/ or metrics.json)"
        )
    if not ((path / "checkpoint").is_dir() or (path / "metrics.json").is_file()):
        raise ConfigError(
            f"resume={value!r}: {path.resolve()} holds neither checkpoint/ nor metrics.json; "
            "it is not a run directory of an earlier job"
        )


def _looks_like_path(value: str) -> bool:
    return value.startswith(_PATH_PREFIXES) or Path(value).expanduser().is_dir()


def _check_model(model) -> None:
    if model is None:
        return
    target = str(_get(model, "_target_", ""))
    if target.endswith("load_pretrained"):
        package = _get(model, "gguf_package", where="model")
        gguf_file = _get(model, "gguf_file", where="model")
        if package is not None:
            from sds_exp.models.loading import locate_package_file

            if not gguf_file:
                raise ConfigError(
                    f"model.gguf_package={package!r} needs model.gguf_file (the GGUF file inside the package)"
                )
            try:
                locate_package_file(package, gguf_file)
            except FileNotFoundError as exc:
                raise ConfigError(f"model.gguf_package={package!r}, model.gguf_file={gguf_file!r}: {exc}") from None
            return
        name = _get(model, "name_or_path", where="model")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"model.name_or_path={name!r}: must be a hub id or a local model directory")
        if not _looks_like_path(name):
            return  # a hub id: checked by the hub at load time
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"model.name_or_path={name!r}: {path.resolve()} does not exist; allowed: a hub id "
                "or a local directory holding config.json and the weights"
            )
        needed = gguf_file or "config.json"
        if not (path / needed).is_file():
            raise ConfigError(
                f"model.name_or_path={name!r}: {path.resolve()} has no {needed}; it is not a "
                f"{'GGUF' if gguf_file else 'Hugging Face'} model directory (point it at the "
                "folder holding config.json and the weights)"
            )
    elif target.endswith("load_saved"):
        raw = _get(model, "path", where="model")
        if not isinstance(raw, str) or not Path(raw).expanduser().is_dir():
            raise ConfigError(
                f"model.path={raw!r}: not a directory; allowed: the model/ folder of a job run with save_model=true"
            )


def validate_config(cfg: DictConfig) -> None:
    """Check everything that can be checked before the model loads (cheap: never loads the model).

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    from sds_exp.models.loading import resolve_dtype
    from sds_exp.spec import SparsitySpec

    try:
        if "sparsity" in cfg and "pattern" in cfg:
            SparsitySpec.from_config(cfg)
        if "dtype" in cfg:
            resolve_dtype(cfg.dtype)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if "device" in cfg:
        _check_device(cfg.device)
    if "calib_batch_size" in cfg:
        _positive("calib_batch_size", cfg.calib_batch_size)
    bench = _get(cfg, "benchmark")
    ppl = _get(bench, "ppl") if bench is not None else None
    if ppl is not None:
        _check_ppl(ppl)
    _check_data(_get(cfg, "data"))
    _check_resume(_get(cfg, "resume"))
    _check_model(_get(cfg, "model"))
    normalize_ignore(_get(cfg, "ignore"))
    pruner = _get(cfg, "pruner")
    if pruner is not None and "needs_calibration" in pruner:
        raise ConfigError(
            f"pruner.needs_calibration={_get(pruner, 'needs_calibration')!r}: not a setting; it is a "
            f"property of the pruner class ({_get(pruner, '_target_')}). Remove the key"
        )
    if pruner is not None:
        check_component("pruner", pruner, cfg)
    sds = _get(cfg, "sds")
    if sds is not None:
        check_component("sds", sds, cfg)
    allocation = _get(cfg, "allocation")
    if allocation is not None:  # the ratio file, OWL's lamda against the sparsity, N:M with a non-uniform one
        check_component("allocation", allocation, cfg)
    _check_extras(cfg, bench)
    hist_layer = _get(cfg, "hist_layer")
    if hist_layer is not None and not isinstance(hist_layer, str):
        raise ConfigError(f"hist_layer={hist_layer!r}: must be null, 'auto' or an fnmatch pattern of a layer name")


def locate_target(key: str, node) -> type:
    """The class a config node's ``_target_`` names, or a ConfigError naming ``<key>._target_``."""
    from hydra.utils import get_class

    target = _get(node, "_target_")
    if not isinstance(target, str):
        raise ConfigError(f"{key}._target_={target!r}: must name a class, e.g. sds_exp.pruners.wanda.Wanda")
    try:
        return get_class(target)
    except Exception as exc:  # hydra raises ImportError or ValueError depending on what is missing
        raise ConfigError(f"{key}._target_={target!r} cannot be imported ({exc.__class__.__name__})") from None


def check_component(key: str, node, cfg: DictConfig | None = None) -> None:
    """A component's own checks before anything loads: its class's ``check_config(node, cfg, key)``, if any.

    A component whose validity depends on other keys (a nested base pruner, the job's dtype) raises
    ``ValueError`` there; it is re-raised as a ConfigError.
    """
    cls = locate_target(key, node)
    check = getattr(cls, "check_config", None)
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    try:
        if check is not None:
            check(plain, cfg, key)
        _build(key, node)  # the class's own __post_init__ checks (ranges of its settings): building it is cheap
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _build(key: str, node) -> None:
    """Instantiate a component node; the ValueError its class raised (not Hydra's wrapper) on a bad value."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        instantiate(node)
    except InstantiationException as exc:
        cause = exc.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, (ValueError, TypeError)):
            raise ConfigError(f"{key}: {cause}" if not str(cause).startswith(key) else str(cause)) from None
        raise ConfigError(f"{key}: {exc}") from None


def _check_extras(cfg: DictConfig, bench) -> None:
    """The optional packages this config needs, found without importing them (the pip command if not)."""
    from sds_exp.extras import check_installed

    if str(_get(_get(cfg, "logger"), "_target_", "")).endswith("WandbTracker"):
        check_installed("wandb", "tracking")
    if bench is not None and _get(bench, "zeroshot") is not None:
        check_installed("lm_eval", "zeroshot")
    if _get(_get(cfg, "model"), "gguf_file") is not None:
        check_installed("gguf", "gguf")


def _all_linear_names(model) -> list[str]:
    from sds_exp.models.blocks import decoder_blocks, find_linears

    try:
        path, blocks = decoder_blocks(model)
    except Exception:  # not a decoder we know: nothing to compare against
        return []
    return list(find_linears(blocks, path))


def _check_allocation_loaded(cfg: DictConfig, model, layer_names: Sequence[str]) -> None:
    """The allocation's checks against the prunable layers (a file's patterns), its ``check_loaded`` if any."""
    node = _get(cfg, "allocation")
    if node is None:
        return
    check = getattr(locate_target("allocation", node), "check_loaded", None)
    if check is None:
        return
    modules = dict(model.named_modules())
    layers = {n: modules[n] for n in layer_names if n in modules}
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    try:
        check(plain, cfg, "allocation", layers)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def validate_loaded(cfg: DictConfig, model, layer_names: Sequence[str]) -> None:
    """Checks that need the loaded model: window lengths against its context, what ``ignore`` leaves, and the
    allocation's layer patterns.

    Args:
        cfg: the job config.
        model: the loaded causal LM (its ``config.max_position_embeddings`` is the context).
        layer_names: the prunable layers AFTER ``ignore`` was applied.

    Raises:
        ConfigError: naming the key, the value and the model's limit.
    """
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if _is_int(limit):
        data = _get(cfg, "data")
        bench = _get(cfg, "benchmark")
        ppl = _get(bench, "ppl") if bench is not None else None
        for key, value in (("data.seqlen", _get(data, "seqlen")), ("benchmark.ppl.seqlen", _get(ppl, "seqlen"))):
            if _is_int(value) and value > limit:
                raise ConfigError(
                    f"{key}={value}: longer than the model's context (max_position_embeddings="
                    f"{limit}); allowed: 2 .. {limit}"
                )
    _check_allocation_loaded(cfg, model, layer_names)
    patterns = normalize_ignore(_get(cfg, "ignore"))
    if not patterns:
        return
    all_names = _all_linear_names(model)
    if not layer_names:
        example = f"; its layers are e.g. {all_names[0]}" if all_names else ""
        raise ConfigError(
            f"ignore={patterns!r}: leaves no prunable layer ({len(all_names)} linear layers in the "
            f"decoder blocks, all matched){example}"
        )
    for pat in patterns:  # a typo leaves the layer pruned without a word
        if all_names and not any(fnmatch.fnmatchcase(n, pat) for n in all_names):
            log.warning("ignore pattern %r matches no layer (layer names look like %s)", pat, all_names[0])
