"""A sweep's search space: Hydra sweep expressions, parsed by Hydra's own override parser, as
Ray Tune search domains; the points every trial config must survive; a trial's config.

    optim.lr=tag(log,interval(1e-5,1e-3))    tune.loguniform(1e-5, 1e-3)
    optim.lr=interval(1e-5,1e-3)             tune.uniform(1e-5, 1e-3)
    peft.rank=choice(8,16,32) / =8,16,32     tune.choice([8, 16, 32])   (grid: tune.grid_search)
    optim.warmup_steps=range(0,100,step=50)  tune.choice([0, 50])       (grid: tune.grid_search)

The grammar is Hydra's (`hydra.core.override_parser`), so a space reads like `ftcluster train -m`
and as Hydra's Optuna sweeper reads it. Keys are value keys of the config (`optim.lr`), not group
choices (`peft=lora`: use `ftcluster train -m` for those).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from ftcluster.config import ConfigError, JobConfig


@dataclass(frozen=True, kw_only=True)
class Dimension:
    """One key of the space: its values (discrete) or its bounds (interval)."""
    key: str
    expression: str
    values: tuple | None = None
    """choice/range: every value; None for an interval."""
    low: float | None = None
    high: float | None = None
    log: bool = False


def parse_space(params: dict[str, str]) -> list[Dimension]:
    """`sweep.params` (key -> Hydra sweep expression) as dimensions; ConfigError names the key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    dims = []
    for key, expression in params.items():
        where = f"sweep.params.{key}"
        try:
            override = parser.parse_override(f"{key}={expression}")
        except HydraException as e:
            raise ConfigError(f"{where}: not a Hydra sweep expression ({expression!r}): {e}") from None
        if "." not in key and key != "seed":
            raise ConfigError(f"{where}: a sweep searches config values (like optim.lr), not group choices; "
                              f"for a grid over groups use ftcluster train -m {key}=a,b")
        if not override.is_sweep_override():
            raise ConfigError(f"{where}: {expression!r} is one value, not a range; use interval(a,b), "
                              "tag(log,interval(a,b)), choice(a,b,...) or range(start,stop,step=s)")
        value = override.value()
        if isinstance(value, IntervalSweep):
            if not value.start < value.end:
                raise ConfigError(f"{where}: interval({value.start}, {value.end}) is empty")
            log = "log" in value.tags
            if log and value.start <= 0:
                raise ConfigError(f"{where}: a log interval needs a positive lower bound; got {value.start}")
            dims.append(Dimension(key=key, expression=expression, low=value.start, high=value.end, log=log))
        else:
            values = tuple(override.sweep_iterator())
            if not values:
                raise ConfigError(f"{where}: {expression!r} has no values")
            dims.append(Dimension(key=key, expression=expression, values=values))
    return dims


def tune_space(dims: list[Dimension], *, grid: bool) -> dict[str, Any]:
    """Ray Tune's param_space: one entry per key (Tune nests dotted names, so keys travel as
    they are; the trial reads them back with `point_of`)."""
    from ray import tune

    space: dict[str, Any] = {}
    for d in dims:
        if d.values is not None:
            space[d.key] = tune.grid_search(list(d.values)) if grid else tune.choice(list(d.values))
        elif grid:
            raise ConfigError(f"sweep.params.{d.key}: sweep.search=grid needs choice or range values, not "
                              f"{d.expression!r}")
        else:
            space[d.key] = tune.loguniform(d.low, d.high) if d.log else tune.uniform(d.low, d.high)
    return space


def check_points(dims: list[Dimension]) -> list[dict[str, Any]]:
    """The points every trial must be able to take: the whole grid when all dimensions are
    discrete, else each dimension's every value or both bounds, with the others at their first."""
    if all(d.values is not None for d in dims):
        return [dict(zip([d.key for d in dims], combo)) for combo in itertools.product(*(d.values for d in dims))]
    first = {d.key: d.values[0] if d.values is not None else d.low for d in dims}
    points: list[dict[str, Any]] = []
    for d in dims:
        for v in d.values if d.values is not None else (d.low, d.high):
            if {**first, d.key: v} not in points:
                points.append({**first, d.key: v})
    return points


def point_of(config: dict[str, Any], dims: list[Dimension]) -> dict[str, Any]:
    """A Tune trial's config -> {key: value} for the space's keys."""
    return {d.key: config[d.key] for d in dims}


def trial_seed(job: JobConfig, index: int) -> int:
    """Trial `index` (0-based) draws its own weights noise and data order unless sweep.same_seed."""
    return job.seed if job.sweep.same_seed else job.seed + index


def trial_job(base: JobConfig, *, point: dict[str, Any], run_dir: str, name: str, seed: int,
              driver_checks: bool = True) -> JobConfig:
    """The base job with a point of the space applied, its own run dir, name, seed and W&B group,
    typed and validated again exactly as at compose (`to_job`). ConfigError names the key and the point."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ftcluster.compose import to_job

    group = base.logger.group or base.sweep.name or base.run.name
    cfg = OmegaConf.structured(dataclasses.replace(
        base, run=dataclasses.replace(base.run, dir=run_dir, name=name), seed=seed,
        logger=dataclasses.replace(base.logger, group=group)))
    where = ", ".join(f"{k}={v}" for k, v in point.items())
    try:
        for key, value in point.items():
            if OmegaConf.select(cfg, key, default="<missing>") == "<missing>":
                raise ConfigError(f"{key}: not a key of the config")
            OmegaConf.update(cfg, key, value, merge=False)
        return to_job(cfg, driver_checks=driver_checks)
    except ConfigError as e:
        raise ConfigError(f"{e} (sweep point {where})") from None
    except OmegaConfBaseException as e:
        msg = (getattr(e, "msg", None) or str(e)).splitlines()[0]
        raise ConfigError(f"{getattr(e, 'full_key', None) or '<config>'}: {msg} (sweep point {where})") from None
