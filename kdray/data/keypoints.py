"""Keypoint metadata: COCO-17, CrowdPose-14, MPII-16 (one table per dataset).

Flip pairs and skeleton edges are 0-based joint indices. OKS sigmas are those of the official
COCO and CrowdPose evaluators; MPII has none (it is scored with PCKh).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeypointSpec:
    name: str
    joints: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    skeleton: tuple[tuple[int, int], ...]
    sigmas: tuple[float, ...] | None
    upper_body: tuple[int, ...]   # for half-body augmentation

    @property
    def num_joints(self) -> int:
        return len(self.joints)

    def flip_index(self) -> list[int]:
        """Permutation that swaps left and right joints: ``flipped[:, j] = pose[:, idx[j]]``."""
        idx = list(range(self.num_joints))
        for a, b in self.flip_pairs:
            idx[a], idx[b] = b, a
        return idx


COCO = KeypointSpec(
    name="coco",
    joints=("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
            "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
            "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"),
    flip_pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
    skeleton=((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6),
              (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4),
              (3, 5), (4, 6)),
    sigmas=(.026, .025, .025, .035, .035, .079, .079, .072, .072, .062, .062, .107, .107,
            .087, .087, .089, .089),
    upper_body=tuple(range(11)),
)

CROWDPOSE = KeypointSpec(
    name="crowdpose",
    joints=("left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist",
            "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
            "right_ankle", "top_head", "neck"),
    flip_pairs=((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)),
    skeleton=((12, 13), (13, 0), (13, 1), (0, 2), (2, 4), (1, 3), (3, 5), (13, 6), (13, 7),
              (6, 8), (8, 10), (7, 9), (9, 11)),
    sigmas=(.079, .079, .072, .072, .062, .062, 0.107, 0.107, .087, .087, .089, .089, .079,
            .079),
    upper_body=(0, 1, 2, 3, 4, 5, 12, 13),
)

MPII = KeypointSpec(
    name="mpii",
    joints=("right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
            "pelvis", "thorax", "upper_neck", "head_top", "right_wrist", "right_elbow",
            "right_shoulder", "left_shoulder", "left_elbow", "left_wrist"),
    flip_pairs=((0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13)),
    skeleton=((0, 1), (1, 2), (2, 6), (6, 3), (3, 4), (4, 5), (6, 7), (7, 8), (8, 9),
              (7, 12), (12, 11), (11, 10), (7, 13), (13, 14), (14, 15)),
    sigmas=None,
    upper_body=(7, 8, 9, 10, 11, 12, 13, 14, 15),
)

# PCKh joint groups (the MPII evaluation's columns): group name -> joint indices.
MPII_PCKH_GROUPS = {
    "Head": (9,), "Shoulder": (12, 13), "Elbow": (11, 14), "Wrist": (10, 15),
    "Hip": (2, 3), "Knee": (1, 4), "Ankle": (0, 5),
}

# One dict maps a dataset name to its table; SynthPose uses the COCO-17 layout.
SPECS = {"coco": COCO, "synthpose": COCO, "crowdpose": CROWDPOSE, "mpii": MPII}


def spec_for(dataset: str) -> KeypointSpec:
    try:
        return SPECS[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(SPECS)}") from None


def spec_for_count(num_joints: int) -> KeypointSpec:
    """The table whose keypoint count matches (COCO-format readers accept any such dataset)."""
    for spec in (COCO, CROWDPOSE, MPII):
        if spec.num_joints == num_joints:
            return spec
    raise ValueError(f"no keypoint table has {num_joints} joints (known: 17, 14, 16)")
