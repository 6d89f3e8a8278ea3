"""Typed, frozen experiment configuration (docs/architecture.md, "Configuration").

YAML only fills these dataclasses. Every value is checked before any compute: an unknown key, a
wrong type or an out-of-range value raises :class:`ConfigError` naming the file, the dotted key and
what was expected. Ranges, choices and the field's description live next to it
(``_f(default, lo=, hi=, choices=, doc=)``); docs/config.md is generated from them
(``python -m kdray.config_reference``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
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
    train: int = _f(4000, lo=1, doc="training persons to generate")
    val: int = _f(500, lo=1, doc="validation persons to generate")
    seed: int = _f(0, lo=0, doc="generator seed: the same seed and settings give the same data")
    max_persons: int = _f(4, lo=1, hi=4, doc="most persons drawn in one image")
    crowd_p: float = _f(0.4, lo=0.0, hi=1.0,
                        doc="chance that a multi-person image is an overlapping crowd")
    occluder_p: float = _f(0.15, lo=0.0, hi=1.0,
                           doc="chance that an object hides part of a person")
    side_p: float = _f(0.25, lo=0.0, hi=1.0, doc="chance of a side view (any yaw)")
    back_p: float = _f(0.25, lo=0.0, hi=1.0,
                       doc="chance of a person turned away; side_p + back_p must be <= 1")


@dataclass(frozen=True)
class DataConfig:
    """Where the data lives and how person crops are made (docs/methods.md section 1, SimCC
    base)."""
    dataset: str = _f("synthpose", choices=("synthpose", "coco", "crowdpose", "mpii"),
                      doc="keypoint layout, reader and metric: synthpose/coco (COCO-17, OKS AP), "
                          "crowdpose (CrowdPose-14, AP^E/M/H), mpii (MPII-16, PCKh@0.5)")
    root: str = _f("data/synthpose",
                   doc="folder holding the annotation files and images; a relative path is "
                       "resolved against the pipeline's --storage; SynthPose is generated here "
                       "on first use")
    train_ann: str = _f("train.json", doc="training annotation file, relative to root")
    val_ann: str = _f("val.json", doc="validation annotation file, relative to root")
    image_dir: str = _f("images", doc="image folder of both splits, relative to root (used where "
                                      "train_images / val_images are empty)")
    train_images: str = _f("", doc="training image folder, relative to root (COCO: train2017); "
                                   "empty = image_dir")
    val_images: str = _f("", doc="validation image folder, relative to root (COCO: val2017); "
                                 "empty = image_dir")
    val_boxes: str = _f("", doc="detector results file (COCO results format, relative to root) "
                                "for the val persons, e.g. CrowdPose's or COCO's person "
                                "detections; empty = ground-truth boxes")
    det_score_thr: float = _f(0.0, lo=0.0, hi=1.0,
                              doc="detector boxes scoring below this are dropped (val_boxes only)")
    input_size: tuple[int, int] = _f((96, 64), doc="(H, W) of the crop the model sees; HRNet "
                                                   "needs both divisible by 32")
    split_ratio: float = _f(2.0, lo=1.0, hi=4.0,
                            doc="SimCC bins per pixel k: W*k x-bins and H*k y-bins")
    sigma: float = _f(3.0, lo=0.1, hi=50.0,
                      doc="std of the label-smoothing Gaussian, in bins at input_size; scaled "
                          "per axis for other sizes (the CDKD low-res view)")
    padding: float = _f(1.25, lo=1.0, hi=2.0,
                        doc="box enlargement after fixing the box to the input aspect ratio")
    flip_prob: float = _f(0.5, lo=0.0, hi=1.0,
                          doc="training: chance of a horizontal flip (joints swap by flip pairs)")
    scale_range: tuple[float, float] = _f((0.75, 1.25),
                                          doc="training: box scale multiplied by U(lo, hi); "
                                              "0 < lo <= hi")
    rotation: float = _f(40.0, lo=0.0, hi=180.0, doc="training: rotation ~ U(-rotation, "
                                                      "rotation) degrees")
    rotation_prob: float = _f(0.6, lo=0.0, hi=1.0,
                              doc="training: chance that a crop is rotated at all")
    half_body_prob: float = _f(0.3, lo=0.0, hi=1.0,
                               doc="training: chance of cropping the upper or lower body only")
    num_workers: int = _f(2, lo=0, hi=64, doc="DataLoader worker processes (0 = in the "
                                              "training process); not part of any stage key")
    # Built once per dataset + crop-config hash; auto's threshold is measured (bench/RESULTS.md).
    shards: str = _f("off", choices=("auto", "on", "off"),
                     doc="train from pre-warped Parquet crop shards (kdray/data/shards.py) "
                         "instead of decoding JPEGs every epoch; auto = on for >= 1000 "
                         "training persons")
    shard_codec: str = _f("raw", choices=("raw", "jpeg"),
                          doc="how shards store crops: raw (no decode) or jpeg (~10x smaller)")
    max_train: int = _f(0, lo=0, doc="use only the first N training persons (smoke runs); "
                                     "0 = all")
    synth: SynthConfig = _f(SynthConfig(), doc="SynthPose generation settings (dataset "
                                               "synthpose only)")


@dataclass(frozen=True)
class ModelConfig:
    """A SimCC pose model: timm backbone name (kdray.nn.backbones.BACKBONES) + head."""
    backbone: str = _f("hrnet_w18_small",
                       doc="timm backbone, a key of kdray.nn.backbones.BACKBONES (HRNet-W18-small"
                           "/W32/W48, ResNet-18/50, MobileNetV3-small/large), e.g. hrnet_w32")
    # Why small: PyTorch's default init makes softmax(10 * logits) start peaked on random bins
    # and training plateaus for minutes (docs/operations.md, "CPU demo facts").
    head_init_scale: float = _f(0.1, lo=0.0, hi=10.0,
                                doc="factor on the initial weights of the SimCC head's two "
                                    "Linear classifiers (biases start at 0); 1.0 = PyTorch's "
                                    "default init")
    pretrained: bool = _f(False, doc="start the backbone from timm's ImageNet weights, as the "
                                     "papers do: downloaded into the Hugging Face cache when "
                                     "online, read from it offline; an entry point fails before "
                                     "any compute when neither works (then use weights)")
    weights: str = _f("", doc="local timm classification checkpoint for the backbone (state "
                              "dict .pth or .safetensors, e.g. timm's model.safetensors; read "
                              "with weights_only=True); the classifier is skipped, any other "
                              "key that does not fit fails; empty = random init (or pretrained)")
    # With per-rank BatchNorm, N workers normalise over batch/N samples each: data parallelism
    # then changes results, not only speed (docs/operations.md, "Several workers").
    freeze_bn: bool = _f(False, doc="keep BatchNorm statistics fixed while training (BN layers "
                                    "in eval mode; their affine weights still train)")
    sync_bn: str = _f("auto", doc="SyncBatchNorm across the Ray Train workers (CUDA only; on "
                                  "CPU each rank keeps its own statistics); auto = on with 2+ "
                                  "GPU workers", choices=("auto", "on", "off"))


@dataclass(frozen=True)
class TrainConfig:
    """The plain fit loop (kdray.train.fit)."""
    epochs: int = _f(10, lo=1, doc="training epochs T (also TSD's gamma(t) and ETHT's reversal-"
                                   "strength horizon)")
    batch_size: int = _f(32, lo=1, doc="global batch size, split over the Ray Train workers")
    lr: float = _f(2e-3, lo=0.0, hi=1.0, doc="Adam learning rate")
    weight_decay: float = _f(0.0, lo=0.0, doc="Adam weight decay (L2)")
    scheduler: str = _f("cosine", choices=("cosine", "multistep"),
                        doc="per-step lr schedule: cosine to 0 over the run, or multistep "
                            "(x lr_gamma at each milestone epoch)")
    milestones: tuple[int, ...] = _f((), doc="epochs where multistep multiplies lr by lr_gamma")
    lr_gamma: float = _f(0.1, lo=0.0, hi=1.0, doc="multistep decay factor")
    warmup_iters: int = _f(0, lo=0, doc="linear lr warm-up over this many optimizer steps; "
                                        "0 = none")
    grad_clip: float = _f(0.0, lo=0.0, doc="max gradient norm; 0 = no clipping")
    precision: str = _f("auto", choices=("auto", "fp32", "bf16"),
                        doc="bf16 autocast or fp32; auto = bf16 on CUDA, fp32 on CPU (the "
                            "SimCC head always runs in fp32)")
    channels_last: str = _f("auto", choices=("auto", "on", "off"),
                            doc="channels_last memory format for the networks; auto = on")
    # On CPU the build takes minutes for a few-% gain (bench/RESULTS.md), hence auto = CUDA only.
    compile: str = _f("auto", choices=("auto", "on", "off"),
                      doc="torch.compile the pose networks in place (checkpoints keep their "
                          "keys); auto = on CUDA only")
    eval_every: int = _f(1, lo=1, doc="evaluate on the val set every N epochs (and always "
                                      "after the last)")
    flip_test: bool = _f(True, doc="evaluate with flip test (average with the mirrored crop's "
                                   "logits)")
    seed: int = _f(0, lo=0, doc="seed of the initial weights, the shuffling and the "
                                "augmentation")
    device: str = _f("auto", choices=("auto", "cpu", "cuda"),
                     doc="device of the plain loop; auto = cuda when available (Ray Train "
                         "workers use the device Ray assigns)")
    # A transfer set (README "Distillation that wins at demo size"): the student has labels for
    # part of the persons, the teacher (trained on all of them) distils on the rest.
    labelled: int = _f(0, lo=0, doc="GT labels for the first N training persons only; the others "
                                    "form a transfer set with no task loss, where a student's "
                                    "pose and logit distillation terms (and a GCN's teacher "
                                    "target) cover every joint; a refinement stage needs its "
                                    "student's value (0 = all labelled)")


@dataclass(frozen=True)
class TrainedModelConfig:
    """One model and how it is trained."""
    model: ModelConfig = _f(ModelConfig(), doc="the SimCC pose network")
    train: TrainConfig = _f(TrainConfig(), doc="how it is trained")


@dataclass(frozen=True)
class TSDStage1Config:
    """TSD stage 1 losses, Eqs. (1)-(5) (docs/methods.md section 2.1). Table IV rows switch
    terms off; with all three off the student is the undistilled baseline (no teacher)."""
    feature: bool = _f(True, doc="L_fea, TSD Eq. (1): MSE between the teacher's last feature and "
                                 "a 1x1 conv of the student's")
    pose: bool = _f(True, doc="the L1 pose term of L_pos, TSD Eq. (2), on soft-argmax joint "
                              "coordinates")
    structure: bool = _f(True, doc="L_cst, TSD Eq. (3): skeleton edge-length differences (part "
                                   "of L_pos)")
    alpha: float = _f(5e-5, lo=0.0, doc="weight alpha of L_fea in TSD Eq. (5)")
    beta: float = _f(0.1, lo=0.0, doc="weight beta of L_pos (L1 pose + L_cst) in TSD Eq. (5)")
    edge_weights: str = _f("uniform", choices=("uniform", "inverse_length"),
                           doc="w_ij of TSD Eq. (3): uniform 1/|E|, or proportional to 1 / mean "
                               "GT edge length over the training set (sum 1)")
    gamma_decay: bool = _f(True, doc="scale the KD terms by gamma(t) = 1 - (t-1)/T, TSD Eq. (4); "
                                     "false keeps gamma = 1")


@dataclass(frozen=True)
class TSDStage2Config:
    """TSD stage 2: IGP-GCN on the frozen student, Eqs. (6)-(7) (docs/methods.md section 2.2)."""
    mode: str = _f("teacher", choices=("gt", "teacher"),
                   doc="supervision of the IGP-GCN: the teacher's pose (Table IV s5/s6) or "
                       "the ground truth (row s1); a run without stage 2 lists the stages it "
                       "runs instead (configs/ablations.yaml `stages`)")
    hidden: int = _f(128, lo=4, doc="node feature size of the IGP-GCN (OPEC-Net: 128)")
    delta: float = _f(0.3, lo=0.0, doc="weight delta of block 1's loss in TSD Eq. (7)")
    lam: float = _f(0.5, lo=0.0, doc="weight lambda of block 2's loss in TSD Eq. (7)")
    xi: float = _f(1.0, lo=0.0, doc="weight xi of block 3's loss in TSD Eq. (7)")
    train: TrainConfig = _f(TrainConfig(epochs=30, lr=1e-3),
                            doc="training of the IGP-GCN (the student stays frozen)")


@dataclass(frozen=True)
class TSDConfig:
    """TSD, two-stage distillation (docs/methods.md section 2)."""
    stage1: TSDStage1Config = _f(TSDStage1Config(),
                                 doc="stage 1 losses (the student section says what is trained)")
    stage2: TSDStage2Config = _f(TSDStage2Config(), doc="stage 2: the IGP-GCN refinement")


@dataclass(frozen=True)
class CDKDConfig:
    """CDKD (cross-resolution KD): SAPE, CCA, ETHT (docs/methods.md section 3)."""
    student: TrainedModelConfig = _f(TrainedModelConfig(), doc="the low-resolution student and its training")
    low_res_size: tuple[int, int] = _f((32, 32), doc="(H, W) of the student's input: the same "
                                                     "crop as the teacher's, warped to this size")
    projectors: int = _f(3, lo=1, hi=8, doc="number N of SAPE projectors (Table VI)")
    sau: bool = _f(True, doc="weight the projectors with the scale-adaptive unit; false = plain "
                             "mean 1/N (Table III 'projector ensemble')")
    sau_kernels: str = _f("1-1-2-0", doc="SAU branch counts of 3x3, 5x5, 7x7, 9x9 convolutions "
                                         "(Table VII), e.g. 1-1-2-0")
    feature_loss: bool = _f(True, doc="L_fea, CDKD Eq. (5): 1 - cosine(SAPE output, teacher "
                                      "feature)")
    logit_loss: bool = _f(True, doc="L_logit, CDKD Eqs. (6)-(7): CCA bin merging + tau^2 KL")
    alpha: float = _f(1.0, lo=0.0, doc="weight alpha of L_fea in CDKD Eq. (8); the initial "
                                       "value when 'alpha' is in etht")
    beta: float = _f(1.0, lo=0.0, doc="weight beta of L_logit in CDKD Eq. (8); the initial value "
                                      "when 'beta' is in etht")
    tau_init: float = _f(4.0, lo=0.01, doc="temperature tau: the fixed value (NECM) or the "
                                           "learnt one's start; must lie in tau_range")
    tau_range: tuple[float, float] = _f((1.0, 10.0), doc="(lo, hi) of the learnt tau = lo + "
                                                         "(hi - lo) sigmoid(theta); CTKD uses "
                                                         "(1, 21)")
    etht: tuple[str, ...] = _f(("tau",), doc="what ETHT learns by gradient reversal, a subset "
                                             "of [tau, alpha, beta] (Table VIII); [] = NECM "
                                             "(fixed tau)")
    # CDKD calls this strength xi; kdray keeps xi for TSD's Eq. (7) weight (tsd.stage2.xi).
    reversal_max: float = _f(1.0, lo=0.0, doc="final value of ETHT's gradient-reversal strength "
                                              "(CDKD's xi(t), Eq. 12)")
    reversal_schedule: str = _f("cosine", choices=("cosine", "ctkd"),
                                doc="the reversal strength over training: cosine = reversal_max "
                                    "(1 - cos(pi t/T)) / 2 over the run; ctkd = the same ramp "
                                    "over the first 10 epochs, then reversal_max")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking and registry (docs/operations.md, "MLflow 3.17")."""
    uri: str = _f("", doc="MLflow tracking URI (sqlite:///PATH.db or http://HOST:PORT); empty = "
                          "$MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db")
    experiment: str = _f("kdray", doc="MLflow experiment name")
    register: bool = _f(True, doc="register the pipeline's models (aliases candidate and "
                                  "champion)")


