"""hedgehog.ops.masks against the rule written out position by position."""
import torch

from hedgehog.ops.masks import causal_drop_mask, causal_mask, hybrid_masks, row_positions, window_drop_mask


def _rule(rows, nk, window=None):
    vis = torch.zeros(len(rows), nk, dtype=torch.bool)
    win = torch.zeros_like(vis)
    for r, n in enumerate(rows):
        for i in range(nk):
            vis[r, i] = i <= n
            win[r, i] = window is not None and n - window < i <= n
    return vis, win


def test_causal_masks_for_every_row_convention():
    nq, nk = 3, 7
    for kw, rows in (({}, [4, 5, 6]), ({"q_offset": 0}, [0, 1, 2]), ({"q_offset": 2}, [2, 3, 4]),
                     ({"q_positions": torch.tensor([6, 1, 3])}, [6, 1, 3])):
        assert row_positions(nq, nk, "cpu", **kw).tolist() == rows
        vis, _ = _rule(rows, nk)
        assert torch.equal(causal_mask(nq, nk, "cpu", **kw), vis)
        assert torch.equal(causal_drop_mask(nq, nk, "cpu", **kw), ~vis)


def test_window_and_hybrid_masks_split_the_visible_keys():
    nq, nk, w = 5, 9, 3
    pos = torch.tensor([8, 0, 2, 3, 5])
    vis, win = _rule(pos.tolist(), nk, window=w)
    in_window, older = hybrid_masks(nq, nk, w, "cpu", q_positions=pos)
    assert torch.equal(in_window, win)
    assert torch.equal(older, vis & ~win)
    assert torch.equal(window_drop_mask(nq, nk, w, "cpu", q_positions=pos), older)
    default_in, default_old = hybrid_masks(nq, nk, w, "cpu")  # the last nq rows
    v2, w2 = _rule(list(range(nk - nq, nk)), nk, window=w)
    assert torch.equal(default_in, w2) and torch.equal(default_old, v2 & ~w2)


def test_linear_key_age_counts_the_steps_since_a_key_left_the_window():
    from hedgehog.ops.masks import linear_key_age

    rows = torch.tensor([0, 5, 9, 12])
    age = linear_key_age(rows, 10, window=3)
    for r, n in enumerate(rows.tolist()):
        for i in range(10):
            assert age[r, i].item() == max(0, n - 3 - i)
