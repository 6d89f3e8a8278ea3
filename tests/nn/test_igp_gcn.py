"""IGP-GCN (TSD stage 2): shapes, zero-init offsets, joint sampling, adjacency, trainability."""
from __future__ import annotations

import pytest
import torch

from kdray.losses.tsd import gcn_block_loss, stage2_loss
from kdray.nn.igp_gcn import IGPGCN, normalized_adjacency, sample_joint_features

from .conftest import assert_gradients_match_finite_differences

K = 4
SKEL = ((0, 1), (1, 2), (2, 3))          # a chain
CHANNELS = (8, 6, 4)                     # F1 (1/16), F2 (1/8), F3 (1/4) of a 64x48 input
SIZES = ((4, 3), (8, 6), (16, 12))


def _inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p_init = torch.rand(batch, K, 3, generator=g)
    feats = [torch.randn(batch, c, h, w, generator=g) for c, (h, w) in zip(CHANNELS, SIZES)]
    return p_init, feats


def test_output_shapes_and_zero_init_offsets():
    torch.manual_seed(0)
    model = IGPGCN(K, SKEL, CHANNELS, hidden=16)
    p_init, feats = _inputs()
    poses = model(p_init, feats)
    assert len(poses) == 3
    for p in poses:
        assert p.shape == (2, K, 2)
        # offset heads start at zero: every P_i equals P_init's (x, y)
        assert torch.equal(p, p_init[..., :2])


def test_sample_joint_features_hits_pixel_centre():
    # map (1, 1, h=4, w=3) with a single hot pixel value 7 at row 2, column 1
    feat = torch.zeros(1, 1, 4, 3)
    feat[0, 0, 2, 1] = 7.0
    # pixel (row r, col c) centre in [0, 1]: x = (c + 0.5)/w, y = (r + 0.5)/h
    hot = ((1 + 0.5) / 3, (2 + 0.5) / 4)        # (0.5, 0.625)
    cold = ((0 + 0.5) / 3, (0 + 0.5) / 4)       # pixel (0, 0): value 0
    half = ((1 + 0.5) / 3, (2 + 1.0) / 4)       # halfway to the row below: 7/2 bilinearly
    xy = torch.tensor([[hot, cold, half]])      # (1, 3, 2)
    out = sample_joint_features(feat, xy)
    assert out.shape == (1, 3, 1)
    assert out[0, :, 0].tolist() == pytest.approx([7.0, 0.0, 3.5])


@pytest.mark.parametrize("learn_edges", [False, True])
def test_adjacency_rows_sum_to_one(learn_edges):
    model = IGPGCN(K, SKEL, CHANNELS, hidden=8, learn_edges=learn_edges)
    adj = model.adjacency()
    # D^-1 (A + I) of the chain: end joints have degree 2, middle ones 3
    expected = torch.tensor([[1 / 2, 1 / 2, 0, 0], [1 / 3, 1 / 3, 1 / 3, 0],
                             [0, 1 / 3, 1 / 3, 1 / 3], [0, 0, 1 / 2, 1 / 2]])
    assert torch.allclose(adj, expected)
    assert torch.allclose(normalized_adjacency(K, SKEL), expected)
    if learn_edges:   # after moving the logits: still row-stochastic, still zero off support
        with torch.no_grad():
            model.edge_logits.normal_()
        adj = model.adjacency()
        assert torch.allclose(adj.sum(dim=1), torch.ones(K))
        assert (adj[expected == 0] == 0).all()


def test_gradients_reach_gcn_params():
    torch.manual_seed(0)
    model = IGPGCN(K, SKEL, CHANNELS, hidden=16)
    for block in model.blocks:   # move off the zero init, else only the heads see a gradient
        torch.nn.init.normal_(block.offset.weight, std=0.1)
    model.double()
    p_init, feats = _inputs()
    p_init, feats = p_init.double(), [f.double() for f in feats]
    target = torch.rand(2, K, 2, dtype=torch.float64)

    def loss():
        return stage2_loss([gcn_block_loss(p, target, torch.ones(2, K))
                            for p in model(p_init, feats)])
    assert_gradients_match_finite_differences(loss, dict(model.named_parameters()))


def test_few_steps_reduce_loss_on_toy_target():
    torch.manual_seed(0)
    model = IGPGCN(K, SKEL, CHANNELS, hidden=16)
    p_init, feats = _inputs(batch=4)
    target = (p_init[..., :2] + torch.tensor([0.05, -0.03])).detach()   # a constant shift
    mask = torch.ones(4, K)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_fn():
        return stage2_loss([gcn_block_loss(p, target, mask) for p in model(p_init, feats)])

    first = loss_fn().item()
    for _ in range(30):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.5 * first


def test_rejects_wrong_inputs():
    model = IGPGCN(K, SKEL, CHANNELS, hidden=8)
    p_init, feats = _inputs()
    with pytest.raises(ValueError, match="channels"):
        model(p_init, [feats[0], feats[0], feats[2]])
    with pytest.raises(ValueError, match="three"):
        model(p_init, feats[:2])
    with pytest.raises(ValueError, match="p_init"):
        model(p_init[..., :2], feats)
