"""The job's config outside a job: compose ``conf/`` with Hydra's compose API (scripts, benchmarks, notebooks).

``compose_config(["model=tiny_llama", "pruner=sparsegpt"])`` returns the DictConfig that
``python -m sds_exp model=tiny_llama pruner=sparsegpt`` would hand to ``sds_exp.app.run``: every config group
and option under ``conf/`` (including ones added later as a new YAML file), the ``debug``/``local`` groups,
``$SDS_DATA_DIR`` and ``$PROJECT_ROOT``. Instantiate its nodes as the job does::

    cfg = compose_config(["model=tiny_llama"])
    lm = instantiate(cfg.model)
    calib = instantiate(cfg.data)(tokenizer=lm.tokenizer, data_dir=cfg.paths.data_dir, seed=cfg.seed)
    pruner, sds = instantiate(cfg.pruner), instantiate(cfg.sds)

The ``paths`` node (``${hydra:runtime.cwd}``, ``${hydra:runtime.output_dir}``) is resolved as for a job started
in ``root_dir`` (default: this checkout) whose run directory is ``output_dir`` (default: ``root_dir``);
``paths.*=...`` overrides still win. ``HydraConfig`` is set to the composed Hydra config, so
``HydraConfig.get().runtime.choices`` names the chosen options afterwards (see :func:`choices`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from sds_exp.resources import conf_dir

__all__ = [
    "CONF_DIR",
    "ROOT",
    "add_override_arguments",
    "choices",
    "compose_config",
    "compose_for_command",
    "options",
    "override_key",
]

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = conf_dir()  # <checkout>/conf, or sds_exp/conf inside an installed wheel


def compose_config(
    overrides: Sequence[str] = (),
    *,
    output_dir: str | Path | None = None,
    root_dir: str | Path | None = None,
    config_name: str = "config",
    job_name: str = "sds_exp",
    return_hydra_config: bool = False,
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides (``group=option``, ``key=value``, ``+key=value``).

    Args:
        overrides: Hydra command-line overrides, applied in order (later ones win).
        output_dir: what ``hydra:runtime.output_dir`` (hence ``paths.output_dir``) is; default ``root_dir``.
        root_dir: what ``hydra:runtime.cwd`` is (hence ``paths.root_dir`` unless ``$PROJECT_ROOT`` is set,
            and the default data mirror ``<root>/../shared/data`` unless ``$SDS_DATA_DIR`` is set); default
            this checkout, as for ``python -m sds_exp`` started in it.
        config_name: the primary config.
        job_name: ``hydra.job.name``.
        return_hydra_config: keep the ``hydra`` node (a job's config has none).

    Returns:
        The composed config with ``paths.*`` resolved to plain strings; the rest keeps its interpolations
        (``${dtype}``, ``${paths.data_dir}``), which resolve as usual. Raises Hydra's own errors for an unknown
        option (``Could not find 'pruner/obs'`` with the available options) or key.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    root = Path(root_dir).resolve() if root_dir is not None else ROOT
    gh = GlobalHydra.instance()
    outer = gh.hydra if gh.is_initialized() else None  # e.g. called inside a running Hydra app
    gh.clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name=job_name):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    finally:
        if outer is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(outer)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = str(root)
        cfg.hydra.runtime.output_dir = str(Path(output_dir).resolve() if output_dir is not None else root)
    HydraConfig().set_config(cfg)
    if "paths" in cfg and cfg.paths is not None:
        with open_dict(cfg):
            for key in list(cfg.paths):
                value = cfg.paths[key]  # resolves ${hydra:...}, ${oc.env:...} now, while HydraConfig is this one
                cfg.paths[key] = str(value) if value is not None else None
    if not return_hydra_config:
        with open_dict(cfg):
            del cfg["hydra"]  # as in a real job: the app sees no hydra node
    return cfg


def choices() -> dict[str, str | None]:
    """The options chosen by the last :func:`compose_config` (or the running job): ``{"model": "tiny_llama", ...}``."""
    from hydra.core.hydra_config import HydraConfig

    chosen = OmegaConf.to_container(HydraConfig.get().runtime.choices)
    return {k: v for k, v in chosen.items() if not k.startswith("hydra/")}


def options(group: str) -> list[str]:
    """The options of a config group, e.g. ``options("model")`` -> ``["llama2_7b", ..., "tiny_opt"]``."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def override_key(override: str) -> str:
    """The key or group an override sets: ``"pruner.percdamp"`` for ``"++pruner.percdamp=0.1"``, ``"pruner"`` for
    ``"pruner=wanda"``, ``"hydra/launcher"`` for ``"hydra/launcher=slurm"``."""
    return override.lstrip("+~").split("=", 1)[0].split("@", 1)[0].strip()


def add_override_arguments(parser) -> None:
    """Give an argparse parser the Hydra passthrough: trailing ``key=value`` arguments and ``-o/--override``."""
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="Hydra overrides of conf/ (group=option, key=value, +key=value), applied after the "
        "flags, e.g. pruner=sparsegpt pruner.percdamp=0.1 debug=tiny",
    )
    parser.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        dest="extra_overrides",
        metavar="key=value",
        help="one more Hydra override (repeatable); same as a trailing key=value",
    )


def compose_for_command(parser, overrides: Sequence[str], *, output_dir: str | Path | None = None) -> DictConfig:
    """:func:`compose_config` for a command line tool: a Hydra error (an unknown option or key) becomes the
    parser's usage error, naming it."""
    from hydra.errors import HydraException

    try:
        return compose_config(overrides, output_dir=output_dir)
    except HydraException as exc:
        parser.error(f"{exc}")
