"""SAPE (CDKD Sec. III-A, Eqs. 1-4): shapes, SAU weights, the equal-weight ensemble."""
from __future__ import annotations

import pytest
import torch

from kdray.nn.sape import SAPE, parse_kernel_mix

from .conftest import assert_gradients_match_finite_differences

# Tiny sizes: student 4x3 feature upsampled to a teacher 8x6 grid.
B, CS, CT, HS, WS, HT, WT = 2, 4, 6, 4, 3, 8, 6
TABLE_VII_MIXES = ["1-1-1-0", "2-1-1-0", "3-1-1-0", "1-2-1-0", "1-1-2-0", "1-1-1-1"]


def test_parse_kernel_mix():
    assert parse_kernel_mix("1-1-2-0") == (1, 1, 2, 0)
    assert parse_kernel_mix((3, 1, 1, 0)) == (3, 1, 1, 0)
    for bad in ("1-1-2", "0-0-0-0", "1-x-1-1", "1--1-1-1"):
        with pytest.raises(ValueError):
            parse_kernel_mix(bad)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_projector_counts_shapes_and_weights(n):
    torch.manual_seed(0)
    sape = SAPE(CS, CT, (HT, WT), num_projectors=n, kernel_mix="1-1-2-0", min_dim=4)
    res = sape(torch.randn(B, CS, HS, WS))
    assert res["out"].shape == (B, CT, HT, WT)
    assert res["weights"].shape == (B, n, CT)
    assert len(res["projections"]) == n
    assert all(p.shape == (B, CT, HT, WT) for p in res["projections"])
    # softmax across projectors: for every sample and channel the N weights sum to 1
    torch.testing.assert_close(res["weights"].sum(dim=1), torch.ones(B, CT))
    assert bool((res["weights"] > 0).all())


@pytest.mark.parametrize("mix", TABLE_VII_MIXES)
def test_table_vii_kernel_mixes(mix):
    torch.manual_seed(0)
    sape = SAPE(CS, CT, (HT, WT), num_projectors=3, kernel_mix=mix, min_dim=4)
    assert len(sape.sau.branches) == sum(parse_kernel_mix(mix))
    res = sape(torch.randn(B, CS, HS, WS))
    assert res["out"].shape == (B, CT, HT, WT)
    torch.testing.assert_close(res["weights"].sum(dim=1), torch.ones(B, CT))


def test_eq4_output_is_weighted_sum_of_projections():
    torch.manual_seed(0)
    sape = SAPE(CS, CT, (HT, WT), num_projectors=3, min_dim=4)
    res = sape(torch.randn(B, CS, HS, WS))
    w, fk = res["weights"], res["projections"]
    expected = sum(w[:, k, :, None, None] * fk[k] for k in range(3))
    torch.testing.assert_close(res["out"], expected)


def test_plain_ensemble_without_sau_is_the_mean():
    torch.manual_seed(0)
    sape = SAPE(CS, CT, (HT, WT), num_projectors=3, use_sau=False)
    assert sape.sau is None
    res = sape(torch.randn(B, CS, HS, WS))
    torch.testing.assert_close(res["weights"], torch.full((B, 3, CT), 1 / 3))
    torch.testing.assert_close(res["out"], torch.stack(res["projections"]).mean(dim=0))


def test_gradients_reach_projectors_and_sau():
    torch.manual_seed(0)
    sape = SAPE(CS, CT, (HT, WT), num_projectors=2, kernel_mix="1-0-0-1", min_dim=4)
    sape.double()
    x = torch.randn(B, CS, HS, WS, dtype=torch.float64, requires_grad=True)
    assert_gradients_match_finite_differences(lambda: sape(x)["out"].square().mean(),
                                              {"input": x, **dict(sape.named_parameters())})
