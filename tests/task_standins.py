"""Stand-ins for tests/test_tasks.py: a few-parameter model honouring the model contract, a tiny
batch, float64 references of the losses written from the paper equations (not by calling
kdray/losses), and one optimizer step that checks what must stay frozen.

Tolerance of ``close``: the tasks compute in fp32 (eps 1.2e-7) sums of at most a few thousand
terms, so rtol 1e-5 bounds their rounding; a wiring bug (wrong view, mask, weight, tau, feature
map) moves a term by orders of magnitude more. Sizes are non-square so that an x/y swap shows.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from kdray.codecs.simcc import SimCCCodec
from kdray.data.dataset import normalize
from kdray.nn.pose_model import PoseModel
from kdray.train import Progress

K, B = 4, 2
HI, LO = (16, 12), (8, 6)                 # (H, W) of the teacher's and the low-res view
SKELETON = [(0, 1), (1, 2), (2, 3)]
FLIP = list(range(K))
PROGRESS = Progress(epoch=2, epochs=4, fraction=0.25)   # gamma 0.75, reversal 0.1464 max
WEIGHT = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0]])
WEIGHT_LOW = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])


def close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected).double(),
                               rtol=rtol, atol=atol)


class TinyPose(nn.Module):
    """The model contract (kdray/nn/pose_model.py) in a few parameters: 1x1 conv + BN + ReLU is
    the stride-1 map (the head input, last), average pools give the 1/2 and 1/4 maps, two linear
    heads on the pooled map give the SimCC logits (split ratio 2)."""

    def __init__(self, channels: int, size: tuple[int, int]):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 1, bias=False)   # no bias: BN would zero its grad
        self.bn = nn.BatchNorm2d(channels)
        self.bins = (2 * size[1], 2 * size[0])
        self.head_x = nn.Linear(channels, K * self.bins[0])
        self.head_y = nn.Linear(channels, K * self.bins[1])
        self.feat_channels, self.feat_strides = [channels] * 3, [4, 2, 1]
        # what predict needs (kdray/nn/pose_model.py): the codec and the flip pairs
        self.codec, self.flip_index, self.input_size = SimCCCodec(size), FLIP, size

    logits = PoseModel.logits      # flip test and decoding exactly as the real model does them
    predict = PoseModel.predict

    def forward(self, images):
        f = F.relu(self.bn(self.conv(images)))
        pooled = f.mean(dim=(2, 3))
        return {"feats": [F.avg_pool2d(f, 4), F.avg_pool2d(f, 2), f],
                "logits_x": self.head_x(pooled).view(-1, K, self.bins[0]),
                "logits_y": self.head_y(pooled).view(-1, K, self.bins[1])}


def make_batch() -> dict:
    g = torch.Generator().manual_seed(0)

    def dist(n):  # a SimCC target: a distribution over n bins, every bin > 0
        return torch.softmax(torch.randn(B, K, n, generator=g), dim=-1)

    def image(size):
        return torch.randint(0, 256, (B, 3, *size), generator=g, dtype=torch.uint8)
    return {"image": image(HI), "target_x": dist(2 * HI[1]), "target_y": dist(2 * HI[0]),
            "target_weight": WEIGHT.clone(), "keypoints": torch.rand(B, K, 2, generator=g) * 10,
            "image_low": image(LO), "target_x_low": dist(2 * LO[1]),
            "target_y_low": dist(2 * LO[0]), "target_weight_low": WEIGHT_LOW.clone()}


def nets(student_size=HI):
    torch.manual_seed(0)
    return TinyPose(3, student_size), TinyPose(5, HI)


def outputs(model, images):
    with torch.no_grad():
        out = model(normalize(images))
    return {k: ([f.double() for f in v] if k == "feats" else v.double()) for k, v in out.items()}


# ---- by-hand references (float64) -------------------------------------------------------------
def log_softmax(z, tau=1.0):
    return 10 * z / tau - torch.logsumexp(10 * z / tau, dim=-1, keepdim=True)


def kl_by_hand(out, batch, suffix=""):
    """L_KL: sum_i t (log t - log softmax(10 z)), x + y, over the labelled joints."""
    kl = sum((t.double() * (t.double().log() - log_softmax(out[f"logits_{a}"]))).sum(-1)
             for a, t in (("x", batch["target_x" + suffix]), ("y", batch["target_y" + suffix])))
    w = batch["target_weight" + suffix].double()
    return (kl * w).sum() / (w > 0).sum()


def soft_xy(out):
    return torch.stack([(log_softmax(out[f"logits_{a}"]).exp()
                         * torch.arange(out[f"logits_{a}"].shape[-1])).sum(-1)
                        / out[f"logits_{a}"].shape[-1] for a in "xy"], dim=-1)


def l1_by_hand(p, q, mask):
    m = (mask > 0).double()
    return ((p.double() - q.double()).abs().sum(-1) * m).sum() / m.sum()


def argmax_xy(out, size):
    """Argmax decoding to [0, 1] units: bin / split ratio / (W, H)."""
    return torch.stack([out["logits_x"].argmax(-1) / 2 / size[1],
                        out["logits_y"].argmax(-1) / 2 / size[0]], dim=-1)


# ---- frozen members, trainable set, one optimizer step ----------------------------------------
def step_and_check(task, batch, trainable: dict[str, nn.Module], frozen: list[nn.Module]):
    """trainable: prefix -> module whose parameters (and nothing else) the optimizer gets.
    Returns the names of trainable parameters one SGD step left unchanged."""
    task.train()
    names = {id(p): n for n, p in task.named_parameters()}
    expected = {id(p) for m in trainable.values() for p in m.parameters()}
    got = {id(p) for p in task.trainable_parameters()}
    assert sorted(names[i] for i in got) == sorted(names[i] for i in expected)
    for member in frozen:
        assert not any(m.training for m in member.modules())
        assert not any(p.requires_grad for p in member.parameters())
    before = [copy.deepcopy(m.state_dict()) for m in frozen]
    start = {id(p): p.detach().clone() for p in task.trainable_parameters()}
    opt = torch.optim.SGD(task.trainable_parameters(), lr=0.1)
    task(batch, PROGRESS)["loss"].backward()
    opt.step()
    for member, state in zip(frozen, before):  # weights and BatchNorm running statistics
        assert all(p.grad is None for p in member.parameters())
        for key, value in member.state_dict().items():
            assert torch.equal(value, state[key]), key
    return sorted(names[id(p)] for p in task.trainable_parameters()
                  if torch.equal(p.detach(), start[id(p)]))
