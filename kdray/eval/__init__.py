"""Evaluation: COCO / CrowdPose OKS AP (pycocotools) and MPII PCKh (docs/methods.md section 1.4).

``evaluate_file`` is what ``kdray eval --gt ANN --pred RESULTS --metric coco|crowdpose|pckh``
calls; every metric is in percent, ``None`` where there was nothing to score.
"""
from __future__ import annotations

from kdray.eval.coco import (METRICS, crowd_index_buckets, evaluate_coco, evaluate_file,
                             to_coco_results)
from kdray.eval.pckh import evaluate_pckh

__all__ = ["METRICS", "crowd_index_buckets", "evaluate_coco", "evaluate_file", "evaluate_pckh",
           "to_coco_results"]
