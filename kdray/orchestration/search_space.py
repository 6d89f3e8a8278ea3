"""Search spaces (``search_spaces/*.yaml``): dotted config field -> distribution.

A file names the stage each trial trains and its parameters::

    stage: cdkd                          # teacher | student | gcn | cdkd
    metric: val_AP                       # optional; default: the dataset's primary val metric
                                         # (val_err_* joint errors are minimised)
    params:
      cdkd.projectors: {int: [1, 5]}
      cdkd.alpha: {loguniform: [0.1, 10.0]}
      cdkd.sau_kernels: {choice: [[1, 1, 2, 0], [1, 1, 1, 1]], when: {cdkd.sau: true}}

Distributions: ``loguniform``/``uniform`` [low, high] (floats), ``int`` [low, high] (inclusive),
``choice`` [values] and ``grid`` [values] (a choice whose every value is tried first: the grid's
points are queued in Optuna before TPE takes over). ``when`` makes a parameter conditional on
parameters listed above it (Optuna define-by-run); an unsampled one keeps the config's value.

:func:`load_space` validates a file against the config dataclasses before any trial starts:
an unknown field, an unknown distribution, an empty or inverted range, or a value the config's
own validation refuses raises :class:`ConfigError` naming the file and the key. Non-scalar
choices (ETHT target lists, kernel count vectors) reach Optuna as string labels ("tau-alpha",
"1-1-2-0"; docs/operations.md, Tune: no tuples in Optuna's storage) and are decoded back for
the config.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdray.config import ConfigError, ExperimentConfig, get_dotted, read_yaml, with_overrides
from kdray.stages import STAGES, Stage

KINDS = ("loguniform", "uniform", "int", "choice", "grid")


@dataclass(frozen=True)
class Param:
    key: str                       # dotted config field
    kind: str                      # one of KINDS
    args: tuple                    # (low, high) or the choices (config values)
    when: dict = field(default_factory=dict)   # {dotted key: required value}

    @property
    def labels(self) -> list:
        """What Optuna sees for a choice/grid: scalars as they are, lists as 'a-b-c'."""
        return [label(v) for v in self.args]


@dataclass(frozen=True)
class SearchSpace:
    file: str
    stage: Stage                   # the stage kind each trial trains
    metric: str                    # "" = the dataset's primary metric
    params: tuple[Param, ...]

    def overrides(self, sampled: dict, base: ExperimentConfig) -> dict[str, Any]:
        """Optuna's sampled labels -> dotted config values (for ``with_overrides``)."""
        out = {}
        for p in self.params:
            if p.key in sampled:
                out[p.key] = config_value(p, sampled[p.key], base)
        return out

    def grid_points(self) -> list[dict]:
        """Every combination of the ``grid`` parameters (Optuna labels), queued first."""
        grids = [p for p in self.params if p.kind == "grid"]
        return [dict(zip([p.key for p in grids], combo))
                for combo in itertools.product(*[p.labels for p in grids])] if grids else []


def label(value):
    if isinstance(value, (list, tuple)):
        return "-".join(str(v) for v in value)
    return value


def config_value(p: Param, sampled, base: ExperimentConfig):
    """The config value for ``sampled`` (a label for choices, a number otherwise)."""
    if p.kind in ("choice", "grid"):
        value = p.args[p.labels.index(sampled)]
        if isinstance(value, (list, tuple)) and isinstance(get_dotted(base, p.key), str):
            return label(value)       # a count vector for a string field: "1-1-2-0"
        return list(value) if isinstance(value, tuple) else value
    return sampled


class define_by_run:  # noqa: N801 - used like a function; a class so Tune can pickle it
    """The Optuna define-by-run function: suggests each parameter whose ``when`` holds."""

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial) -> None:
        chosen: dict = {}
        for p in self.space.params:
            if any(chosen.get(k, _MISSING) != v for k, v in p.when.items()):
                continue
            if p.kind in ("loguniform", "uniform"):
                chosen[p.key] = trial.suggest_float(p.key, float(p.args[0]), float(p.args[1]),
                                                    log=p.kind == "loguniform")
            elif p.kind == "int":
                chosen[p.key] = trial.suggest_int(p.key, int(p.args[0]), int(p.args[1]))
            else:  # conditions compare config values, e.g. {cdkd.sau: true}
                picked = trial.suggest_categorical(p.key, p.labels)
                chosen[p.key] = p.args[p.labels.index(picked)]


_MISSING = object()


def make_sampler(seed: int):
    """Optuna 5's TPE for kdray's spaces. A ``when`` makes the space conditional (SAU kernels
    only with ``cdkd.sau: true``); plain multivariate TPE then falls back to independent
    sampling with a warning, ``group=True`` models each set of co-occurring parameters jointly."""
    import warnings

    import optuna
    with warnings.catch_warnings():   # group is "experimental" in Optuna 5: it works, say less
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed)


# ----------------------------------------------------------------------------- loading

def load_space(path: str | Path, base: ExperimentConfig) -> SearchSpace:
    """Read and validate a search-space file against ``base`` (the sweep's config)."""
    source = str(path)
    data = read_yaml(path)           # duplicate keys, directories, binary files: ConfigError
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'stage' and 'params'")
    unknown = sorted(set(data) - {"stage", "metric", "params"})
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]}: unknown key (known: metric, params, stage)")
    stage = data.get("stage")
    if stage not in STAGES:
        raise ConfigError(f"{source}: stage: expected one of {list(STAGES)}, got {stage!r}")
    raw = data.get("params")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: params: expected a non-empty mapping of dotted fields")
    params: list[Param] = []
    for key, spec in raw.items():
        params.append(_param(source, str(key), spec, base, {p.key: p for p in params}))
    metric = data.get("metric") or ""
    reported = reported_metrics(base)
    if metric and metric not in reported:   # Tune would wait for a metric no trial reports
        raise ConfigError(f"{source}: metric: {metric!r} is not a metric the {stage} stage "
                          f"reports on {base.data.dataset}: one of {', '.join(reported)}")
    return SearchSpace(source, STAGES[stage], str(metric), tuple(params))


