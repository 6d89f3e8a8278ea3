"""Data parallelism changes nothing but speed: 2 Ray Train workers on halves of the global batch
train and log as 1 worker on all of it (docs/operations.md, "Several workers")."""
from __future__ import annotations

from pathlib import Path

import pytest

from kdray.config import load_config, with_overrides
from kdray.orchestration import ray_train
from kdray.stages import CDKD_STUDENT, TEACHER, TSD_REFINED, TSD_STUDENT

from .conftest import FAST, SMOKE

def _cfg(smoke_data, *extra):
    return load_config(SMOKE, [*FAST, f"data.root={smoke_data}",
                               "teacher.model.backbone=mobilenetv3_small_100",
                               "teacher.train.epochs=2", "teacher.train.eval_every=2", *extra])


def test_two_workers_with_frozen_bn_train_as_one(ray_local, smoke_data, tmp_path):
    """Same global batch (16 = 2 x 8), frozen BatchNorm statistics: per-epoch losses agree to
    fp32 reduction order (the two runs sum gradients in different orders and thread counts)."""
    runs = {}
    for workers, cpus in ((1, 2), (2, 1)):
        cfg = _cfg(smoke_data, "teacher.model.freeze_bn=true", f"ray.num_workers={workers}",
                   f"ray.cpus_per_worker={cpus}")
        runs[workers] = ray_train.train_stage(TEACHER, cfg, tmp_path / f"w{workers}", {},
                                              f"dp-w{workers}", tmp_path / "ray").history
    one, two = runs[1], runs[2]
    assert [h["epoch"] for h in two] == [1, 2]
    for a, b in zip(one, two):
        for key in [k for k in a if k.startswith("loss")]:
            assert b[key] == pytest.approx(a[key], rel=1e-3), (a["epoch"], key, a[key], b[key])
    assert two[-1]["val_AP"] == pytest.approx(one[-1]["val_AP"], abs=0.5)


FROZEN_BN = ["teacher.model.freeze_bn=true", "student.model.freeze_bn=true",
             "cdkd.student.model.freeze_bn=true", "teacher.model.backbone=mobilenetv3_small_100",
             "student.train.precision=fp32", "cdkd.student.train.precision=fp32",
             "tsd.stage2.train.precision=fp32"]


@pytest.fixture(scope="module")
def upstream(smoke_data, tmp_path_factory):
    """Untrained teacher and TSD student checkpoints (what stage 1, stage 2 and CDKD load):
    the step's arithmetic does not depend on the weights being trained."""
    from kdray.stage_run import build_stage
    from kdray.train import save_checkpoint
    cfg = load_config(SMOKE, [*FAST, f"data.root={smoke_data}", *FROZEN_BN])
    out = tmp_path_factory.mktemp("upstream")
    paths = {}
    for name, stage in (("teacher", TEACHER), ("student", TSD_STUDENT)):
        built = build_stage(stage, cfg, {"teacher": paths.get("teacher", "")}
                            if stage.inputs(cfg) else {})
        paths[name] = str(out / name / "last.pt")
        save_checkpoint(Path(paths[name]), {"model": built.task.checkpoint_state(),
                                            "meta": built.task.meta})
    return paths


@pytest.mark.parametrize("stage", [TEACHER, TSD_STUDENT, TSD_REFINED, CDKD_STUDENT],
                         ids=lambda s: s.name)
def test_every_task_trains_on_two_workers_as_in_one_process(stage, ray_local, smoke_data,
                                                            upstream, tmp_path):
    """Each task's DDP step on 2 workers x 8 samples = the plain loop on 16 (frozen BN): the
    KD terms, the IGP-GCN on its frozen student and CDKD's SAPE and learnt temperature tau."""
    cfg = load_config(SMOKE, [*FAST, f"data.root={smoke_data}", *FROZEN_BN,
                              "ray.num_workers=2", "ray.cpus_per_worker=1"])
    inputs = {k: upstream[k] for k in stage.inputs(cfg)}
    plain = ray_train.train_stage(stage, with_overrides(cfg, {"ray.num_workers": 0}),
                                  tmp_path / "plain", inputs, "plain", tmp_path / "ray").history
    two = ray_train.train_stage(stage, cfg, tmp_path / "two", inputs, f"dp-{stage.name}",
                                tmp_path / "ray").history
    assert len(two) == len(plain) == 1
    terms = [k for k in plain[0] if k.startswith("loss") or k == "tau"]
    assert "loss" in terms and (stage is not CDKD_STUDENT or "tau" in terms)
    for key in terms:
        assert two[0][key] == pytest.approx(plain[0][key], rel=1e-3), key