@dataclass(frozen=True)
class RayConfig:
    """Ray Train resources (docs/operations.md, "Ray Train")."""
    num_workers: int = _f(1, lo=0, hi=1024, doc="Ray Train workers per stage; 0 = run the stage "
                                                "in-process without Ray Train")
    use_gpu: str = _f("auto", choices=("auto", "yes", "no"),
                      doc="one GPU per worker; auto = yes when the Ray cluster has GPUs")
    cpus_per_worker: float = _f(1.0, lo=0.01, doc="CPUs Ray reserves per worker (also its "
                                                  "torch threads, rounded down)")
    max_failures: int = _f(2, lo=0, doc="worker-group restarts from the latest checkpoint "
                                        "before a stage fails")
    storage_path: str = _f("", doc="Ray Train run storage, a shared folder or URI (s3://...); "
                                   "empty = <stage cache>/ray (resumable across reruns)")


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole experiment: one YAML file (configs/*.yaml) fills it."""
    name: str = _f("kdray", doc="a label for the experiment; logged with the config, not part "
                                "of any stage key")
    data: DataConfig = _f(DataConfig(), doc="dataset, crops and augmentation (every stage)")
    teacher: TrainedModelConfig = _f(TrainedModelConfig(), doc="the teacher (plain SimCC training)")
    student: TrainedModelConfig = _f(TrainedModelConfig(model=ModelConfig(backbone="mobilenetv3_small_100")),
                              doc="the TSD student (stage 1) and the undistilled baseline")
    tsd: TSDConfig = _f(TSDConfig(), doc="TSD two-stage distillation")
    cdkd: CDKDConfig = _f(CDKDConfig(), doc="CDKD cross-resolution distillation")
    tracking: TrackingConfig = _f(TrackingConfig(), doc="MLflow tracking and model registry")
    ray: RayConfig = _f(RayConfig(), doc="Ray Train resources and fault tolerance")


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
        try:
            number = float(value)
        except OverflowError:   # an integer beyond float range
            number = math.inf
        if not math.isfinite(number):  # .inf would pass every lo= bound and train as nonsense
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


# Keys renamed since they first shipped: an old config gets the new name in its error.
RENAMED = {"cdkd.xi_max": "cdkd.reversal_max", "cdkd.xi_schedule": "cdkd.reversal_schedule"}


def _unknown(key: str, known) -> str:
    if key in RENAMED:
        return f"{key}: renamed to {RENAMED[key]}"
    return f"{key}: unknown key (known here: {', '.join(sorted(known))})"


def _build(cls, data: dict, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or '<top>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: {_unknown(prefix + unknown[0], fields)}")
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


def _check_models(cfg: ExperimentConfig, source: str) -> None:
    """Each network's backbone is known and takes its input size (HRNet's fusion upsamples the
    1/32 branch by exact factors: 64x48 would fail deep inside the first forward pass)."""
    from kdray.nn.backbones import BACKBONES  # a plain dict; timm loads only to build one

    for key, stage, size_key, size in (
            ("teacher", cfg.teacher, "data.input_size", cfg.data.input_size),
            ("student", cfg.student, "data.input_size", cfg.data.input_size),
            ("cdkd.student", cfg.cdkd.student, "cdkd.low_res_size", cfg.cdkd.low_res_size)):
        name = stage.model.backbone
        if name not in BACKBONES:
            raise ConfigError(f"{source}: {key}.model.backbone: unknown backbone {name!r}; "
                              f"known: {', '.join(sorted(BACKBONES))}")
        d = BACKBONES[name].size_divisor
        h, w = size
        if h <= 0 or w <= 0 or h % d or w % d:
            ok = (max(d, h // d * d), max(d, w // d * d))
            raise ConfigError(f"{source}: {size_key}: {(h, w)} does not fit {key}.model.backbone "
                              f"{name}, which needs H and W divisible by {d} (its coarsest "
                              f"feature is 1/{d} of the input); e.g. {ok}")


def _extra_checks(cfg: ExperimentConfig, source: str) -> None:
    """Cross-field rules that a single field's range cannot express."""
    for key in ("input_size",):
        h, w = getattr(cfg.data, key)
        if h <= 0 or w <= 0:
            raise ConfigError(f"{source}: data.{key}: expected positive (H, W), got {(h, w)}")
    _check_models(cfg, source)
    if cfg.tracking.uri and "://" not in cfg.tracking.uri:  # MLflow's bare-folder store: refused
        raise ConfigError(f"{source}: tracking.uri: expected sqlite:///PATH.db or "
                          f"http://HOST:PORT, got {cfg.tracking.uri!r}")
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
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else ""  # noqa: S506
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML "
                          f"({str(e).splitlines()[0]})") from None
    return key.strip(), value


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
        data = read_yaml(path)
        if data is None:
            data = {}
        if not isinstance(data, dict):  # before overrides try to set keys in a list
            raise ConfigError(f"{source}: expected a mapping of sections (data:, teacher:, ...) "
                              f"at the top level, got a {type(data).__name__}")
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    if overrides:
        source += " (with overrides " + " ".join(overrides) + ")"
    cfg = from_dict(data, source)
    _check_files(cfg, source)
    return cfg


def _check_files(cfg: ExperimentConfig, source: str) -> None:
    """Files the config names must exist before any compute (only at the entry points: a config
    rebuilt elsewhere, e.g. on a worker, fails where it reads the file)."""
    for key, stage in (("teacher", cfg.teacher), ("student", cfg.student),
                       ("cdkd.student", cfg.cdkd.student)):
        weights = stage.model.weights
        if weights and not Path(weights).is_file():
            what = "is a directory" if Path(weights).is_dir() else "no such file"
            raise ConfigError(f"{source}: {key}.model.weights: {what} {weights!r} (a local "
                              f".safetensors or torch.save state dict; empty = random init)")


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping gives the same key twice (PyYAML would silently keep the last one)."""

    def __init__(self, key: str, line: int, first: int):
        super().__init__(f"{key}: key given twice (lines {first} and {line}); YAML would keep "
                         f"only the last value")
        self.key, self.line, self.first = key, line, first


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate mapping keys, naming the dotted key and lines."""

    def compose_document(self):
        node = super().compose_document()
        _refuse_duplicates(node, "")
        return node


def _refuse_duplicates(node, prefix: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            ident = (key_node.tag, key_node.value)
            dotted = f"{prefix}{key_node.value}"
            if ident in seen:
                raise DuplicateKeyError(dotted, key_node.start_mark.line + 1, seen[ident])
            seen[ident] = key_node.start_mark.line + 1
            _refuse_duplicates(value_node, dotted + ".")
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(item, f"{prefix.rstrip('.')}[{i}].")


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file (configs, search spaces) with :class:`UniqueKeyLoader`; a missing file,
    a directory, binary bytes, bad YAML or a duplicate key is a ConfigError naming the file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, expected a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not a text (UTF-8) file: byte {e.start} cannot be "
                          f"decoded; expected YAML") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot be read ({e.strerror or e})") from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except DuplicateKeyError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None


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
            raise ConfigError(f"{key}: renamed to {RENAMED[key]}" if key in RENAMED
                              else f"{key}: unknown key")
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


def file_hash(path: str | Path) -> str:
    """Short sha256 of a file's bytes: names a checkpoint or an annotation file by content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
