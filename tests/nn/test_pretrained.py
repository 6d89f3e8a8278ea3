"""ImageNet initialisation (kdray/nn/pretrained.py): timm classification checkpoints as users
download them, timm's hub weights through huggingface_hub's cache, and the offline stop."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from kdray.config import ConfigError, ModelConfig
from kdray.nn.backbones import build_backbone
from kdray.codecs.simcc import SimCCCodec
from kdray.data.keypoints import COCO
from kdray.nn.pose_model import build_pose_model
from kdray.nn.pretrained import HF_FILE, backbone_weights, pretrained_file

REPO = Path(__file__).resolve().parents[2]


def _classifier(name: str, seed: int = 3) -> dict:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_loads_the_backbone_and_skips_the_classifier(suffix, tmp_path, capsys):
    from safetensors.torch import save_file
    sd = _classifier("hrnet_w18_small")
    path = tmp_path / f"hrnet_w18_small{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    model = build_pose_model(ModelConfig(backbone="hrnet_w18_small", weights=str(path)),
                             SimCCCodec((64, 64), 2.0), COCO.flip_index())
    own = model.backbone.state_dict()
    # values, not shapes: a stem conv and a deep fusion-layer BN statistic came from the file
    for key in ("conv1.weight", "stage4.0.fuse_layers.0.1.1.running_var"):
        torch.testing.assert_close(own[key], sd[key], rtol=0, atol=0)
    skipped = sorted(set(sd) - set(own))
    assert "classifier.weight" in skipped and "incre_modules.0.0.conv1.weight" in skipped
    report = capsys.readouterr().err
    assert f"loaded {len(own)} backbone tensors into hrnet_w18_small" in report
    assert f"skipped {len(skipped)} the pose backbone does not use" in report
    assert "classifier" in model.backbone_info.weights or "incre" in model.backbone_info.weights


def test_mobilenet_getter_and_kdray_checkpoint(tmp_path):
    # MobileNet's trunk is cut at 1/16: the deeper blocks and the classifier are skipped
    sd = _classifier("mobilenetv3_small_100")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "m.pth")
    net, info = build_backbone("mobilenetv3_small_100", str(tmp_path / "m.pth"))
    torch.testing.assert_close(net.model.conv_stem.weight, sd["conv_stem.weight"], rtol=0, atol=0)
    assert "blocks.4.0.conv_pw.weight" not in net.model.state_dict()
    # a kdray PoseModel state dict ("backbone.model...." + "head.*") also fits; the head is skipped
    pm = build_pose_model(ModelConfig(backbone="mobilenetv3_small_100"),
                          SimCCCodec((96, 64), 2.0), COCO.flip_index())
    torch.save(pm.state_dict(), tmp_path / "pose.pth")
    _, info = build_backbone("mobilenetv3_small_100", str(tmp_path / "pose.pth"))
    n_head = sum(1 for k in pm.state_dict() if k.startswith("head."))
    assert f"skipped {n_head} the pose backbone does not use (head." in info.weights


def test_keys_that_do_not_fit_fail_by_name(tmp_path):
    sd = _classifier("hrnet_w18_small")
    bad = {**sd, "decoder.conv.weight": torch.zeros(1)}
    del bad["conv1.weight"]
    bad["conv2.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as e:
        build_backbone("hrnet_w18_small", str(tmp_path / "bad.pth"))
    msg = str(e.value)
    assert "keys that are not hrnet_w18_small's: decoder.conv.weight" in msg
    assert "backbone keys missing: conv1.weight" in msg
    assert "conv2.weight (3, 3) vs (64, 64, 3, 3)" in msg
    # another architecture's checkpoint is refused, not half-loaded
    torch.save(_classifier("resnet18"), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="not a hrnet_w18_small checkpoint"):
        build_backbone("hrnet_w18_small", str(tmp_path / "r18.pth"))
    with pytest.raises(FileNotFoundError, match="model.weights"):
        build_backbone("hrnet_w18_small", str(tmp_path / "absent.pth"))
    with pytest.raises(ConfigError, match="student.model.pretrained and student.model.weights"):
        backbone_weights(ModelConfig(pretrained=True, weights="x.pth"), "student.model")


def test_pretrained_reads_the_hugging_face_cache_offline(tmp_path, monkeypatch):
    """timm's weights as huggingface_hub caches them (models--timm--<name>/snapshots/<rev>/),
    found with the hub offline. huggingface_hub reads HF_HUB_OFFLINE and the cache folder at
    import, and timm imported it already: the constants are set directly."""
    from huggingface_hub import constants
    from safetensors.torch import save_file
    repo = timm.models.get_pretrained_cfg("mobilenetv3_small_100").hf_hub_id
    base = tmp_path / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0" * 40)
    snap = base / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    sd = _classifier("mobilenetv3_small_100", seed=5)
    save_file(sd, str(snap / HF_FILE))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert pretrained_file("mobilenetv3_small_100") == snap / HF_FILE
    model = build_pose_model(ModelConfig(backbone="mobilenetv3_small_100", pretrained=True),
                             SimCCCodec((96, 64), 2.0), COCO.flip_index())
    torch.testing.assert_close(model.backbone.model.conv_stem.weight, sd["conv_stem.weight"],
                               rtol=0, atol=0)


def test_pretrained_offline_without_cache_stops_before_compute(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "kdray.cli", "train", "--config",
                           str(REPO / "configs" / "smoke.yaml"), "--out", str(out),
                           "teacher.model.pretrained=true"],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("kdray: error: teacher.model.pretrained:"), lines[0]
    assert "HF_HUB_OFFLINE is set" in lines[0]
    assert "set teacher.model.weights=FILE" in lines[0]
    assert not out.exists()    # stopped before the output folder or any data was touched
