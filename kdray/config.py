"""Typed, frozen experiment configuration (DESIGN.md section 4).

YAML only fills these dataclasses. Every value is checked before any compute: an unknown key, a
wrong type or an out-of-range value raises :class:`ConfigError` naming the file, the dotted key and
what was expected. Ranges and choices live next to the field (``_f(default, lo=, hi=, choices=)``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range."""


def _f(default, *, lo=None, hi=None, choices=None, doc: str = ""):
    """A dataclass field with validation metadata; mutable defaults are wrapped in a factory."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "doc": doc}
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class SynthConfig:
    """SynthPose generation (kdray data synth): sizes and difficulty of the embedded dataset
    (kdray.data.synthpose.Difficulty; these defaults are the full SynthPose)."""
    train: int = _f(4000, lo=1)
    val: int = _f(500, lo=1)
    seed: int = _f(0, lo=0)
    max_persons: int = _f(4, lo=1, hi=4)
    crowd_p: float = _f(0.4, lo=0.0, hi=1.0)
    occluder_p: float = _f(0.15, lo=0.0, hi=1.0)
    side_p: float = _f(0.25, lo=0.0, hi=1.0)
    back_p: float = _f(0.25, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class DataConfig:
    """Where the data lives and how person crops are made (METHODS.md section 0)."""
    dataset: str = _f("synthpose", choices=("synthpose", "coco", "crowdpose", "mpii"))
    root: str = "data/synthpose"          # folder holding the annotation files and images
    train_ann: str = "train.json"         # relative to root
    val_ann: str = "val.json"
    image_dir: str = "images"             # relative to root
    val_boxes: str = ""                   # detector results file (COCO results format); "" = GT boxes
    det_score_thr: float = _f(0.0, lo=0.0, hi=1.0)
    input_size: tuple[int, int] = (96, 64)  # (H, W) of the crop the model sees
    split_ratio: float = _f(2.0, lo=1.0, hi=4.0)  # SimCC bins per pixel, k
    sigma: float = _f(3.0, lo=0.1, hi=50.0)       # label-smoothing Gaussian std, in bins
    padding: float = _f(1.25, lo=1.0, hi=2.0)
    flip_prob: float = _f(0.5, lo=0.0, hi=1.0)
    scale_range: tuple[float, float] = (0.75, 1.25)
    rotation: float = _f(40.0, lo=0.0, hi=180.0)
    rotation_prob: float = _f(0.6, lo=0.0, hi=1.0)
    half_body_prob: float = _f(0.3, lo=0.0, hi=1.0)
    num_workers: int = _f(2, lo=0, hi=64)
    # Training crops from pre-warped Parquet shards (kdray/data/shards.py): built once per
    # dataset + crop-config hash. auto = on for >= 1000 training persons (bench/RESULTS.md).
    shards: str = _f("off", choices=("auto", "on", "off"))
    shard_codec: str = _f("raw", choices=("raw", "jpeg"))  # raw: no decode; jpeg: ~10x smaller
    max_train: int = _f(0, lo=0)          # 0 = every training person; else the first N (smoke runs)
    synth: SynthConfig = _f(SynthConfig())


@dataclass(frozen=True)
class ModelConfig:
    """A SimCC pose model: timm backbone name (kdray.nn.backbones.BACKBONES) + head."""
    backbone: str = "hrnet_w18_small"
    head_init_scale: float = _f(0.1, lo=0.0, hi=10.0)  # DEMO-FACTS: small last Linear avoids a plateau
    weights: str = ""                      # optional local backbone weights file (nothing downloads)


@dataclass(frozen=True)
class TrainConfig:
    """The plain fit loop (kdray.train.fit)."""
    epochs: int = _f(10, lo=1)
    batch_size: int = _f(32, lo=1)
    lr: float = _f(2e-3, lo=0.0, hi=1.0)
    weight_decay: float = _f(0.0, lo=0.0)
    scheduler: str = _f("cosine", choices=("cosine", "multistep"))
    milestones: tuple[int, ...] = ()      # epochs where multistep multiplies lr by lr_gamma
    lr_gamma: float = _f(0.1, lo=0.0, hi=1.0)
    warmup_iters: int = _f(0, lo=0)
    grad_clip: float = _f(0.0, lo=0.0)    # max grad norm; 0 = off
    precision: str = _f("auto", choices=("auto", "fp32", "bf16"))
    channels_last: str = _f("auto", choices=("auto", "on", "off"))
    # torch.compile of the pose networks (in place: checkpoints keep their keys); auto = on
    # CUDA only (on CPU the build takes minutes for a few-% gain: bench/RESULTS.md)
    compile: str = _f("auto", choices=("auto", "on", "off"))
    eval_every: int = _f(1, lo=1)
    flip_test: bool = True
    seed: int = _f(0, lo=0)
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    log_every: int = _f(20, lo=1)


@dataclass(frozen=True)
class StageConfig:
    """One model and how it is trained."""
    model: ModelConfig = _f(ModelConfig())
    train: TrainConfig = _f(TrainConfig())


@dataclass(frozen=True)
class TSDStage1Config:
    """TSD stage 1 losses, Eqs. (1)-(5). Table IV rows switch terms off."""
    feature: bool = True                  # L_fea, Eq. (1)
    pose: bool = True                     # L1 pose part of L_pos, Eq. (2)
    structure: bool = True                # L_cst, Eq. (3)
    alpha: float = _f(5e-5, lo=0.0)
    beta: float = _f(0.1, lo=0.0)
    edge_weights: str = _f("uniform", choices=("uniform", "inverse_length"))
    gamma_decay: bool = True              # gamma(t), Eq. (4); False keeps gamma = 1


@dataclass(frozen=True)
class TSDStage2Config:
    """TSD stage 2: IGP-GCN on the frozen student, Eqs. (6)-(7)."""
    mode: str = _f("teacher", choices=("none", "gt", "teacher"))  # supervision of the GCN
    hidden: int = _f(128, lo=4)
    delta: float = _f(0.3, lo=0.0)
    lam: float = _f(0.5, lo=0.0)          # the paper's lambda
    xi: float = _f(1.0, lo=0.0)
    train: TrainConfig = _f(TrainConfig(epochs=30, lr=1e-3))


@dataclass(frozen=True)
class TSDConfig:
    stage1: TSDStage1Config = _f(TSDStage1Config())
    stage2: TSDStage2Config = _f(TSDStage2Config())


@dataclass(frozen=True)
class CDKDConfig:
    """CDKD (cross-resolution KD): SAPE, CCA, ETHT. METHODS.md section 2."""
    student: StageConfig = _f(StageConfig())
    low_res_size: tuple[int, int] = (32, 32)  # (H, W) of the student's input
    projectors: int = _f(3, lo=1, hi=8)   # N, Table VI
    sau: bool = True                      # scale-adaptive unit; False = plain mean of projectors
    sau_kernels: str = "1-1-2-0"          # counts of 3x3, 5x5, 7x7, 9x9 branches, Table VII
    feature_loss: bool = True             # L_fea, Eq. (5)
    logit_loss: bool = True               # CCA + tau^2 KL, Eqs. (6)-(7)
    alpha: float = _f(1.0, lo=0.0)
    beta: float = _f(1.0, lo=0.0)
    tau_init: float = _f(4.0, lo=0.01)
    tau_range: tuple[float, float] = (1.0, 10.0)
    etht: tuple[str, ...] = ("tau",)      # learnt by gradient reversal; () = NECM (fixed tau)
    xi_max: float = _f(1.0, lo=0.0)
    xi_schedule: str = _f("cosine", choices=("cosine", "ctkd"))


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = ""                         # "" = $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db
    experiment: str = "kdray"
    register: bool = True


@dataclass(frozen=True)
class RayConfig:
    num_workers: int = _f(1, lo=0, hi=1024)  # 0 = run the stage in-process
    use_gpu: str = _f("auto", choices=("auto", "yes", "no"))
    cpus_per_worker: float = _f(1.0, lo=0.01)
    max_failures: int = _f(2, lo=0)
    storage_path: str = ""                # "" = <stage cache>/ray (resumable across reruns)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "kdray"
    data: DataConfig = _f(DataConfig())
    teacher: StageConfig = _f(StageConfig())
    student: StageConfig = _f(StageConfig(model=ModelConfig(backbone="mobilenetv3_small_100")))
    tsd: TSDConfig = _f(TSDConfig())
    cdkd: CDKDConfig = _f(CDKDConfig())
    tracking: TrackingConfig = _f(TrackingConfig())
    ray: RayConfig = _f(RayConfig())


# ----------------------------------------------------------------------------- validation

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, where: str):
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list ({_type_name(tp)}), got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if value != value:
            raise ConfigError(f"{where}: expected a number, got NaN")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def _build(cls, data: dict, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or '<top>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{source}: {key}: unknown key (known here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        f, tp, key = fields[name], hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".", source)
            continue
        choices = f.metadata.get("choices") or ()
        if isinstance(value, bool) and "on" in choices:  # YAML 1.1 reads on/off as booleans
            value = "on" if value else "off"
        value = _coerce(value, tp, f"{source}: {key}")
        _check_range(value, f.metadata, f"{source}: {key}")
        kwargs[name] = value
    # Nested defaults are merged, so YAML may give only part of a section.
    base = cls()
    merged = {}
    for name, value in kwargs.items():
        if dataclasses.is_dataclass(value):
            value = _merge(getattr(base, name), value, data[name])
        merged[name] = value
    return dataclasses.replace(base, **merged)


def _merge(default, built, given: dict):
    """Keep default values of a nested section for keys the YAML did not give."""
    updates = {}
    for name in given:
        value = getattr(built, name)
        if dataclasses.is_dataclass(value):
            value = _merge(getattr(default, name), value, given[name])
        updates[name] = value
    return dataclasses.replace(default, **updates)


def _check_range(value, meta, where: str) -> None:
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: expected one of {list(choices)}, got {value!r}")
    if lo is not None and value < lo:
        raise ConfigError(f"{where}: expected a value >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: expected a value <= {hi}, got {value!r}")


def _extra_checks(cfg: ExperimentConfig, source: str) -> None:
    """Cross-field rules that a single field's range cannot express."""
    for key in ("input_size",):
        h, w = getattr(cfg.data, key)
        if h <= 0 or w <= 0:
            raise ConfigError(f"{source}: data.{key}: expected positive (H, W), got {(h, w)}")
    lo, hi = cfg.data.scale_range
    if not 0 < lo <= hi:
        raise ConfigError(f"{source}: data.scale_range: expected 0 < lo <= hi, got {(lo, hi)}")
    synth = cfg.data.synth
    if synth.side_p + synth.back_p > 1:
        raise ConfigError(f"{source}: data.synth.back_p: side_p + back_p must be <= 1, got "
                          f"{synth.side_p} + {synth.back_p}")
    t_lo, t_hi = cfg.cdkd.tau_range
    if not 0 < t_lo <= cfg.cdkd.tau_init <= t_hi:
        raise ConfigError(f"{source}: cdkd.tau_init: expected within tau_range {(t_lo, t_hi)}, "
                          f"got {cfg.cdkd.tau_init}")
    bad = [t for t in cfg.cdkd.etht if t not in ("tau", "alpha", "beta")]
    if bad:
        raise ConfigError(f"{source}: cdkd.etht: expected a subset of [tau, alpha, beta], got {bad}")
    parts = cfg.cdkd.sau_kernels.split("-")
    if len(parts) != 4 or not all(p.isdigit() for p in parts) or sum(map(int, parts)) == 0:
        raise ConfigError(f"{source}: cdkd.sau_kernels: expected four counts like '1-1-2-0' "
                          f"(3x3, 5x5, 7x7, 9x9), got {cfg.cdkd.sau_kernels!r}")


