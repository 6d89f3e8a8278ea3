"""The distillation contract (docs/architecture.md, "Contracts"): one ``nn.Module`` per method.

A task owns the student, the frozen teacher (eval mode, ``requires_grad=False``, never in the
optimizer) and the adapters. ``forward(batch, progress)`` returns ``loss``, every named loss term
(``loss_*``) and predictions; ``trainable_parameters()`` feeds the optimizer;
``predict(batch)`` gives crop-pixel coordinates for evaluation: the deployable model's own
``predict`` (its codec decodes) on the view it sees. The fit loop (kdray.train) runs
every task unchanged: a method is a small composition of losses, not a branch in the loop.
"""
from __future__ import annotations

import torch
from torch import nn

from kdray.codecs.simcc import SOFTMAX_SCALE, soft_argmax
from kdray.config import CDKDConfig, TSDStage1Config, TSDStage2Config
from kdray.data.dataset import distillation_mask, normalize
from kdray.losses import cdkd as cdkd_losses
from kdray.losses import etht
from kdray.losses import tsd
from kdray.losses.simcc import simcc_kl_loss
from kdray.nn.igp_gcn import IGPGCN
from kdray.nn.refined import RefinedPoseModel
from kdray.nn.sape import SAPE, parse_kernel_mix



def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a frozen network never reaches the optimizer."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def student_task_loss(model: nn.Module, images: torch.Tensor, batch: dict, suffix: str = ""):
    """The student's forward on one view and its SimCC task loss L_KL (targets ``*{suffix}``).

    Returns (model outputs, logits_x (B, K, Wx) fp32, logits_y (B, K, Hy) fp32, loss).
    """
    out = model(images)
    lx, ly = out["logits_x"].float(), out["logits_y"].float()
    loss = simcc_kl_loss(lx, ly, batch["target_x" + suffix], batch["target_y" + suffix],
                         batch["target_weight" + suffix], scale=SOFTMAX_SCALE)
    return out, lx, ly, loss


class _Task(nn.Module):
    """Shared plumbing: frozen members stay in eval mode whatever ``train()`` is called with;
    evaluation runs ``self.model.predict`` on the batch's ``view``."""
    frozen: tuple[str, ...] = ()
    meta: dict = {}
    view = "image"      # the batch key of the images the deployable model sees
    freeze_bn: bool = False   # model.freeze_bn: BatchNorm keeps its running statistics

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen:
            member = getattr(self, name, None)
            if member is not None:
                member.eval()
        if mode and self.freeze_bn:  # normalise by the running statistics; gamma/beta train
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def checkpoint_state(self) -> dict:
        """Everything but the teacher; the deployable network sits under ``model.``."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_checkpoint_state(self, state: dict) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith("teacher.")] + list(unexpected)
        if bad:
            raise KeyError(f"checkpoint does not match {type(self).__name__}: {bad[:5]}")

    @torch.no_grad()
    def predict(self, batch: dict, flip_test: bool = True) -> dict:
        coords, scores = self.model.predict(normalize(batch[self.view]), flip_test)
        return {"coords": coords, "scores": scores}


class SimCCTask(_Task):
    """Plain SimCC training (the teacher, the undistilled student): L_KL only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, progress) -> dict:
        *_, l_kl = student_task_loss(self.model, normalize(batch["image"]), batch)
        return {"loss": l_kl, "loss_kl": l_kl}



