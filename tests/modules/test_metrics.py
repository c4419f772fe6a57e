import math

import torch

from hedgehog.modules.feature_maps import get_feature_map
import pytest

from hedgehog.modules.metrics import attention_fidelity, kl_divergence, paired_bootstrap_ratio, row_entropy, spearman_rows


def test_entropy_uniform_and_one_hot():
    n = 8
    assert math.isclose(row_entropy(torch.full((n,), 1 / n)).item(), math.log(n), rel_tol=1e-6)
    assert row_entropy(torch.eye(n)).abs().max().item() == 0


def test_kl_by_hand():
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    assert math.isclose(kl_divergence(p, q).item(), math.log(2), rel_tol=1e-12)  # 2 * 0.5 * log(0.5/0.25)
    assert kl_divergence(p, p).item() == 0
    one_hot = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert math.isclose(kl_divergence(one_hot, q).item(), -math.log(0.25), rel_tol=1e-12)


def test_spearman_monotone_antitone_ties_and_mask():
    s = torch.randn(5, 20, dtype=torch.float64)
    torch.testing.assert_close(spearman_rows(s, torch.exp(s)), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(spearman_rows(s, -s ** 3), -torch.ones(5, dtype=torch.float64))
    # ties get average ranks: scipy.stats.spearmanr([1,2,3,4], [1,1,2,2]) = 0.894427...
    got = spearman_rows(torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 1, 2, 2]))
    assert math.isclose(got.item(), 2 / math.sqrt(5), rel_tol=1e-9)
    # masked entries are ignored; rows with < 2 valid entries are NaN
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    w = torch.tensor([[1.0, 2.0, 3.0, -100.0], [1.0, 2.0, 3.0, 4.0]])
    out = spearman_rows(torch.tensor([[1.0, 2, 3, 4], [1.0, 2, 3, 4]]), w, mask)
    assert math.isclose(out[0].item(), 1.0) and math.isnan(out[1].item())


def test_fidelity_of_exact_student_and_of_a_baseline():
    q, k = torch.randn(1, 2, 30, 4, dtype=torch.float64), torch.randn(1, 2, 30, 4, dtype=torch.float64)
    phi_q = torch.exp((q @ k.transpose(-1, -2)) * 0.5)
    phi_k = torch.eye(30, dtype=torch.float64).expand(1, 2, 30, 30)
    f = attention_fidelity(q, k, phi_q, phi_k)
    assert f["kl"].abs().max() < 1e-10
    torch.testing.assert_close(f["entropy_linear"], f["entropy_softmax"])
    torch.testing.assert_close(f["spearman_linear"], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(f["spearman_softmax"], torch.ones(2, dtype=torch.float64))
    fm = get_feature_map("elu", 4, 2).double()
    g = attention_fidelity(q * 3, k * 3, fm(q * 3), fm(k * 3))
    assert (g["kl"] > 0.01).all() and (g["entropy_linear"] > g["entropy_softmax"]).all()
    assert g["kl"].shape == (2,)


def test_paired_bootstrap_ratio():
    g = torch.Generator().manual_seed(0)
    a = 1.5 + 0.3 * torch.randn(400, generator=g, dtype=torch.float64)
    same = paired_bootstrap_ratio(a, a.clone())
    assert same["ratio"] == 1.0 and same["lo"] == 1.0 and same["hi"] == 1.0 and same["p_a_better"] == 0.0
    shifted = paired_bootstrap_ratio(a, a + 0.1)  # a is better on every window by 0.1 nats: exactly exp(-0.1)
    assert shifted["ratio"] == pytest.approx(math.exp(-0.1)) and shifted["hi"] == pytest.approx(math.exp(-0.1))
    assert shifted["p_a_better"] == 1.0
    # a small mean shift under per-window noise: the interval covers the true ratio and excludes 1
    noise = 0.02 * torch.randn(400, generator=g, dtype=torch.float64)
    r = paired_bootstrap_ratio(a, a + 0.01 + noise, block=8)
    assert r["lo"] < math.exp(-0.01) < r["hi"] < 1.0 and r["windows"] == 400
    # no difference in expectation: the interval straddles 1
    r = paired_bootstrap_ratio(a, a + noise, block=8)
    assert r["lo"] < 1.0 < r["hi"] and 0.0 < r["p_a_better"] < 1.0
    # block size matters when neighbours are correlated: wider intervals than i.i.d. resampling
    corr = torch.repeat_interleave(0.05 * torch.randn(25, generator=g, dtype=torch.float64), 16)
    wide, narrow = paired_bootstrap_ratio(a, a + corr, block=16), paired_bootstrap_ratio(a, a + corr, block=1)
    assert wide["hi"] - wide["lo"] > 1.5 * (narrow["hi"] - narrow["lo"])
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap_ratio(a, a[:-1])
    with pytest.raises(ValueError, match="diverged"):
        paired_bootstrap_ratio(a, torch.full_like(a, float("nan")))
