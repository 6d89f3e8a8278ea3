"""CDKD, cross-resolution distillation, top to bottom.

    teacher (high resolution) -> CDKD student (low resolution: SAPE + CCA + ETHT)
            -> the same low-res student trained alone (the baseline) -> registration

    python pipelines/cdkd.py [--config configs/cdkd_demo.yaml] [dotted.key=value ...]

The teacher stage is the same cached stage as in pipelines/two_stage.py: with the same teacher
and data config it is trained once and shared. The baseline (same backbone and low-res input,
no distillation) is the cached stage the CDKD tables' baseline rows and
pipelines/cross_res_refine.py use; the summary names ``<metric>_baseline`` and ``_cdkd``. Ends with one JSON line (and summary.json).
"""
from __future__ import annotations

import sys

from kdray.orchestration.args import parse_args


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args("cdkd", argv, __doc__)
    # torch, Ray and MLflow load after the arguments parsed: --help answers at once.
    from kdray.orchestration.pipeline import Pipeline
    from kdray.stages import CDKD_STUDENT, TEACHER, low_res_baseline
    with Pipeline("cdkd", cfg, args, stages=3) as p:
        plan = [(CDKD_STUDENT, None), (CDKD_STUDENT, low_res_baseline(p.cfg))]
        p.expect(plan if args.teacher else [(TEACHER, None), *plan])   # how long, said first
        teacher = p.teacher(args.teacher)                          # trained once, or given
        student = p.stage(CDKD_STUDENT, teacher=teacher)           # low-res student
        baseline = p.stage(CDKD_STUDENT, low_res_baseline(p.cfg), label="baseline")  # no KD

        metrics = p.stage_metrics({"teacher": teacher, "baseline": baseline, "cdkd": student})
        metrics.update({k: v for k, v in student.metrics.items()
                        if k.startswith(("tau", "alpha", "beta"))})

        for result in (teacher, student):                          # registration
            p.register(result)
        return p.finish(metrics)


if __name__ == "__main__":
    from kdray.errors import run_main  # a user's mistake: one line on stderr, exit code 2
    sys.exit(run_main(main, sys.argv[1:], "pipelines/cdkd.py"))
