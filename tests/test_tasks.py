"""Every distillation task (kdray/tasks.py) on tiny stand-in models (tests/task_standins.py),
against losses worked out by hand in float64: the named terms, the documented composition (TSD
Eqs. 5 and 7, CDKD Eq. 8), frozen members that stay frozen through an optimizer step (weights
and BatchNorm statistics), and the exact set of trainable parameters."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdray.config import CDKDConfig, TSDStage1Config, TSDStage2Config
from kdray.data.dataset import normalize
from kdray.nn.igp_gcn import IGPGCN
from kdray.nn.refined import gcn_feature_channels
from kdray.tasks import CDKDTask, SimCCTask, TSDStage1Task, TSDStage2Task

from .task_standins import (B, HI, K, LO, PROGRESS, SKELETON, WEIGHT, WEIGHT_LOW,
                            argmax_xy, close, kl_by_hand, l1_by_hand, log_softmax, make_batch,
                            nets, outputs, soft_xy, step_and_check)


# ---- SimCC (teacher) and TSD stage 1 ----------------------------------------------------------
def test_simcc_task_is_the_kl_loss_and_trains_the_whole_model():
    model, _ = nets()
    task, batch = SimCCTask(model).train(), make_batch()
    out = task(batch, PROGRESS)
    assert set(out) == {"loss", "loss_kl"}
    close(out["loss_kl"], kl_by_hand(outputs(model, batch["image"]), batch))
    assert out["loss"] is out["loss_kl"]
    assert step_and_check(task, batch, {"model": model}, []) == []


def test_tsd_stage1_terms_and_eq5():
    student, teacher = nets()
    cfg = TSDStage1Config(alpha=0.5, beta=0.25)
    task = TSDStage1Task(student, teacher, cfg, torch.tensor(SKELETON),
                         torch.tensor([0.5, 0.3, 0.2])).train()
    batch = make_batch()
    out = task(batch, PROGRESS)
    s, t = outputs(student, batch["image"]), outputs(teacher, batch["image"])
    w, bias = task.adapter.weight.detach().double()[:, :, 0, 0], task.adapter.bias.detach()
    adapted = torch.einsum("oc,bchw->bohw", w, s["feats"][-1]) + bias.double()[:, None, None]
    s_xy, t_xy = soft_xy(s), soft_xy(t)

    def lengths(xy):
        return torch.stack([(xy[:, i] - xy[:, j]).norm(dim=-1) for i, j in SKELETON], dim=1)
    valid = torch.stack([(WEIGHT[:, i] > 0) & (WEIGHT[:, j] > 0) for i, j in SKELETON], 1)
    cst = ((lengths(t_xy) - lengths(s_xy)).abs() * valid * torch.tensor([0.5, 0.3, 0.2])).sum() / B
    expected = {"loss_kl": kl_by_hand(s, batch),
                "loss_fea": ((adapted - t["feats"][-1]) ** 2).mean(),       # Eq. (1)
                "loss_pose": l1_by_hand(s_xy, t_xy, WEIGHT), "loss_cst": cst}
    assert set(out) == {"loss", "gamma", *expected}
    for key, value in expected.items():
        close(out[key], value)
    assert out["gamma"].item() == 0.75                        # Eq. (4): 1 - (2 - 1) / 4
    l_pos = out["loss_pose"].double() + out["loss_cst"].double()
    close(out["loss"], out["loss_kl"].double() + 0.75 * 0.5 * out["loss_fea"].double()
          + 0.75 * 0.25 * l_pos, rtol=1e-6)                   # Eq. (5), a few fp32 roundings
    unmoved = step_and_check(task, batch, {"model": student, "adapter": task.adapter}, [teacher])
    assert unmoved == []


def test_tsd_stage1_without_teacher_is_plain_simcc():
    student, _ = nets()
    cfg = TSDStage1Config(feature=False, pose=False, structure=False)
    task = TSDStage1Task(student, None, cfg, torch.tensor(SKELETON),
                         torch.full((3,), 1 / 3)).train()
    batch = make_batch()
    out = task(batch, PROGRESS)
    assert set(out) == {"loss", "loss_kl", "gamma"} and task.adapter is None
    close(out["loss_kl"], kl_by_hand(outputs(student, batch["image"]), batch))
    close(out["loss"], out["loss_kl"], rtol=0, atol=0)
    assert step_and_check(task, batch, {"model": student}, []) == []


# ---- TSD stage 2 ------------------------------------------------------------------------------
def stage2(mode: str, low: bool):
    student, teacher = nets(LO if low else HI)
    gcn = IGPGCN(K, SKELETON, gcn_feature_channels(student), hidden=8)
    for block in gcn.blocks:   # zero-initialised offsets make P1 = P2 = P3, hiding Eq. (7)'s
        nn.init.normal_(block.offset.weight, std=0.1)                     # weights
    cfg = TSDStage2Config(mode=mode, delta=0.2, lam=0.3, xi=0.7)
    task = TSDStage2Task(student, gcn, teacher if mode == "teacher" else None, cfg,
                         view="image_low" if low else "image", image_size=HI)
    return task.train(), student, teacher, gcn


@pytest.mark.parametrize("mode, low", [("teacher", True), ("gt", False)])
def test_tsd_stage2_eqs6_7_on_the_frozen_student(mode, low):
    task, student, teacher, gcn = stage2(mode, low)
    batch, size = make_batch(), (LO if low else HI)
    out = task(batch, PROGRESS)
    s = outputs(student, batch["image_low" if low else "image"])
    scores = torch.minimum(*(log_softmax(s[f"logits_{a}"]).exp().amax(-1) for a in "xy"))
    p_init = torch.cat([argmax_xy(s, size), scores[..., None]], dim=-1).float()
    feats = [f.float() for f in s["feats"]]       # strides 4, 2, 1: all three, coarse -> fine
    target = (argmax_xy(outputs(teacher, batch["image"]), HI) if mode == "teacher"
              else batch["keypoints"].double() / torch.tensor([HI[1], HI[0]]))
    with torch.no_grad():
        poses = gcn(p_init, feats)
    blocks = [l1_by_hand(p, target, WEIGHT) for p in poses]
    assert set(out) == {"loss", "loss_gcn1", "loss_gcn2", "loss_gcn3"}
    for i, b in enumerate(blocks):
        close(out[f"loss_gcn{i + 1}"], b)
    close(out["loss"], 0.2 * blocks[0] + 0.3 * blocks[1] + 0.7 * blocks[2])   # Eq. (7)
    # the frozen-output cache path (kdray/data/frozen_cache.py) gives the same loss
    cached = {**batch, "p_init": p_init, "teacher_xy": target.float(),
              **{f"feat{i}": f for i, f in enumerate(feats)}}
    close(task(cached, PROGRESS)["loss"], out["loss"], rtol=1e-6)
    assert len({round(b.item(), 6) for b in blocks}) == 3    # the three weights are told apart
    unmoved = step_and_check(task, batch, {"model.gcn": gcn},
                             [student] + ([teacher] if mode == "teacher" else []))
    assert unmoved == []


# ---- CDKD -------------------------------------------------------------------------------------
def cdkd(etht=(), teacher=True):
    student, t = nets(LO)
    cfg = CDKDConfig(projectors=2, sau_kernels="1-1-0-0", alpha=0.7, beta=0.3, tau_init=4.0,
                     etht=etht, reversal_max=2.0, feature_loss=teacher, logit_loss=teacher)
    task = CDKDTask(student, t if teacher else None, cfg, HI)
    return task.train(), student, t


def cca_by_hand(s, t, tau, weight=WEIGHT_LOW):
    """CDKD Eqs. (6)-(7) for the integer bin ratio 2: student bin j gets teacher bins 2j, 2j+1."""
    total = 0
    for a in "xy":
        pt = log_softmax(t[f"logits_{a}"], tau).exp()
        merged = pt.view(*pt.shape[:-1], -1, 2).sum(-1)
        kl = (merged * (merged.log() - log_softmax(s[f"logits_{a}"], tau))).sum(-1)
        total = total + tau ** 2 * (kl * weight).sum(1).mean()
    return total


@pytest.mark.parametrize("etht", [(), ("tau", "alpha", "beta")])
def test_cdkd_terms_and_eq8(etht):
    task, student, teacher = cdkd(etht)
    batch = make_batch()
    out = task(batch, PROGRESS)
    s, t = outputs(student, batch["image_low"]), outputs(teacher, batch["image"])
    with torch.no_grad():
        f_out = task.sape(s["feats"][-1].float())["out"].double()
    cos = (f_out * t["feats"][-1]).flatten(1).sum(1) / (f_out.flatten(1).norm(dim=1)
                                                        * t["feats"][-1].flatten(1).norm(dim=1))
    expected = {"loss_ori": kl_by_hand(s, batch, "_low"), "loss_fea": (1 - cos).mean(),
                "loss_logit": cca_by_hand(s, t, 4.0)}
    assert set(out) == {"loss", *expected}
    for key, value in expected.items():
        close(out[key], value)
    # Eq. (8) with the starting values: ETHT's learnt alpha, beta, tau start at the fixed ones
    close(out["loss"], expected["loss_ori"] + 0.7 * expected["loss_fea"]
          + 0.3 * expected["loss_logit"])
    assert task.epoch_metrics() == pytest.approx(
        {"tau": 4.0, **({"alpha": 0.7, "beta": 0.3} if etht else {})}, rel=1e-6)
    learnt = {f"{n}": getattr(task, n) for n in ("tau", "alpha", "beta") if n in etht}
    unmoved = step_and_check(task, batch, {"model": student, "sape": task.sape, **learnt},
                             [teacher])
    assert unmoved == []


def test_etht_gradients_are_reversed_and_scaled_by_xi():
    """Eq. (11): d theta = -xi dL/d theta, xi(0.25) = 2 (1 - cos(pi/4)) / 2 (Eq. 12, cosine).
    alpha = 2 a0 sigmoid(theta) starts at sigmoid = 1/2, so d alpha/d theta = a0 / 2; tau = 1 +
    9 sigmoid(theta) starts at 4, sigmoid = 1/3, so d tau/d theta = 9 (1/3)(2/3) = 2."""
    task, student, teacher = cdkd(("tau", "alpha", "beta"))
    batch = make_batch()
    out = task(batch, PROGRESS)
    out["loss"].backward()
    xi = 1 - math.cos(math.pi / 4)
    s, t = outputs(student, batch["image_low"]), outputs(teacher, batch["image"])
    tau = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    cca_by_hand(s, t, tau).backward()
    close(task.alpha.theta.grad, -xi * out["loss_fea"].item() * 0.7 / 2)
    close(task.beta.theta.grad, -xi * out["loss_logit"].item() * 0.3 / 2)
    close(task.tau.theta.grad, -xi * 0.3 * tau.grad * 2)


def test_cdkd_baseline_without_teacher_trains_the_student_alone():
    task, student, _ = cdkd(teacher=False)
    batch = make_batch()
    out = task(batch, PROGRESS)
    assert set(out) == {"loss", "loss_ori"} and task.sape is None and task.teacher is None
    close(out["loss_ori"], kl_by_hand(outputs(student, batch["image_low"]), batch, "_low"))
    close(out["loss"], out["loss_ori"], rtol=0, atol=0)
    assert step_and_check(task, batch, {"model": student}, []) == []


# ---- a transfer set (TrainConfig.labelled) ------------------------------------------------------
def test_a_transfer_person_has_no_task_loss_and_is_distilled_on_every_joint():
    """Sample 1 is a transfer-set person: its target weights are 0 (PoseDataset hides them), so
    the task losses see sample 0 alone, while every distillation term compares all of sample
    1's joints (``distillation_mask``) and sample 0's labelled ones, as in the papers."""
    batch = make_batch()
    batch["transfer"] = torch.tensor([0.0, 1.0])
    for key in ("target_weight", "target_weight_low"):
        batch[key][1] = 0.0
    kd_mask, kd_mask_low = WEIGHT.clone(), WEIGHT_LOW.clone()
    kd_mask[1], kd_mask_low[1] = 1.0, 1.0

    student, teacher = nets()
    task = TSDStage1Task(student, teacher, TSDStage1Config(), torch.tensor(SKELETON),
                         torch.full((3,), 1 / 3)).train()
    out = task(batch, PROGRESS)
    s, t = outputs(student, batch["image"]), outputs(teacher, batch["image"])
    close(out["loss_kl"], kl_by_hand(s, batch))
    close(out["loss_pose"], l1_by_hand(soft_xy(s), soft_xy(t), kd_mask))
    assert kl_by_hand(s, batch) != kl_by_hand(s, make_batch())       # sample 1 left the KL
    lengths = {}
    for name, out_ in (("s", s), ("t", t)):
        xy = soft_xy(out_)
        lengths[name] = torch.stack([(xy[:, i] - xy[:, j]).norm(dim=-1) for i, j in SKELETON], 1)
    valid = torch.stack([(kd_mask[:, i] > 0) & (kd_mask[:, j] > 0) for i, j in SKELETON], 1)
    close(out["loss_cst"], ((lengths["t"] - lengths["s"]).abs() * valid).sum() / 3 / B)

    task, student, teacher = cdkd()
    out = task(batch, PROGRESS)
    s, t = outputs(student, batch["image_low"]), outputs(teacher, batch["image"])
    close(out["loss_ori"], kl_by_hand(s, batch, "_low"))
    close(out["loss_logit"], cca_by_hand(s, t, 4.0, kd_mask_low))

    task, student, teacher, _ = stage2("teacher", low=False)
    out = task(batch, PROGRESS)
    target = argmax_xy(outputs(teacher, batch["image"]), HI)
    poses = task.model.refine(images=normalize(batch["image"]), flip_test=False)["poses"]
    close(out["loss_gcn3"], l1_by_hand(poses[2], target, kd_mask))

    task, *_ = stage2("gt", low=False)       # on GT (Table IV row s1): the labelled joints only
    out = task(batch, PROGRESS)
    poses = task.model.refine(images=normalize(batch["image"]), flip_test=False)["poses"]
    gt = batch["keypoints"].double() / torch.tensor([HI[1], HI[0]])
    close(out["loss_gcn3"], l1_by_hand(poses[2], gt, batch["target_weight"]))