class TSDStage1Task(SimCCTask):
    """TSD stage 1, Eq. (5): L_KL + gamma(t) alpha L_fea + gamma(t) beta L_pos."""
    frozen = ("teacher",)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: TSDStage1Config,
                 edges: torch.Tensor, edge_weights: torch.Tensor):
        super().__init__(student)
        self.cfg = cfg
        self.teacher = freeze(teacher) if teacher is not None else None
        needs_teacher = cfg.feature or cfg.pose or cfg.structure
        if needs_teacher and teacher is None:
            raise ValueError("TSD stage 1 with distillation terms needs a teacher")
        self.adapter = (tsd.make_feature_adapter(student.feat_channels[-1],
                                                 teacher.feat_channels[-1])
                        if cfg.feature else None)
        self.register_buffer("edges", edges.long(), persistent=False)
        self.register_buffer("edge_weights", edge_weights.float(), persistent=False)

    def forward(self, batch: dict, progress) -> dict:
        images = normalize(batch["image"])
        s, s_lx, s_ly, l_kl = student_task_loss(self.model, images, batch)
        terms = {"loss_kl": l_kl}
        zero = l_kl.new_zeros(())
        l_fea = l_pos = zero
        if self.teacher is not None:
            with torch.no_grad():
                t = self.teacher(images)
            mask = distillation_mask(batch)
            if self.cfg.feature:
                l_fea = tsd.feature_mse(s["feats"][-1].float(), t["feats"][-1].float(),
                                        self.adapter)
                terms["loss_fea"] = l_fea
            s_xy = soft_argmax(s_lx, s_ly, SOFTMAX_SCALE)
            t_xy = soft_argmax(t["logits_x"].float(), t["logits_y"].float(), SOFTMAX_SCALE)
            if self.cfg.pose:
                terms["loss_pose"] = tsd.pose_l1(s_xy, t_xy, mask)
                l_pos = l_pos + terms["loss_pose"]
            if self.cfg.structure:
                terms["loss_cst"] = tsd.structure_loss(s_xy, t_xy, self.edges,
                                                       self.edge_weights, mask)
                l_pos = l_pos + terms["loss_cst"]
        g = tsd.gamma(progress.epoch, progress.epochs) if self.cfg.gamma_decay else 1.0
        loss = tsd.stage1_loss(l_kl, l_fea, l_pos, g, self.cfg.alpha, self.cfg.beta)
        return {"loss": loss, **terms, "gamma": torch.tensor(g)}



class TSDStage2Task(_Task):
    """TSD stage 2, Eqs. (6)-(7): the IGP-GCN learns on the frozen student.

    Supervision: the teacher's pose (``mode='teacher'``) or the ground truth (``'gt'``, Table IV
    row s1). Only GT-labelled joints count (the mask M of Eq. (6); with the teacher, every
    joint of a transfer-set person: ``kdray.data.dataset.distillation_mask``). The student sees
    ``view`` (``image``, or ``image_low`` for a low-resolution CDKD student); the teacher always
    sees ``image`` (of ``image_size`` (H, W)) and decodes with its own codec. Both poses are
    compared in crop-normalised [0, 1] units, which the two views share (the same warp).

    A batch from the frozen-output cache (kdray.data.frozen_cache) carries the student's
    outputs under ``RefinedPoseModel.frozen_keys`` (the model accepts them instead of images)
    and ``teacher_xy`` (:meth:`teacher_pose` precomputed).
    """
    frozen = ("teacher",)

    def __init__(self, student: nn.Module, gcn: IGPGCN, teacher: nn.Module | None,
                 cfg: TSDStage2Config, view: str = "image",
                 image_size: tuple[int, int] | None = None):
        super().__init__()
        self.model = RefinedPoseModel(freeze(student), gcn)
        self.cfg, self.view = cfg, view
        self.teacher = freeze(teacher) if teacher is not None else None
        if cfg.mode == "teacher" and teacher is None:
            raise ValueError("stage 2 in mode 'teacher' needs a teacher")
        h, w = image_size or student.input_size
        self.register_buffer("image_wh", torch.tensor([float(w), float(h)]), persistent=False)

    @torch.no_grad()
    def teacher_pose(self, images: torch.Tensor) -> torch.Tensor:
        """The target of Eq. (6) in mode 'teacher': the teacher's decoded pose (B, K, 2) in
        [0, 1] (``images``: the normalised high-resolution view, no flip test). The
        frozen-output cache stores exactly this."""
        coords, _ = self.teacher.predict(images, flip_test=False)
        return coords / self.image_wh

    def _target(self, batch: dict) -> torch.Tensor:
        if self.cfg.mode == "gt":
            return batch["keypoints"] / self.image_wh
        if "teacher_xy" in batch:
            return batch["teacher_xy"]
        return self.teacher_pose(normalize(batch["image"]))

    def _inputs(self, batch: dict) -> dict:
        """The model's inputs: the cached frozen-student outputs, else the student's view."""
        keys = self.model.frozen_keys
        if keys[0] in batch:
            return {"frozen": {k: batch[k] for k in keys}}
        return {"images": normalize(batch[self.view])}

    def forward(self, batch: dict, progress) -> dict:
        poses = self.model.refine(**self._inputs(batch), flip_test=False)["poses"]
        target = self._target(batch)
        mask = (batch["target_weight"] > 0 if self.cfg.mode == "gt"
                else distillation_mask(batch))
        blocks = [tsd.gcn_block_loss(p, target, mask) for p in poses]
        loss = tsd.stage2_loss(blocks, (self.cfg.delta, self.cfg.lam, self.cfg.xi))
        return {"loss": loss, **{f"loss_gcn{i + 1}": b for i, b in enumerate(blocks)}}

    @torch.no_grad()
    def predict(self, batch: dict, flip_test: bool = True) -> dict:
        coords, scores = self.model.predict(**self._inputs(batch), flip_test=flip_test)
        return {"coords": coords, "scores": scores}



