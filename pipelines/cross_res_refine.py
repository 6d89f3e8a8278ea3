"""The two papers composed: a CDKD low-resolution student refined by IGP-GCN, top to bottom.

    teacher (high resolution) -> CDKD student (low resolution, SAPE + CCA + ETHT)
            -> IGP-GCN on the frozen CDKD student, supervised by the high-res teacher's pose
            -> the low-res student trained alone (the baseline) -> registration

    python pipelines/cross_res_refine.py [--config configs/cdkd_demo.yaml] [dotted.key=value ...]

The refinement reads ``tsd.stage2`` (GCN size, Eq. 7 weights, its training) and sees the CDKD
student's input size (``cdkd.low_res_size``); the teacher sees the high-resolution view of the
same crop. Stages are cached like every pipeline's: the teacher and the CDKD student are shared
with pipelines/cdkd.py. Ends with one JSON line (metrics ``<metric>_baseline``, ``_cdkd``,
``_refined``) and summary.json.
"""
from __future__ import annotations

import sys

from kdray.orchestration.args import parse_args


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args("cross_res_refine", argv, __doc__)
    # torch, Ray and MLflow load after the arguments parsed: --help answers at once.
    from kdray.orchestration.pipeline import Pipeline
    from kdray.stages import CDKD_REFINED, CDKD_STUDENT, TEACHER, low_res_baseline
    with Pipeline("cross_res_refine", cfg, args, stages=4) as p:
        plan = [(CDKD_STUDENT, None), (CDKD_REFINED, None),
                (CDKD_STUDENT, low_res_baseline(p.cfg))]
        p.expect(plan if args.teacher else [(TEACHER, None), *plan])   # how long, said first
        teacher = p.teacher(args.teacher)                          # trained once, or given
        student = p.stage(CDKD_STUDENT, teacher=teacher)           # low-res, distilled
        refined = p.stage(CDKD_REFINED, label="refined", teacher=teacher, student=student)
        baseline = p.stage(CDKD_STUDENT, low_res_baseline(p.cfg), label="baseline")  # no KD

        metrics = p.stage_metrics({"teacher": teacher, "baseline": baseline, "cdkd": student,
                                   "refined": refined})

        for result in (teacher, student, refined):                  # registration
            p.register(result)
        return p.finish(metrics)


if __name__ == "__main__":
    from kdray.errors import run_main  # a user's mistake: one line on stderr, exit code 2
    sys.exit(run_main(main, sys.argv[1:], "pipelines/cross_res_refine.py"))
