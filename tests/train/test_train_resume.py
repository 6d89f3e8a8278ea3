"""`kdray train --out DIR` resumes only the run it would have made: same stage, same
result-changing config, same inputs; anything else exits 2 naming the keys, or --overwrite."""
import json
from pathlib import Path

import pytest

from kdray.cli import main as kdray

SMOKE = Path(__file__).parents[2] / "configs" / "smoke.yaml"


@pytest.fixture
def base_args(synth_root):
    return ["train", "--config", str(SMOKE), f"data.root={synth_root}", "data.synth.train=64",
            "data.synth.val=24", "teacher.model.backbone=mobilenetv3_small_100",
            "teacher.train.batch_size=32"]


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_other_config_in_out_dir_exits_2_naming_keys_and_keeps_the_run(base_args, tmp_path,
                                                                       capsys):
    out = tmp_path / "run"
    assert kdray([*base_args, "--out", str(out)]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[-1])
    before = {n: (out / n).read_bytes() for n in ("metrics.json", "config.yaml", "train.json")}

    # Another lr and seed: refused, nothing in DIR touched.
    assert kdray([*base_args, "--out", str(out), "teacher.train.lr=0.05",
                  "teacher.train.seed=7"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err
    assert "teacher.train.lr: 0.002 -> 0.05" in err and "teacher.train.seed: 0 -> 7" in err
    assert "Traceback" not in err
    assert {n: (out / n).read_bytes() for n in before} == before

    # Loader workers do not change results: the finished run is handed back as it is.
    assert kdray([*base_args, "--out", str(out), "data.num_workers=1"]) == 0
    again = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert again["metrics"] == first["metrics"]

    # --overwrite trains afresh under the new config.
    assert kdray([*base_args, "--out", str(out), "--overwrite", "teacher.train.lr=0.05",
                  "teacher.train.seed=7"]) == 0
    capsys.readouterr()
    assert "lr: 0.05" in (out / "config.yaml").read_text()
    assert json.loads((out / "train.json").read_text())["fields"]["teacher.train.seed"] == 7
    assert _metrics(out)["final"]["loss"] != first["metrics"]["loss"]


def test_other_stage_or_teacher_in_out_dir_is_refused(base_args, tmp_path, capsys):
    out, teacher = tmp_path / "student", tmp_path / "teacher"
    assert kdray([*base_args, "--out", str(teacher)]) == 0
    ckpt = teacher / "checkpoints" / "last.pt"
    assert kdray([*base_args, "--stage", "student", "--teacher", str(ckpt), "--out",
                  str(out)]) == 0
    capsys.readouterr()
    # Same dir, teacher stage: the stage differs.
    assert kdray([*base_args, "--out", str(out)]) == 2
    assert "stage: student -> teacher" in capsys.readouterr().err
    # Same stage, another teacher checkpoint (other bytes): the input differs.
    other = tmp_path / "other.pt"
    other.write_bytes(ckpt.read_bytes() + b"\0")
    assert kdray([*base_args, "--stage", "student", "--teacher", str(other), "--out",
                  str(out)]) == 2
    assert "--teacher checkpoint" in capsys.readouterr().err