# ----------------------------------------------------------------------------- public API

def parse_override(text: str) -> tuple[str, Any]:
    """``'a.b.c=value'`` -> (``'a.b.c'``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def set_dotted(tree: dict, key: str, value) -> None:
    node = tree
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    node[parts[-1]] = value


def from_dict(data: dict, source: str = "<dict>", cls=ExperimentConfig):
    cfg = _build(cls, data or {}, "", source)
    if cls is ExperimentConfig:
        _extra_checks(cfg, source)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Load a YAML file (or defaults when ``path`` is None) and apply dotted overrides."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{source}: file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    if overrides:
        source += " (with overrides " + " ".join(overrides) + ")"
    return from_dict(data, source)


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists), ready for YAML/JSON."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def dump_yaml(cfg, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def flatten(cfg, prefix: str = "") -> dict[str, Any]:
    """``{'data.input_size': [96, 64], ...}``: MLflow params and search-space validation."""
    out = {}
    for k, v in (to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def get_dotted(cfg, key: str):
    node = cfg
    for p in key.split("."):
        if not hasattr(node, p):
            raise ConfigError(f"{key}: unknown key")
        node = getattr(node, p)
    return node


def with_overrides(cfg: ExperimentConfig, values: dict[str, Any], source: str = "<overrides>"):
    """A new validated config with dotted ``values`` applied (sweeps, ablation rows)."""
    data = to_dict(cfg)
    for key, value in values.items():
        get_dotted(cfg, key)  # unknown keys fail here, naming the key
        set_dotted(data, key, value)
    return from_dict(data, source)


def config_hash(*parts) -> str:
    """Stable short hash of config sections (dataclasses or plain values) and input hashes."""
    blob = json.dumps([to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
