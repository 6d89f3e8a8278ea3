"""TSD, two-stage distillation (the paper's Fig. 1), top to bottom.

    teacher -> stage 1: student distilled from the teacher (features, pose, structure)
            -> stage 2: IGP-GCN refines the frozen student's pose
            -> evaluation against the undistilled baseline student -> registration

    python pipelines/two_stage.py [--config configs/demo.yaml] [dotted.key=value ...]
    ray job submit --working-dir . -- python pipelines/two_stage.py --storage $PWD ...

Each stage is cached by the hash of its config and inputs (kdray/orchestration/pipeline.py): a
finished teacher is reused by every later run with the same teacher config, an interrupted
stage resumes from its last checkpoint. Ends with one JSON line (and summary.json).
"""
from __future__ import annotations

import sys

from kdray.orchestration.args import parse_args


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args("two_stage", argv, __doc__)
    # torch, Ray and MLflow load after the arguments parsed: --help answers at once.
    from kdray.orchestration.pipeline import Pipeline, baseline_config
    from kdray.stages import TEACHER, TSD_REFINED, TSD_STUDENT
    with Pipeline("two_stage", cfg, args, stages=4) as p:
        plan = [(TSD_STUDENT, None), (TSD_REFINED, None), (TSD_STUDENT, baseline_config(p.cfg))]
        p.expect(plan if args.teacher else [(TEACHER, None), *plan])   # how long, said first
        teacher = p.teacher(args.teacher)                          # trained once, or given
        stage1 = p.stage(TSD_STUDENT, label="stage1", teacher=teacher)        # S4: TSD stage 1
        stage2 = p.stage(TSD_REFINED, label="stage2", teacher=teacher, student=stage1)  # S6
        baseline = p.stage(TSD_STUDENT, baseline_config(p.cfg), label="baseline")  # no KD

        # Evaluation: every stage was scored on the same val set at its last epoch.
        metrics = p.stage_metrics({"teacher": teacher, "baseline": baseline, "stage1": stage1,
                                   "stage2": stage2})
        metrics.update({f"err_occluded_{k}": r.metrics.get("val_err_occluded")
                        for k, r in (("baseline", baseline), ("stage1", stage1),
                                     ("stage2", stage2))})

        for result in (teacher, stage1, stage2):                  # registration
            p.register(result)
        return p.finish(metrics)


if __name__ == "__main__":
    from kdray.errors import run_main  # a user's mistake: one line on stderr, exit code 2
    sys.exit(run_main(main, sys.argv[1:], "pipelines/two_stage.py"))
