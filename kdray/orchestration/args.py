"""The pipelines' command line (docs/architecture.md, "Command-line contract").

Kept apart from kdray/orchestration/pipeline.py, which imports torch, timm, Ray and MLflow:
``python pipelines/two_stage.py --help`` answers without loading any of them.
"""
from __future__ import annotations

import argparse
import sys

from kdray.config import ExperimentConfig, load_config
from kdray.console import set_verbose


def parse_args(pipeline: str, argv: list[str] | None = None, doc: str = "",
               extra=None) -> tuple[argparse.Namespace, ExperimentConfig]:
    """The pipeline contract (docs/architecture.md, "Command-line contract"): --config, dotted
    overrides, --out, ..."""
    p = argparse.ArgumentParser(prog=f"pipelines/{pipeline}.py", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML config (default: the built-in defaults, docs/config.md)")
    p.add_argument("--storage", default=None,
                   help="root of every output: runs/, the stage cache, mlflow.db, relative data "
                        "paths (default: $KDRAY_STORAGE or the CWD; give it under `ray job`)")
    p.add_argument("--out", default=None,
                   help=f"output dir (default <storage>/runs/{pipeline}; relative: under storage)")
    p.add_argument("--cache", default=None,
                   help="stage cache shared by pipelines (default <storage>/runs/stages)")
    p.add_argument("--teacher", default=None,
                   help="use this teacher instead of training one: a checkpoint or "
                        "models:/NAME@ALIAS")
    if extra is not None:
        extra(p)
    p.add_argument("--verbose", action="store_true",
                   help="also show what Ray, MLflow and pycocotools print (default: kdray's own "
                        "progress and results only)")
    p.add_argument("overrides", nargs="*",
                   help="dotted.key=value config overrides, e.g. teacher.train.epochs=5")
    args = p.parse_intermixed_args(argv)  # positionals (a sweep's space file) before options
    set_verbose(args.verbose)
    cfg = load_config(args.config, args.overrides)
    from kdray.nn.pretrained import check_pretrained  # ImageNet weights: before any compute
    check_pretrained(cfg, skip=("teacher.model",) if args.teacher else ())
    return args, cfg


def help_first(pipeline: str, doc: str = "", extra=None) -> None:
    """For a script whose imports are heavy: answer ``--help`` (and exit) before they load.
    Call it at the top of the script, under ``if __name__ == "__main__"``."""
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        parse_args(pipeline, sys.argv[1:], doc, extra)