def reported_metrics(cfg: ExperimentConfig) -> tuple[str, ...]:
    """What every trial reports that a sweep can optimise: ``val_`` + the evaluator's keys
    (kdray.train.fit, kdray.eval.runner.score; SynthPose adds the CrowdPose crowd buckets),
    and, evaluated on GT boxes, the joint errors ``val_err_visible``/``val_err_occluded`` of the
    keypoint datasets (lower is better: :func:`metric_mode`)."""
    from kdray.data.keypoints import MPII_PCKH_GROUPS
    from kdray.eval.coco import BUCKET_KEYS, COCO_KEYS, CROWDPOSE_KEYS
    # joint errors are scored against GT boxes only (kdray.eval.runner.score)
    errors = () if cfg.data.val_boxes else ("err_visible", "err_occluded")
    keys = {"coco": COCO_KEYS + errors, "synthpose": COCO_KEYS + BUCKET_KEYS + errors,
            "crowdpose": CROWDPOSE_KEYS + errors,
            "mpii": (*MPII_PCKH_GROUPS, "Mean")}[cfg.data.dataset]
    return tuple(f"val_{k}" for k in keys)


def metric_mode(metric: str) -> str:
    """Tune's and Optuna's ``mode`` for a reported metric: joint errors are minimised, AP and
    PCKh maximised."""
    return "min" if metric.startswith("val_err_") else "max"


def _param(source: str, key: str, spec, base: ExperimentConfig,
           earlier: dict[str, Param]) -> Param:
    where = f"{source}: {key}"
    try:
        current = get_dotted(base, key)
    except ConfigError:
        raise ConfigError(f"{where}: unknown config field") from None
    if hasattr(current, "__dataclass_fields__"):
        raise ConfigError(f"{where}: is a config section, not a field")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping like {{loguniform: [1e-5, 1e-3]}}")
    when = spec.get("when") or {}
    kinds = [k for k in spec if k != "when"]
    if len(kinds) != 1 or kinds[0] not in KINDS:
        raise ConfigError(f"{where}: expected exactly one distribution of {list(KINDS)}, "
                          f"got {kinds}")
    kind, args = kinds[0], spec[kinds[0]]
    if not isinstance(when, dict) or any(k not in earlier for k in when):
        raise ConfigError(f"{where}: when: expected conditions on parameters listed above "
                          f"({list(earlier)}), got {when!r}")
    when = {k: _condition(where, k, v, earlier[k]) for k, v in when.items()}
    numeric = kind in ("loguniform", "uniform", "int")
    if numeric and (isinstance(current, bool) or not isinstance(current, (int, float))):
        raise ConfigError(f"{where}: {kind}: the field holds a {type(current).__name__} "
                          f"({current!r}), not a number; sample it with choice or grid")
    if numeric and kind != "int" and isinstance(current, int):  # every trial would be refused
        raise ConfigError(f"{where}: {kind}: the field is an integer (now {current!r}) and "
                          f"{kind} samples floats such as 1.38; use int: [low, high]")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {kind}: expected a non-empty list of values")
        args = tuple(tuple(a) if isinstance(a, list) else a for a in args)
        labels = [label(a) for a in args]
        if len(set(map(repr, labels))) != len(labels):
            raise ConfigError(f"{where}: {kind}: values repeat: {labels}")
        values = args
    else:
        if (not isinstance(args, list) or len(args) != 2
                or not all(isinstance(a, (int, float)) and not isinstance(a, bool)
                           for a in args)):
            raise ConfigError(f"{where}: {kind}: expected [low, high] numbers, got {args!r}")
        low, high = args
        if kind == "int" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: int: expected integer bounds, got {args!r}")
        if not (low < high if kind != "int" else low <= high):
            raise ConfigError(f"{where}: {kind}: expected low < high, got {args!r}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform: expected low > 0, got {low!r}")
        if not all(math.isfinite(a) for a in args):
            raise ConfigError(f"{where}: {kind}: expected finite bounds, got {args!r}")
        args = (low, high)
        values = args
    p = Param(key, kind, args, when)
    for v in values:  # every endpoint / choice must be a value the config accepts
        value = config_value(p, label(v), base) if kind in ("choice", "grid") else v
        try:
            with_overrides(base, {key: value}, source="the config")
        except ConfigError as e:
            raise ConfigError(f"{where}: value {value!r} is refused by the config ({e})") from None
    return p


def _condition(where: str, key: str, value, cond: Param):
    """A ``when`` value as define_by_run compares it (lists as tuples, like the choices); it
    must be a value the parameter ``key`` can take, else the parameter is never sampled."""
    value = tuple(value) if isinstance(value, list) else value
    if cond.kind in ("choice", "grid"):
        if not any(type(a) is type(value) and a == value for a in cond.args):  # True is not 1
            raise ConfigError(f"{where}: when: {key}: {label(value)!r} is not one of its "
                              f"values {cond.labels}")
    elif cond.kind == "int":
        low, high = cond.args
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{where}: when: {key}: {value!r} is not an integer in its range "
                              f"[{low}, {high}]")
    else:
        raise ConfigError(f"{where}: when: {key} is sampled from a continuous {cond.kind} "
                          f"range and would almost never equal {value!r}; condition on a "
                          f"choice, grid or int parameter")
    return value
