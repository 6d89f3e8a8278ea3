"""SimCC codec: targets, decoding, soft-argmax and the exact flip test (kdray/codecs/simcc.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdray.codecs.simcc import SimCCCodec, flip_logits, sigma_for_size, soft_argmax
from kdray.data.keypoints import COCO


def test_bins_follow_split_ratio():
    assert SimCCCodec((256, 192), 2.0).bins == (384, 512)
    assert SimCCCodec((64, 48), 3.0).bins == (144, 192)


@pytest.mark.parametrize("k", [1.0, 2.0, 3.0])
def test_round_trip_error_below_one_bin(k):
    codec = SimCCCodec((64, 48), split_ratio=k, sigma=2.0)
    rng = np.random.default_rng(0)
    kp = np.stack([rng.uniform(0, 47, 200), rng.uniform(0, 63, 200)], 1).astype(np.float32)
    tx, ty, w = codec.encode(kp, np.full(200, 2))
    assert w.min() == 1.0
    # Targets are distributions: log of them is a logit vector whose argmax is the mode.
    coords, scores = codec.decode(torch.from_numpy(np.log(tx + 1e-12))[None],
                                  torch.from_numpy(np.log(ty + 1e-12))[None])
    err = (coords[0] - torch.from_numpy(kp)).abs()
    assert err.max().item() <= 0.5 / k + 1e-5 < 1.0 / k
    # score = min over the axes of max softmax(10 log t) = max t^10 / sum t^10 (float64 here)
    px, py = ((t.astype(np.float64) + 1e-12) ** 10 for t in (tx, ty))
    expected = np.minimum(px.max(-1) / px.sum(-1), py.max(-1) / py.sum(-1))
    np.testing.assert_allclose(scores[0].numpy(), expected, rtol=1e-5)   # fp32: measured 1.4e-6


def test_targets_sum_to_one_and_weights():
    codec = SimCCCodec((64, 48), 2.0, sigma=3.0)
    kp = np.array([[10.3, 20.7], [47.0, 63.0], [-1.0, 5.0], [20.0, 70.0], [5.0, 5.0]], np.float32)
    vis = np.array([2, 1, 2, 2, 0])
    tx, ty, w = codec.encode(kp, vis)
    assert tx.shape == (5, 96) and ty.shape == (5, 128) and tx.dtype == np.float32
    np.testing.assert_allclose(tx.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(ty.sum(-1), 1.0, rtol=1e-5)
    # v=1 (occluded but labelled) counts; x = W - 1 is inside; outside and v=0 do not.
    np.testing.assert_array_equal(w, [1, 1, 0, 0, 0])
    assert np.all(np.isfinite(tx)) and np.all(np.isfinite(ty))
    # The Gaussian's mode sits on bin round(x * k); hand value for the first joint.
    assert tx[0].argmax() == 21 and ty[0].argmax() == 41
    g = np.exp(-0.5 * ((np.arange(96) - 20.6) / 3.0) ** 2)
    np.testing.assert_allclose(tx[0], g / g.sum(), rtol=1e-5, atol=1e-12)


def test_per_axis_sigma_for_low_res():
    assert sigma_for_size(6.0, (64, 48), (256, 192)) == (1.5, 1.5)
    assert sigma_for_size(6.0, (64, 64), (256, 192)) == (2.0, 1.5)  # (sigma_x, sigma_y)


def test_decode_confidence_is_min_of_softmax_maxima():
    codec = SimCCCodec((8, 4), 2.0, softmax_scale=10.0)
    lx = torch.zeros(1, 1, 8)
    ly = torch.zeros(1, 1, 16)
    lx[0, 0, 3] = 1.0      # softmax(10 * lx): max = e^10 / (e^10 + 7)
    ly[0, 0, 11] = 0.5     # max = e^5 / (e^5 + 15), the smaller one
    coords, scores = codec.decode(lx, ly)
    assert coords.tolist() == [[[1.5, 5.5]]]
    assert scores.item() == pytest.approx(np.exp(5) / (np.exp(5) + 15), rel=1e-5)


def test_soft_argmax_on_peaked_logits():
    lx = torch.full((2, 3, 96), -50.0)
    ly = torch.full((2, 3, 128), -50.0)
    lx[..., 30] = 50.0
    ly[..., 100] = 50.0
    out = soft_argmax(lx, ly, scale=10.0)
    assert out.shape == (2, 3, 2)
    torch.testing.assert_close(out[..., 0], torch.full((2, 3), 30 / 96))
    torch.testing.assert_close(out[..., 1], torch.full((2, 3), 100 / 128))
    # Same scale as normalize_keypoints of the decoded pixel (x = 15, y = 50 at k = 2).
    codec = SimCCCodec((64, 48), 2.0)
    ref = codec.normalize_keypoints(torch.tensor([15.0, 50.0]))
    torch.testing.assert_close(codec.soft_argmax(lx, ly)[0, 0], ref)
    # Two equal peaks: the expectation is their midpoint; gradients flow.
    lx2 = torch.full((1, 1, 96), -50.0, requires_grad=False)
    lx2[..., 10] = lx2[..., 20] = 50.0
    lx2.requires_grad_(True)
    mid = soft_argmax(lx2, ly[:1, :1])
    assert mid[0, 0, 0].item() == pytest.approx(15 / 96, abs=1e-6)
    mid.sum().backward()
    # d E[x] / d z_j = beta p_j (j - E[bin]) / n: +-10 * 0.5 * 5 / 96 at the peaks, 0 elsewhere
    expected = torch.zeros(1, 1, 96)
    expected[..., 10], expected[..., 20] = -25 / 96, 25 / 96
    torch.testing.assert_close(lx2.grad, expected)
    # bf16 logits (autocast): the expectation is still taken in fp32.
    smooth = -((torch.arange(96.0) - 61.3) ** 2).view(1, 1, 96) / 200.0
    ref = soft_argmax(smooth, ly[:1, :1])[..., 0]
    low = soft_argmax(smooth.bfloat16(), ly[:1, :1].bfloat16())[..., 0]
    assert low.dtype == torch.float32 and abs(low.item() - ref.item()) * 96 < 0.1


def _centroid_model(images: torch.Tensor, codec: SimCCCodec, sigma_bins: float = 2.0):
    """A flip-equivariant stand-in model: one 'joint' per image channel at the channel's
    intensity centroid (sub-pixel), output as Gaussian logits around centroid * k."""
    b, c, h, w = images.shape
    wx, hy = codec.bins
    k = codec.split_ratio
    mass = images.sum((-1, -2)).clamp_min(1e-9)
    cx = (images.sum(-2) * torch.arange(w)).sum(-1) / mass
    cy = (images.sum(-1) * torch.arange(h)).sum(-1) / mass
    lx = -((torch.arange(wx) - cx[..., None] * k) ** 2) / (2 * sigma_bins**2) / codec.softmax_scale
    ly = -((torch.arange(hy) - cy[..., None] * k) ** 2) / (2 * sigma_bins**2) / codec.softmax_scale
    return lx.double(), ly.double()


@pytest.mark.parametrize("k", [1.0, 2.0, 3.0])
def test_flip_test_is_exact_for_an_equivariant_model(k):
    """Averaging the logits of the crop and of its mirror (undone by flip_logits) must give the
    same coordinates as the crop alone when the model commutes with the mirror."""
    codec = SimCCCodec((32, 24), split_ratio=k)
    gen = torch.Generator().manual_seed(0)
    # 4 'joints' = channels; blobs away from the right border (the last k-1 bins are padding).
    img = torch.zeros(2, 4, 32, 24, dtype=torch.float64)
    for j in range(4):
        x0, y0 = 2 + 4 * j, 3 + 5 * j
        img[:, j, y0:y0 + 4, x0:x0 + 3] = torch.rand(2, 4, 3, generator=gen, dtype=torch.float64)
    flip_index = [1, 0, 3, 2]      # channels 0<->1 and 2<->3 are a left/right pair
    lx, ly = _centroid_model(img, codec)
    mirrored = img.flip(-1)[:, flip_index]
    fx, fy = codec.flip_logits(*_centroid_model(mirrored, codec), flip_index)
    valid = codec.bins[0] - int(k - 1)   # the last k - 1 bins (x > W - 1) are edge padding
    torch.testing.assert_close(fx[..., :valid], lx[..., :valid])
    torch.testing.assert_close(fy, ly)
    avg = codec.soft_argmax((lx + fx) / 2, (ly + fy) / 2)
    torch.testing.assert_close(avg, codec.soft_argmax(lx, ly))
    c1, _ = codec.decode((lx + fx) / 2, (ly + fy) / 2)
    c0, _ = codec.decode(lx, ly)
    torch.testing.assert_close(c1, c0)


def test_plain_reversal_would_be_biased():
    """Why flip_logits shifts: reversing alone moves a peak by (k - 1) bins at k = 2."""
    codec = SimCCCodec((8, 6), 2.0)
    lx = torch.full((1, 17, 12), -9.0)
    ly = torch.zeros(1, 17, 16)
    lx[0, 9, 4] = 9.0                         # left wrist at x = 2 px in the mirrored crop
    fx, fy = flip_logits(lx, ly, COCO.flip_index(), split_ratio=2.0)
    assert fx[0, 10].argmax().item() == 6     # right wrist at x = 5 - 2 = 3 px = bin 6
    assert lx[0, 9].flip(-1).argmax().item() == 7   # plain reversal: 3.5 px
    assert fx[0, 10, -1].item() == lx[0, 9, 0].item()  # padding repeats the edge bin
    torch.testing.assert_close(fy, ly[:, COCO.flip_index()])
    assert codec.flip_logits(lx, ly, COCO.flip_index())[0].equal(fx)


def test_flip_fractional_source_interpolates():
    # W = 5, k = 1.5: Wx = 7, source position (W - 1) k - b = 6 - b is integral -> exact gather
    lx = torch.arange(7.0).view(1, 1, 7)
    fx, _ = flip_logits(lx, torch.zeros(1, 1, 4), [0], split_ratio=1.5, width=5)
    torch.testing.assert_close(fx, lx.flip(-1))
    # W = 4, k = 1.5: Wx = 6, source 4.5 - b -> midpoints of neighbours
    lx = torch.arange(6.0).view(1, 1, 6)
    fx, _ = flip_logits(lx, torch.zeros(1, 1, 4), [0], split_ratio=1.5, width=4)
    torch.testing.assert_close(fx[0, 0, :5], torch.tensor([4.5, 3.5, 2.5, 1.5, 0.5]))
