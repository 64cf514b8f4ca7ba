"""The hand-written FID and KID (any feature space) equal torchmetrics' on random features."""
import pytest
import torch
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import poly_mmd

from rslib.eval.metrics import fid_from_features, kid_from_features


def _features(seed: int, n: int, d: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * (1 + shift) + shift


@pytest.mark.parametrize("n_real, n_fake, d", [(40, 30, 8), (64, 64, 32)])
def test_fid_equals_torchmetrics(n_real, n_fake, d):
    real, fake = _features(0, n_real, d), _features(1, n_fake, d, shift=0.3)
    expected = _compute_fid(real.mean(0), torch.cov(real.T), fake.mean(0), torch.cov(fake.T))
    assert fid_from_features(real, fake) == pytest.approx(float(expected), rel=1e-9)
    assert fid_from_features(real, real) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("degree, coef", [(3, 1.0), (2, 0.5)])
def test_kid_equals_torchmetrics_on_the_whole_sets(degree, coef):
    real, fake = _features(2, 50, 16), _features(3, 50, 16, shift=0.2)
    mean, std = kid_from_features(real, fake, subsets=3, subset_size=50, degree=degree, coef=coef)
    # a subset as large as both sets holds every feature: each draw is torchmetrics' MMD of the whole sets
    assert mean == pytest.approx(float(poly_mmd(real, fake, degree=degree, coef=coef)), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_subsets_are_torchmetrics_mmd_of_the_same_draws():
    real, fake = _features(4, 60, 8), _features(5, 45, 8, shift=0.5)
    g = torch.Generator().manual_seed(7)
    draws = [float(poly_mmd(real[torch.randperm(60, generator=g)[:20]], fake[torch.randperm(45, generator=g)[:20]]))
             for _ in range(5)]
    mean, std = kid_from_features(real, fake, subsets=5, subset_size=20, seed=7)
    assert mean == pytest.approx(sum(draws) / 5, rel=1e-9)
    assert std == pytest.approx(float(torch.tensor(draws).std(unbiased=False)), rel=1e-6)
