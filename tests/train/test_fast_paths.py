"""Fast-path resolution (issue 9): auto choices per device, torch.compile keeps checkpoint keys."""
import torch

from kdray.codecs.simcc import SimCCCodec
from kdray.config import ModelConfig, TrainConfig
from kdray.data.keypoints import COCO
from kdray.nn.pose_model import build_pose_model
from kdray.train import compile_pose_models, fast_paths


def test_auto_choices_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    fp = fast_paths(TrainConfig(), cpu)
    assert (fp.bf16, fp.channels_last, fp.compile) == (False, True, False)
    fp = fast_paths(TrainConfig(), cuda)
    assert (fp.bf16, fp.channels_last, fp.compile) == (True, True, True)
    fp = fast_paths(TrainConfig(precision="bf16", channels_last="off", compile="on"), cpu)
    assert (fp.bf16, fp.channels_last, fp.compile) == (True, False, True)


def test_compile_in_place_keeps_state_dict_keys():
    model = build_pose_model(ModelConfig(backbone="mobilenetv3_small_100"),
                             SimCCCodec((64, 64), 2.0), COCO.flip_index())
    holder = torch.nn.Module()
    holder.model = model
    keys = list(holder.state_dict())
    assert compile_pose_models(holder) == 1        # lazily compiled: no forward run here
    assert list(holder.state_dict()) == keys
