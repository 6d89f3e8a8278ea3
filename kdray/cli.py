"""The ``kdray`` command (docs/architecture.md, "Command-line contract").

    kdray data synth --out data/synthpose --train 4000 --val 500 --seed 0 [--stats]
                     [--max-persons 4 --crowd-p .4 --occluder-p .15 --side-p .25 --back-p .25]
    kdray data preview --root data/synthpose --out preview.png
    kdray eval --gt ANN.json --pred RESULTS.json --metric coco|crowdpose|pckh [--json]
    kdray train --config configs/demo_teacher.yaml --out DIR [--stage teacher] [a.b=c ...]
    kdray predict --model CKPT|models:/NAME@ALIAS IMAGE [--boxes DET.json] --out pose.png
                  [--score-thr .5 --nms-iou .5] [--json keypoints.json]
    kdray test --model CKPT|models:/NAME@ALIAS [--config C] [a.b=c ...] --out DIR
    kdray export --model CKPT|models:/NAME@ALIAS --onnx OUT.onnx
    kdray registry list | kdray registry show NAME@ALIAS
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _data(args) -> int:
    if args.data_cmd == "synth":
        from kdray.data.synthpose import Difficulty, dataset_stats, generate
        out = generate(args.out, train=args.train, val=args.val, seed=args.seed,
                       workers=args.workers, hard=Difficulty.of(args))
        print(json.dumps({k: str(v) for k, v in out.items()}))
        if args.stats:
            print(json.dumps(dataset_stats(args.out), indent=1))
        return 0
    if args.data_cmd == "stats":
        from kdray.data.synthpose import dataset_stats
        print(json.dumps(dataset_stats(args.root), indent=1))
        return 0
    from kdray.vis import preview_sheet
    root = Path(args.root)
    path = preview_sheet(root / args.ann, root / "images", args.out, n=args.n)
    print(path)
    return 0


def _eval(args) -> int:
    from kdray.eval.coco import evaluate_file
    metrics = evaluate_file(args.gt, args.pred, args.metric)
    if args.json:
        print(json.dumps(metrics))
    else:
        for k, v in metrics.items():
            print(f"{k:>10}: {v:.2f}" if isinstance(v, float) else f"{k:>10}: {v}")
    return 0


def _train(args) -> int:
    from kdray.config import load_config
    from kdray.errors import InputError
    from kdray.eval.complexity import complexity
    from kdray.stage_run import claim_out_dir, kind, run_stage

    cfg = load_config(args.config, args.overrides)
    stage = kind(args.stage)
    if args.dry_run and stage.refined:
        raise InputError(f"--dry-run counts a pose model's parameters and GFLOPs; the "
                         f"{stage.name} stage trains an IGP-GCN on a given student: use the "
                         f"student's stage")
    if args.dry_run:
        from kdray.data.keypoints import spec_for
        from kdray.config import with_overrides
        model_cfg, size = stage.model(cfg), stage.input_size(cfg)
        # counting needs no ImageNet weights (nor a download)
        counted = with_overrides(cfg, {f"{stage.model_key}.pretrained": False,
                                       f"{stage.model_key}.weights": ""})
        model = stage.pose_model(counted, spec_for(cfg.data.dataset))
        print(json.dumps({"stage": stage.name, "backbone": model_cfg.backbone,
                          "input_size": list(size), **complexity(model, size)}))
        return 0
    from kdray.progress import ConsoleProgress
    inputs = {k: v for k, v in (("teacher", args.teacher), ("student", args.student)) if v}
    missing = [f"--{k}" for k in stage.inputs(cfg) if k not in inputs]
    if missing:  # before the output dir is claimed or any data is read
        raise InputError(f"--stage {stage.name} needs {' and '.join(missing)} (a checkpoint "
                         f"file or folder from an earlier `kdray train`, e.g. "
                         f"runs/{missing[0][2:]}/checkpoints/last.pt)")
    if not stage.refined:  # ImageNet weights: downloaded, or a clear stop, before any compute
        from kdray.nn.pretrained import backbone_weights
        backbone_weights(stage.model(cfg), stage.model_key)
    out = Path(args.out).resolve()
    claim_out_dir(stage, cfg, out, inputs, overwrite=args.overwrite)  # resume or refuse
    progress = ConsoleProgress(stage.name)
    try:
        result = run_stage(stage, cfg, out, inputs, progress=progress)
    finally:
        progress.clear()
    print(json.dumps({"stage": stage.name, "out": str(out), "metrics": result.metrics}))
    return 0


def _predict(args) -> int:
    from kdray.predict import run_predict
    print(json.dumps(run_predict(args)))
    return 0


def _test(args) -> int:
    from kdray.config import load_config
    from kdray.evaluate import run_test
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(run_test(args.model, cfg, args.out)))
    return 0


def _export(args) -> int:
    from kdray.evaluate import load_model
    from kdray.export import export_onnx
    print(json.dumps(export_onnx(*load_model(args.model), args.onnx)))
    return 0


def _registry(args) -> int:
    from kdray.orchestration import registry, tracking
    uri = tracking.existing_store()  # reading must not create an empty mlflow.db
    if args.reg_cmd == "list":
        print(json.dumps(registry.list_models(uri), indent=1))
    else:
        print(json.dumps(registry.show_model(args.ref, uri), indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdray", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("data", help="the embedded SynthPose dataset").add_subparsers(
        dest="data_cmd", required=True)
    s = d.add_parser("synth", help="generate SynthPose (COCO format)")
    s.add_argument("--out", default="data/synthpose",
                   help="output folder for train.json, val.json and images/ (default: %(default)s)")
    s.add_argument("--train", type=int, default=4000,
                   help="training persons (default: %(default)s)")
    s.add_argument("--val", type=int, default=500, help="validation persons (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0,
                   help="generator seed; same seed, same data (default: %(default)s)")
    s.add_argument("--workers", type=int, default=2,
                   help="worker processes drawing images (default: %(default)s)")
    s.add_argument("--max-persons", type=int, default=4, choices=(1, 2, 3, 4),
                   help="most persons per image (default: %(default)s)")
    s.add_argument("--crowd-p", type=float, default=.4,
                   help="chance a multi-person image is a crowd (default: %(default)s)")
    s.add_argument("--occluder-p", type=float, default=.15,
                   help="chance an object hides a person (default: %(default)s)")
    s.add_argument("--side-p", type=float, default=.25,
                   help="chance of a side view, any yaw (default: %(default)s)")
    s.add_argument("--back-p", type=float, default=.25,
                   help="chance of a person turned away (default: %(default)s)")
    s.add_argument("--stats", action="store_true", help="print dataset statistics")
    st = d.add_parser("stats", help="statistics of a generated SynthPose folder")
    st.add_argument("--root", default="data/synthpose",
                    help="the generated folder (default: %(default)s)")
    pv = d.add_parser("preview", help="PNG sheet of annotated person crops")
    pv.add_argument("--root", default="data/synthpose",
                    help="dataset folder (default: %(default)s)")
    pv.add_argument("--ann", default="train.json",
                    help="annotation file, relative to --root (default: %(default)s)")
    pv.add_argument("--out", default="runs/preview.png",
                    help="PNG file to write (default: %(default)s)")
    pv.add_argument("-n", type=int, default=24, help="number of crops (default: %(default)s)")

    e = sub.add_parser("eval", help="score a results file with the reference evaluator")
    e.add_argument("--gt", required=True,
                   help="ground truth: COCO/CrowdPose keypoint JSON or MPII JSON list")
    e.add_argument("--pred", required=True,
                   help="predictions: COCO keypoint results JSON, or an MPII joints list")
    e.add_argument("--metric", choices=("coco", "crowdpose", "pckh"), default="coco",
                   help="OKS AP (COCO), CrowdPose AP with AP^E/M/H, or MPII PCKh@0.5 "
                        "(default: %(default)s)")
    e.add_argument("--json", action="store_true",
                   help="print the metrics as one JSON object (percent)")

    t = sub.add_parser("train", help="train and evaluate one stage")
    t.add_argument("--config", default=None,
                   help="YAML config (default: the built-in defaults, docs/config.md)")
    t.add_argument("--out", default="runs/train",
                   help="output dir: checkpoints, metrics.json, config.yaml (default: %(default)s)")
    # The names of kdray.stages.STAGES (spelled out: importing it loads torch; a test checks).
    t.add_argument("--stage", choices=("teacher", "student", "gcn", "cdkd", "cdkd_gcn"),
                   default="teacher",
                   help="teacher, TSD stage 1 (student), TSD stage 2 (gcn), cdkd, or the CDKD "
                        "student refined by IGP-GCN (cdkd_gcn) (default: %(default)s)")
    t.add_argument("--teacher", help="teacher checkpoint (student/gcn/cdkd stages)")
    t.add_argument("--student", help="stage-1 student checkpoint (gcn stage)")
    t.add_argument("--dry-run", action="store_true", help="print params and GFLOPs, no training")
    t.add_argument("--overwrite", action="store_true",
                   help="discard the run already in --out and start afresh (without it, a run "
                        "in --out is resumed only if its config and inputs are the same)")
    t.add_argument("overrides", nargs="*",
                   help="dotted.key=value config overrides, e.g. teacher.train.epochs=5")

    pr = sub.add_parser("predict", help="draw predicted skeletons on an image")
    pr.add_argument("--model", required=True, help="checkpoint path or models:/NAME@ALIAS")
    pr.add_argument("image", help="the image file")
    pr.add_argument("--boxes", help="detector results JSON (COCO format); default: the whole "
                                    "image is one person box")
    pr.add_argument("--score-thr", type=float, default=0.5,
                    help="skip --boxes entries scoring below this (default: %(default)s)")
    pr.add_argument("--nms-iou", type=float, default=0.5,
                    help="drop a box overlapping a better one by more than this IoU "
                         "(default: %(default)s)")
    pr.add_argument("--json", default=None,
                    help="also write the keypoints as COCO keypoint results to this file "
                         "(default: none)")
    pr.add_argument("--out", default="pose.png",
                    help="image with the drawn skeletons (default: %(default)s)")

    te = sub.add_parser("test", help="run a model on the config's val split: results.json "
                                     "(what kdray eval reads) and metrics.json")
    te.add_argument("--model", required=True, help="checkpoint path or models:/NAME@ALIAS")
    te.add_argument("--config", default=None,
                    help="YAML config whose data section gives the val split (default: the "
                         "built-in defaults, docs/config.md)")
    te.add_argument("--out", default="runs/test",
                    help="output dir: results.json, metrics.json (default: %(default)s)")
    te.add_argument("overrides", nargs="*",
                    help="dotted.key=value config overrides, e.g. data.root=data/coco")

    ex = sub.add_parser("export", help="the deployable network as ONNX (crops in, decoded "
                                       "keypoints out; docs in kdray/export.py)")
    ex.add_argument("--model", required=True, help="checkpoint path or models:/NAME@ALIAS")
    ex.add_argument("--onnx", required=True, help="ONNX file to write, e.g. pose.onnx")

    r = sub.add_parser("registry", help="MLflow model registry").add_subparsers(
        dest="reg_cmd", required=True)
    r.add_parser("list", help="registered kdray models with their aliases")
    sh = r.add_parser("show", help="one model version: tags, run, metrics, aliases")
    sh.add_argument("ref", help="NAME@ALIAS or NAME/VERSION")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`kdray train --out D a.b=c`): argparse stops the
    # positional list at the first option, and its intermixed mode does not take subcommands.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    handler = {"data": _data, "eval": _eval, "train": _train, "predict": _predict,
               "test": _test, "export": _export, "registry": _registry}[args.cmd]
    from kdray.errors import run_main
    return run_main(handler, args, "kdray")  # a user's mistake: one line on stderr, exit 2


if __name__ == "__main__":
    sys.exit(main())
