import pytest
import torch

from hedgehog.modules.feature_maps import get_feature_map
from hedgehog.modules.losses import attention_distillation_loss, attention_output_mse_loss
from hedgehog.modules.metrics import row_entropy
from hedgehog.ops.softmax import softmax_attention_weights


def exact_softmax_features(q, k, scale):
    """Features whose linear attention equals softmax attention exactly: phi(q_i) = exp(s_i.),
    phi(k_j) = e_j (one-hot), so phi(q_i).phi(k_j) = exp(s_ij)."""
    n = q.shape[2]
    phi_q = torch.exp((q @ k.transpose(-1, -2)) * scale)
    phi_k = torch.eye(n, dtype=q.dtype).expand(q.shape[0], q.shape[1], n, n)
    return phi_q, phi_k


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_loss_equals_teacher_entropy_when_student_is_exact(causal):
    q, k = torch.randn(2, 3, 17, 4, dtype=torch.float64), torch.randn(2, 3, 17, 4, dtype=torch.float64)
    scale = 0.5
    phi_q, phi_k = exact_softmax_features(q, k, scale)
    loss = attention_distillation_loss(q, k, phi_q, phi_k, causal=causal)
    p = softmax_attention_weights(q, k, causal=causal, scale=scale)
    torch.testing.assert_close(loss, row_entropy(p).mean(), rtol=1e-10, atol=1e-12)


def test_loss_exceeds_entropy_for_other_students_and_blocking_matches():
    q, k = torch.randn(1, 2, 40, 8, dtype=torch.float64), torch.randn(1, 2, 40, 8, dtype=torch.float64)
    fm = get_feature_map("elu", 8, 2).double()
    l_full = attention_distillation_loss(q, k, fm(q), fm(k), query_block=10_000)
    for blk in (1, 7, 16):
        torch.testing.assert_close(attention_distillation_loss(q, k, fm(q), fm(k), query_block=blk), l_full)
    ent = row_entropy(softmax_attention_weights(q, k)).mean()
    assert l_full > ent + 1e-3


def test_blocked_loss_gradients_match_unblocked():
    q, k = torch.randn(1, 2, 30, 4, dtype=torch.float64), torch.randn(1, 2, 30, 4, dtype=torch.float64)
    fq = get_feature_map("hedgehog", 4, 2).double()
    fk = get_feature_map("hedgehog", 4, 2).double()
    grads = []
    for blk in (30, 7):
        fq.zero_grad(), fk.zero_grad()
        attention_distillation_loss(q, k, fq(q), fk(k), query_block=blk).backward()
        grads.append((fq.weight.grad.clone(), fk.bias.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1])


def test_distillation_decreases_loss_and_kl():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 64, 8) * 2, torch.randn(1, 2, 64, 8) * 2
    fq, fk = get_feature_map("hedgehog", 8, 2), get_feature_map("hedgehog", 8, 2)
    opt = torch.optim.Adam(list(fq.parameters()) + list(fk.parameters()), lr=3e-2)
    losses = []
    for _ in range(40):
        loss = attention_distillation_loss(q, k, fq(q), fk(k))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_output_mse_zero_for_exact_student_and_positive_otherwise():
    q, k = torch.randn(1, 2, 12, 4, dtype=torch.float64), torch.randn(1, 2, 12, 4, dtype=torch.float64)
    v = torch.randn(1, 2, 12, 3, dtype=torch.float64)
    phi_q, phi_k = exact_softmax_features(q, k, 0.5)
    assert attention_output_mse_loss(q, k, v, phi_q, phi_k) < 1e-20
    fm = get_feature_map("relu", 4, 2).double()
    assert attention_output_mse_loss(q, k, v, fm(q), fm(k)) > 1e-4


def test_loss_shape_errors():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="equal shapes"):
        attention_distillation_loss(q, torch.randn(1, 1, 5, 4), q, q)
    with pytest.raises(ValueError, match="do not match"):
        attention_distillation_loss(q, q, torch.rand(1, 2, 6, 8), torch.rand(1, 2, 5, 8))


def test_query_subset_loss_equals_mean_of_those_rows():
    q, k = torch.randn(1, 2, 40, 8, dtype=torch.float64), torch.randn(1, 2, 40, 8, dtype=torch.float64)
    fm = get_feature_map("elu", 8, 2).double()
    idx = torch.tensor([3, 17, 0, 39, 25])
    sub = attention_distillation_loss(q, k, fm(q), fm(k), query_index=idx, query_block=2)
    # reference: per-row CE from the full row-by-row computation
    p = softmax_attention_weights(q, k)
    a = (fm(q) @ fm(k).transpose(-1, -2)).tril()
    w = a / a.sum(-1, keepdim=True)
    ce_rows = -(p * torch.log(w.clamp_min(1e-300))).sum(-1)  # (1, 2, 40)
    torch.testing.assert_close(sub, ce_rows[:, :, idx.sort().values].mean())
    # all rows as a subset == the plain loss
    torch.testing.assert_close(attention_distillation_loss(q, k, fm(q), fm(k), query_index=torch.arange(40)),
                               attention_distillation_loss(q, k, fm(q), fm(k)))