class CDKDTask(_Task):
    """CDKD, Eq. (8): L_ori + alpha L_fea (SAPE, Eq. 5) + beta L_logit (CCA, Eqs. 6-7).

    The student sees ``image_low``; the frozen teacher sees ``image`` (same warp,
    docs/methods.md section 3.1). ETHT makes tau (and optionally alpha, beta) learnable
    through gradient reversal.
    """
    frozen = ("teacher",)
    view = "image_low"

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: CDKDConfig,
                 teacher_feat_hw: tuple[int, int] | None):
        super().__init__()
        if teacher is None and (cfg.feature_loss or cfg.logit_loss):
            raise ValueError("CDKD with distillation terms needs a teacher")
        # No teacher: the low-resolution student trained alone (the CDKD tables' baseline).
        self.teacher = freeze(teacher) if teacher is not None else None
        self.model, self.cfg = student, cfg
        self.sape = (SAPE(student.feat_channels[-1], teacher.feat_channels[-1], teacher_feat_hw,
                          num_projectors=cfg.projectors,
                          kernel_mix=parse_kernel_mix(cfg.sau_kernels), use_sau=cfg.sau)
                     if cfg.feature_loss else None)
        lo, hi = cfg.tau_range
        learnt = cfg.etht if teacher is not None else ()   # alone: nothing to learn by ETHT
        self.tau = etht.LearnableTemperature(cfg.tau_init, lo, hi) if "tau" in learnt else None
        self.alpha = etht.learnable_loss_weight(cfg.alpha) if "alpha" in learnt else None
        self.beta = etht.learnable_loss_weight(cfg.beta) if "beta" in learnt else None

    def _value(self, learnable, fixed: float, strength: float):
        return learnable(strength) if learnable is not None else fixed

    def forward(self, batch: dict, progress) -> dict:
        s, s_lx, s_ly, l_ori = student_task_loss(self.model, normalize(batch["image_low"]),
                                                 batch, "_low")
        terms = {"loss_ori": l_ori}
        zero = l_ori.new_zeros(())
        l_fea = l_logit = zero
        strength = etht.reversal_schedule(progress.fraction, self.cfg.reversal_max,
                                            self.cfg.reversal_schedule,
                                     total_epochs=progress.epochs)
        if self.cfg.feature_loss or self.cfg.logit_loss:
            with torch.no_grad():
                t = self.teacher(normalize(batch["image"]))
        if self.cfg.feature_loss:
            f_out = self.sape(s["feats"][-1].float())["out"]
            l_fea = terms["loss_fea"] = cdkd_losses.cosine_feature_loss(f_out,
                                                                        t["feats"][-1].float())
        if self.cfg.logit_loss:
            tau = self._value(self.tau, self.cfg.tau_init, strength)
            l_logit = terms["loss_logit"] = cdkd_losses.cca_logit_loss(
                s_lx, s_ly, t["logits_x"].float(), t["logits_y"].float(), tau,
                distillation_mask(batch, "_low").float(), scale=SOFTMAX_SCALE)
        alpha = self._value(self.alpha, self.cfg.alpha, strength)
        beta = self._value(self.beta, self.cfg.beta, strength)
        loss = cdkd_losses.cdkd_total_loss(l_ori, l_fea, l_logit, alpha, beta)
        return {"loss": loss, **terms}

    def epoch_metrics(self) -> dict:
        """tau (and alpha, beta when learnt) once per epoch; none for the student alone."""
        if self.teacher is None:
            return {}
        tau = self.tau.value.detach() if self.tau is not None else self.cfg.tau_init
        out = {"tau": float(tau)}
        if self.alpha is not None:
            out["alpha"] = float(self.alpha.value.detach())
        if self.beta is not None:
            out["beta"] = float(self.beta.value.detach())
        return out

