"""The kinds of stage, one object each (docs/architecture.md, "Stages").

A stage kind knows everything about itself that the rest of kdray asks: the upstream networks it
needs, the config sections its cache key hashes, its train config, input size and seed, the
model it registers, and how to build its task. Pipelines pass the objects
(``p.stage(TSD_STUDENT, teacher=t)``); where a name is needed (``kdray train --stage``, a
search space's ``stage:``, an ablation row's ``stages:``, a stage marker on disk) the one dict
:data:`STAGES` maps it. Adding a method is one class here, a pipeline and a config.

    TEACHER         plain SimCC on ground truth
    TSD_STUDENT     TSD stage 1 (with every KD term off: the undistilled baseline)
    TSD_REFINED     TSD stage 2: IGP-GCN on the frozen stage-1 student
    CDKD_STUDENT    CDKD: a low-resolution student distilled from the high-resolution teacher
    CDKD_REFINED    IGP-GCN on the frozen CDKD student, supervised by the high-res teacher
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdray.codecs.simcc import SimCCCodec, sigma_for_size
from kdray.config import ConfigError, ExperimentConfig, ModelConfig, TrainConfig, get_dotted
from kdray.data.keypoints import KeypointSpec
from kdray.losses import tsd
from kdray.nn.igp_gcn import IGPGCN
from kdray.nn.pose_model import build_pose_model
from kdray.nn.refined import gcn_feature_channels
from kdray.tasks import CDKDTask, SimCCTask, TSDStage1Task, TSDStage2Task


def codec_for(cfg: ExperimentConfig, size) -> SimCCCodec:
    """The codec of a view; the same sigma scaling as the dataset's targets. Built once per
    network, by :meth:`Stage.pose_model`: the model decodes its own predictions with it."""
    sigma = sigma_for_size(cfg.data.sigma, tuple(size), tuple(cfg.data.input_size))
    return SimCCCodec(tuple(size), cfg.data.split_ratio, sigma)


@dataclass(frozen=True)
class Stage:
    """What every kind answers; subclasses override what differs."""
    name: str            # cache-dir prefix and the name in the CLI, search spaces, ablations
    model_name: str      # the registered model (MLflow)
    description: str     # of the registered model
    train_key: str       # dotted key of its TrainConfig
    model_key: str       # dotted key of the ModelConfig of the network it trains or refines
    refined: bool = False            # student + IGP-GCN (checkpoint meta kind "refined")
    size_key: str = "data.input_size"  # dotted key of the input size its network sees

    def inputs(self, cfg: ExperimentConfig) -> tuple[str, ...]:
        """The upstream checkpoints it needs (the DAG's edges)."""
        return ()

    def sections(self, cfg: ExperimentConfig) -> dict[str, object]:
        """Config sections its output depends on, besides data and its inputs (dotted prefix
        -> value): the cache key hashes them, ``kdray train`` compares them to resume."""
        raise NotImplementedError

    def train(self, cfg: ExperimentConfig) -> TrainConfig:
        return get_dotted(cfg, self.train_key)

    def model(self, cfg: ExperimentConfig) -> ModelConfig:
        return get_dotted(cfg, self.model_key)

    def input_size(self, cfg: ExperimentConfig) -> tuple[int, int]:
        return tuple(get_dotted(cfg, self.size_key))

    def low_res(self, cfg: ExperimentConfig):
        """The size of the dataset's low-resolution view, or None when it needs none."""
        return None if self.size_key == "data.input_size" else self.input_size(cfg)

    def pose_model(self, cfg: ExperimentConfig, spec: KeypointSpec) -> nn.Module:
        """A fresh pose network of ``model(cfg)`` for ``input_size(cfg)``, holding its codec."""
        size = self.input_size(cfg)
        return build_pose_model(self.model(cfg), codec_for(cfg, size), spec.flip_index(),
                                size_field=self.size_key)

    def seed(self, cfg: ExperimentConfig) -> int:
        """The networks are seeded with it before they are built: the initial weights do not
        depend on what ran earlier in the process (a Ray worker vs the plain loop)."""
        return self.train(cfg).seed

    def check(self, cfg: ExperimentConfig) -> None:
        """Raise ConfigError for a config this kind cannot run (checked before any stage)."""

    def build_task(self, cfg: ExperimentConfig, spec: KeypointSpec, train_records,
                   nets: dict[str, nn.Module]) -> nn.Module:
        raise NotImplementedError


class Teacher(Stage):
    def sections(self, cfg):
        return {"teacher": cfg.teacher}

    def build_task(self, cfg, spec, train_records, nets):
        return SimCCTask(self.pose_model(cfg, spec))


class TSDStudent(Stage):
    def inputs(self, cfg):
        s1 = cfg.tsd.stage1
        return ("teacher",) if (s1.feature or s1.pose or s1.structure) else ()

    def sections(self, cfg):
        kd = {"tsd.stage1": cfg.tsd.stage1} if self.inputs(cfg) else {}
        return {"student": cfg.student, **kd}

    def build_task(self, cfg, spec, train_records, nets):
        model, s1 = self.pose_model(cfg, spec), cfg.tsd.stage1
        lengths = None
        if s1.edge_weights == "inverse_length":
            labelled = self.train(cfg).labelled or len(train_records)  # not the hidden ones
            lengths = tsd.mean_edge_lengths(_normalised_keypoints(train_records[:labelled]),
                                            spec.skeleton)
        return TSDStage1Task(model, nets.get("teacher"), s1,
                             torch.tensor(spec.skeleton, dtype=torch.long),
                             tsd.edge_weights(spec.skeleton, s1.edge_weights, lengths))


class Refinement(Stage):
    """IGP-GCN on a frozen student (TSD Sec. III-B), supervised by the teacher's pose or the
    ground truth (``tsd.stage2.mode``); the student sees the view of its own resolution."""

    def inputs(self, cfg):
        return ("student", "teacher") if cfg.tsd.stage2.mode == "teacher" else ("student",)

    def sections(self, cfg):
        return {"tsd.stage2": cfg.tsd.stage2, self.model_key: self.model(cfg),
                **({self.size_key: self.input_size(cfg)} if self.low_res(cfg) else {})}

    def check(self, cfg):
        """The GCN learns on the persons its student learnt on: with another transfer set it
        would be taught the labels its student never saw (or miss ones it did)."""
        mine = self.train_key + ".labelled"
        theirs = self.model_key.removesuffix(".model") + ".train.labelled"
        if get_dotted(cfg, mine) != get_dotted(cfg, theirs):
            raise ConfigError(f"{mine} = {get_dotted(cfg, mine)} differs from {theirs} = "
                              f"{get_dotted(cfg, theirs)}: the {self.name} stage refines that "
                              f"student and needs the same labelled persons; set both")

    def build_task(self, cfg, spec, train_records, nets):
        s2, student = cfg.tsd.stage2, nets["student"]
        gcn = IGPGCN(spec.num_joints, spec.skeleton, gcn_feature_channels(student),
                     hidden=s2.hidden)
        low = self.low_res(cfg) is not None
        return TSDStage2Task(student, gcn, nets.get("teacher"), s2,
                             view="image_low" if low else "image",
                             image_size=tuple(cfg.data.input_size))


class CDKDStudent(Stage):
    def inputs(self, cfg):
        """With both KD terms off it is the low-resolution student trained alone."""
        return ("teacher",) if (cfg.cdkd.feature_loss or cfg.cdkd.logit_loss) else ()

    def sections(self, cfg):
        if not self.inputs(cfg):   # trained alone: the KD settings change nothing, so the
            # baseline of pipelines/cdkd.py and of every CDKD table is one cached stage
            return {"cdkd.student": cfg.cdkd.student, "cdkd.low_res_size": cfg.cdkd.low_res_size}
        return {"cdkd": cfg.cdkd}

    def build_task(self, cfg, spec, train_records, nets):
        model, teacher = self.pose_model(cfg, spec), nets.get("teacher")
        feat_hw = None
        if teacher is not None:
            with torch.no_grad():
                feat_hw = tuple(teacher(torch.zeros(1, 3, *cfg.data.input_size))
                                ["feats"][-1].shape[-2:])
        return CDKDTask(model, teacher, cfg.cdkd, feat_hw)


def _normalised_keypoints(records):
    """(N, K, 3) keypoints in box-normalised units, for inverse-length edge weights."""
    import numpy as np
    kp = np.stack([r.keypoints for r in records]).copy()
    wh = np.stack([r.bbox[2:] for r in records])[:, None, :]
    kp[..., :2] = (kp[..., :2] - np.stack([r.bbox[:2] for r in records])[:, None]) / wh
    return torch.from_numpy(kp)


TEACHER = Teacher("teacher", "kdray-teacher",
                  "kdray teacher: a SimCC pose model trained on ground truth.",
                  "teacher.train", "teacher.model")
TSD_STUDENT = TSDStudent("student", "kdray-tsd-student",
                         "kdray TSD stage-1 student: distilled from the teacher (features, pose, "
                         "structure).", "student.train", "student.model")
TSD_REFINED = Refinement("gcn", "kdray-tsd-refined",
                         "kdray TSD stage-2 model: the frozen stage-1 student refined by IGP-GCN.",
                         "tsd.stage2.train", "student.model", refined=True)
CDKD_STUDENT = CDKDStudent("cdkd", "kdray-cdkd-student",
                           "kdray CDKD student: a low-resolution model distilled from a "
                           "high-resolution teacher.", "cdkd.student.train",
                           "cdkd.student.model", size_key="cdkd.low_res_size")
CDKD_REFINED = Refinement("cdkd_gcn", "kdray-cdkd-refined",
                          "kdray cross-resolution refinement: the frozen CDKD student refined "
                          "by IGP-GCN, supervised by the high-resolution teacher.",
                          "tsd.stage2.train", "cdkd.student.model", refined=True,
                          size_key="cdkd.low_res_size")

def low_res_baseline(cfg: ExperimentConfig) -> ExperimentConfig:
    """The CDKD student's baseline: same backbone and low-res input, trained alone."""
    from kdray.config import with_overrides
    return with_overrides(cfg, {"cdkd.feature_loss": False, "cdkd.logit_loss": False,
                                "cdkd.etht": []})


STAGES: dict[str, Stage] = {s.name: s for s in (TEACHER, TSD_STUDENT, TSD_REFINED,
                                                CDKD_STUDENT, CDKD_REFINED)}