def _reference_ce(q, k, phi_q, phi_k, causal, rows):
    """The loss spelled out: masked student rows, normalised, cross-entropy against the teacher's rows."""
    n = q.shape[2]
    p = softmax_attention_weights(q, k, causal=causal)[:, :, rows]
    a = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        a = a * torch.ones(n, n, dtype=a.dtype).tril()
    w = (a / a.sum(-1, keepdim=True))[:, :, rows]
    w = torch.where(p > 0, w, torch.ones_like(w))  # log(0) on future keys would poison the gradient
    return -(p * w.log()).sum() / (q.shape[0] * q.shape[1] * len(rows))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("subset", [False, True], ids=["all-rows", "row-subset"])
def test_loss_and_gradients_match_spelled_out_reference(causal, subset):
    """Values and map gradients in float64 against the quadratic reference, for whole and blocked rows and
    a row subset (each row against exactly the keys at or before its own position)."""
    torch.manual_seed(3)
    q, k = torch.randn(2, 3, 23, 4, dtype=torch.float64), torch.randn(2, 3, 23, 4, dtype=torch.float64)
    fq = get_feature_map("hedgehog", 4, 3).double()
    fk = get_feature_map("hedgehog", 4, 3).double()
    with torch.no_grad():
        for f in (fq, fk):
            f.weight.add_(0.3 * torch.randn_like(f.weight))
            f.bias.add_(0.3 * torch.randn_like(f.bias))
    idx = torch.tensor([0, 4, 5, 11, 22]) if subset else None
    rows = idx if subset else torch.arange(23)
    ref = _reference_ce(q, k, fq(q), fk(k), causal, rows)
    ref_grads = torch.autograd.grad(ref, [fq.weight, fk.weight, fk.bias])
    for blk in (512, 5):
        got = attention_distillation_loss(q, k, fq(q), fk(k), causal=causal, query_block=blk, query_index=idx)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(got, [fq.weight, fk.weight, fk.bias])
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_teacher_log_kernel_backward_matches_autograd_including_the_clamped_side():
    """The hand-written backward of ``sum p log max(phi_q phi_k^T, eps)``: gradcheck in float64, and value and
    gradients equal to autograd on the spelled-out expression, with entries below eps (flat: zero gradient)."""
    from hedgehog.modules.losses import _TeacherLogKernel

    g = torch.Generator().manual_seed(0)
    pq = torch.rand(2, 3, 6, 4, dtype=torch.float64, generator=g)
    pk = torch.rand(2, 3, 9, 4, dtype=torch.float64, generator=g)
    pk[0, 0, :3] = 0.0  # a = 0 < eps on those keys; gradcheck's steps (1e-6) stay below eps = 1e-3
    p = torch.randn(2, 3, 6, 9, dtype=torch.float64, generator=g).softmax(-1)
    eps = 1e-3
    pq.requires_grad_(True)
    pk.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: _TeacherLogKernel.apply(a, b, p, eps), (pq, pk))
    out = _TeacherLogKernel.apply(pq, pk, p, eps)
    ref = torch.vdot(p.reshape(-1), (pq @ pk.transpose(-1, -2)).clamp_min(eps).log().reshape(-1))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(out, (pq, pk))
    want = torch.autograd.grad(ref, (pq, pk))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.all(got[1][0, 0, :3] == 0)  # keys whose every score sits on the flat side get no gradient


@pytest.mark.parametrize("hybrid", [False, True])
def test_stage1_loss_never_reads_a_device_value(hybrid):
    """Stage 1 computes this loss once per layer and step. On a GPU, every value read back from the device (an
    ``int()`` of a row position, an ``.item()``) stalls the launch queue; the row subsets live on the host, so the
    loss reads its bounds there. Meta tensors stand in for a device whose values cannot be read: any read raises."""
    from hedgehog.ops.settings import HybridSettings

    B, H, N, d, F = 1, 2, 64, 8, 16
    q, k = (torch.randn(B, H, N, d, device="meta") for _ in range(2))
    pq, pk = (torch.rand(B, H, N, F, device="meta", requires_grad=True) for _ in range(2))
    settings = HybridSettings(8, torch.full((H,), 0.5, device="meta"), sinks=2,
                              decay=torch.zeros(H, device="meta")) if hybrid else None
    for rows in (None, torch.randperm(N)[:16]):
        loss = attention_distillation_loss(q, k, pq, pk, query_index=rows, query_block=8, hybrid=settings)
        loss.backward()
        assert loss.device.type == "meta" and loss.shape == ()
