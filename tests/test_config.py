"""Config loading: typed, validated before any compute, errors name file + dotted key."""
import re

import pytest

from kdray.config import (ConfigError, ExperimentConfig, config_hash, flatten, load_config,
                          to_dict, with_overrides)


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_partial_sections(tmp_path):
    cfg = load_config(write(tmp_path, "teacher:\n  train:\n    epochs: 3\n"))
    assert cfg.teacher.train.epochs == 3
    assert cfg.teacher.train.lr == ExperimentConfig().teacher.train.lr      # untouched sibling
    # a nested section with its own non-class default keeps it when partly given
    cfg = load_config(write(tmp_path, "tsd:\n  stage2:\n    train:\n      lr: 0.01\n"))
    assert cfg.tsd.stage2.train.epochs == 30 and cfg.tsd.stage2.train.lr == 0.01
    assert cfg.student.model.backbone == "mobilenetv3_small_100"


def test_dotted_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["tsd.stage1.alpha=1e-4", "data.input_size=[128, 96]",
                             "cdkd.etht=[tau, alpha]", "tsd.stage1.feature=false"])
    assert cfg.tsd.stage1.alpha == 1e-4
    assert cfg.data.input_size == (128, 96)
    assert cfg.cdkd.etht == ("tau", "alpha")
    assert cfg.tsd.stage1.feature is False
    # YAML 1.1 reads on/off as booleans; an on|off|auto field takes them as its words
    cfg = load_config(None, ["data.shards=on", "teacher.train.compile=off"])
    assert (cfg.data.shards, cfg.teacher.train.compile) == ("on", "off")


@pytest.mark.parametrize("text, key, expected", [
    ("teacher:\n  trian: {}\n", "teacher.trian", "unknown key"),
    ("teacher:\n  train:\n    epochs: many\n", "teacher.train.epochs", "expected an integer"),
    ("teacher:\n  train:\n    epochs: 0\n", "teacher.train.epochs", ">= 1"),
    ("data:\n  dataset: imagenet\n", "data.dataset", "expected one of"),
    ("data:\n  input_size: [96]\n", "data.input_size", "expected 2 values"),
    ("tsd:\n  stage1:\n    feature: 1\n", "tsd.stage1.feature", "true/false"),
    ("cdkd:\n  sau_kernels: 1-1\n", "cdkd.sau_kernels", "four counts"),
    ("cdkd:\n  tau_init: 20.0\n", "cdkd.tau_init", "within tau_range"),
    ("data:\n  flip_prob: 1.5\n", "data.flip_prob", "<= 1.0"),
    ("data:\n  synth: {side_p: .6, back_p: .6}\n", "data.synth.back_p", "side_p + back_p"),
])
def test_bad_values_name_file_and_key(tmp_path, text, key, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and key in msg and expected in msg


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["tsd.stage1.alpha"])


def test_round_trip_flatten_hash(tmp_path):
    cfg = load_config(None, ["teacher.train.epochs=2"])
    again = load_config(write(tmp_path, __import__("yaml").safe_dump(to_dict(cfg))))
    assert again == cfg
    flat = flatten(cfg)
    assert flat["teacher.train.epochs"] == 2 and flat["data.input_size"] == [96, 64]
    assert config_hash(cfg.teacher) == config_hash(again.teacher)
    assert config_hash(cfg.teacher) != config_hash(cfg.student)
    changed = with_overrides(cfg, {"cdkd.projectors": 5})
    assert changed.cdkd.projectors == 5 and cfg.cdkd.projectors == 3
    with pytest.raises(ConfigError, match="cdkd.nope"):
        with_overrides(cfg, {"cdkd.nope": 1})
    with pytest.raises(ConfigError, match="cdkd.projectors"):
        with_overrides(cfg, {"cdkd.projectors": 99})


def test_duplicate_keys_are_refused_but_anchors_and_merges_work(tmp_path):
    merged = load_config(write(tmp_path, "teacher:\n  train: &t {epochs: 3, lr: 0.01}\n"
                                         "student:\n  train:\n    <<: *t\n    lr: 0.02\n"))
    assert (merged.student.train.epochs, merged.student.train.lr) == (3, 0.02)
    path = write(tmp_path, "teacher:\n  train:\n    lr: 0.1\n    epochs: 2\n    lr: 0.2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (f"{path}: teacher.train.lr: key given twice (lines 3 and 5); YAML "
                            f"would keep only the last value")


@pytest.mark.parametrize("override, key", [
    ("teacher.train.weight_decay=.inf", "teacher.train.weight_decay"),
    ("cdkd.alpha=-.inf", "cdkd.alpha"), ("data.scale_range=[0.5, .nan]", "data.scale_range[1]"),
    ("tsd.stage1.beta=1e999", "tsd.stage1.beta")])
def test_non_finite_numbers_are_refused(override, key):
    with pytest.raises(ConfigError, match=re.escape(f"{key}: expected a finite number")):
        load_config(None, [override])


def test_renamed_keys_name_their_new_name(tmp_path):
    # CDKD's xi (the ETHT reversal strength) became cdkd.reversal_*; tsd.stage2.xi keeps Eq. 7's
    path = write(tmp_path, "cdkd:\n  xi_max: 2.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: cdkd.xi_max: renamed to cdkd.reversal_max"
    with pytest.raises(ConfigError, match=r": cdkd\.xi_schedule: renamed to cdkd\.reversal_schedule$"):
        load_config(None, ["cdkd.xi_schedule=ctkd"])
    cfg = load_config(None, ["cdkd.reversal_max=2.0", "cdkd.reversal_schedule=ctkd"])
    assert (cfg.cdkd.reversal_max, cfg.cdkd.reversal_schedule) == (2.0, "ctkd")


PAPER_CONFIGS = ("tsd_coco_w48_to_w32", "tsd_crowdpose_w48_to_w32", "cdkd_coco_32",
                 "cdkd_mpii_32", "cdkd_mpii_64")


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_start_from_imagenet_on_shipped_layouts(name):
    """The papers initialise every HRNet from ImageNet; COCO reads train2017/ and val2017/."""
    from pathlib import Path

    from kdray.nn.pretrained import model_configs
    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    paper = {k: m.pretrained for k, m in model_configs(cfg)   # the sections its papers train
             if m.backbone in ("hrnet_w32", "hrnet_w48")}
    assert len(paper) == 2 and all(paper.values()), paper
    if cfg.data.dataset == "coco":
        assert (cfg.data.train_images, cfg.data.val_images) == ("train2017", "val2017")
    if cfg.data.dataset == "crowdpose":
        assert cfg.data.val_boxes == "annotations/det_for_crowd_test_0.1_0.5.json"
