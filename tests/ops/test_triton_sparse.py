"""The sparse cache's schedule as a Triton kernel (hedgehog.ops.triton_sparse), run by Triton's CPU interpreter:
a call whose schedule runs on the kernel gives what the PyTorch schedule gives (the same cached keys in the same
slots, the same state, outputs within fp32 rounding) and what the float64 path gives, for every score, with a
decay or none, sinks, padding, GQA, odd feature sizes, a state carried across calls and decoding after it. Triton
reads TRITON_INTERPRET when a kernel is defined, so each check runs in a fresh interpreter; speed needs a GPU."""
import pytest

from conftest import run_interpreted

pytest.importorskip("triton")

PRELUDE = """
import os
import torch
from hedgehog.ops import sparse_cache as sc
from hedgehog.ops import triton_sparse as ts
assert ts.serves(torch.zeros(1)), "the interpreter should be on"
_kernels = (ts._schedule, ts._attend, ts._schedule_tiled)
calls = []
_schedule = ts.schedule
TILED = False  # a test sets it to run the tiled schedule (_schedule_tiled) in place of _schedule
def counted(*a, **kw):
    calls.append(kw.get("states", True))  # whether the kernel was asked for every segment's state
    out = _schedule(*a, **{**kw, "tiled": kw.get("tiled") or TILED})
    assert (out[0] is None) == (not calls[-1])
    return out
ts.schedule = counted
attends = []  # calls of the attention kernel
_attend = ts.attend
def counted_attend(*a, **kw):
    attends.append(1)
    return _attend(*a, **kw)
ts.attend = counted_attend

def torch_path(*a, **kw):
    os.environ["HEDGEHOG_SPARSE_KERNEL"] = "0"
    try:
        return sc.sparse_hybrid_attention(*a, **kw)
    finally:
        del os.environ["HEDGEHOG_SPARSE_KERNEL"]

def inputs(B, Hq, Hk, n, d, F, D, seed=0, dup=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, Hq, n, d, generator=g), torch.randn(B, Hk, n, d, generator=g)
    v = torch.randn(B, Hk, n, D, generator=g)
    if dup:  # every dup-th value repeats the one dup positions earlier (a filler token)
        v[:, :, dup::dup] = v[:, :, :-dup:dup][:, :, :v[:, :, dup::dup].shape[2]]
    pq, pk = torch.rand(B, Hq, n, F, generator=g), torch.rand(B, Hk, n, F, generator=g)
    return q, k, v, pq, pk

def same_state(a, b, tol=1e-4):
    assert torch.equal(a.cache_pos[a.cache_ok], b.cache_pos[b.cache_ok]), (a.cache_pos, b.cache_pos)
    assert torch.equal(a.cache_ok, b.cache_ok)
    assert torch.equal(a.cache_k[a.cache_ok], b.cache_k[b.cache_ok])
    assert (a.S.double() - b.S.double()).abs().max() <= tol * b.S.abs().max(), "state S"
    assert (a.z.double() - b.z.double()).abs().max() <= tol * b.z.abs().max(), "state z"
    assert (a.seen, a.boundary) == (b.seen, b.boundary)

def close(y, ref, tol):
    err = ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    assert err <= tol, err
    return err
"""


def run(code: str) -> str:
    return run_interpreted(PRELUDE, code)


# tiled: the schedule with its state in global scratch, a tile at a time (what a GPU that cannot launch the
# register-resident one runs: head dim 128 on an A100; and every GPU past head dim 128), with the cases' F and D
# over one tile or several; and the attention kernel's blocks of 16 keys and features (head dim 256)
@pytest.mark.parametrize("tiled", [False, True])
def test_kernel_schedule_equals_the_torch_schedule_and_float64(tiled):
    out = run(f"    TILED = {tiled}\n    ts.WIDE_FROM = {16 if tiled else 256}\n" + """
    cases = [  # B, Hq, Hk, n, d, F, D, window, cache, chunk, sinks, decay, score
        (2, 4, 2, 150, 8, 16, 8, 8, 5, 4, 2, True, "unique"),
        (2, 4, 2, 150, 8, 16, 8, 8, 5, 4, 2, True, "memory"),
        (2, 4, 2, 150, 8, 16, 8, 8, 5, 4, 2, True, "state"),
        # chunk = window, odd F and D (F over two of the attention kernel's feature blocks), no decay
        (1, 3, 1, 131, 16, 75, 20, 16, 20, 16, 0, False, "unique"),
        (1, 2, 2, 97, 8, 32, 8, 4, 11, 8, 4, True, "unique"),  # chunk > window
        # F and D over several of the tiled schedule's tiles (TILE = 16 below) for the other scores
        (1, 2, 1, 90, 8, 40, 24, 8, 6, 4, 1, True, "memory"),
        (1, 2, 1, 90, 8, 40, 24, 8, 6, 4, 1, True, "state"),
    ]
    ts.TILE = 16  # the tiled schedule's tiles: F = 75 spans 5, D = 20 two
    for B, Hq, Hk, n, d, F, D, w, lam, chunk, sinks, dec, score in cases:
        q, k, v, pq, pk = inputs(B, Hq, Hk, n, d, F, D, seed=n)
        decay = torch.log(torch.linspace(0.95, 0.995, Hk)) if dec else None
        kv = torch.ones(B, n, dtype=torch.bool)
        kv[-1, :5] = False  # left padding in the last row
        kw = dict(window=w, cache_size=lam, chunk=chunk, sinks=sinks, decay=decay, key_valid=kv, score=score,
                  gamma=torch.linspace(0.2, 0.8, Hq))
        calls.clear()
        attends.clear()
        y, st = sc.sparse_hybrid_attention(q, k, v, pq, pk, **kw)
        assert len(calls) == 1 and len(attends) == 1, "the kernels should have run"
        y0, st0 = torch_path(q, k, v, pq, pk, **kw)
        assert len(attends) == 1
        y64, _ = torch_path(*(t.double() for t in (q, k, v, pq, pk)), **kw)
        same_state(st, st0)
        print(score, close(y, y0, 1e-5), close(y, y64, 1e-5))
    """)
    assert len(out.splitlines()) == 7


@pytest.mark.parametrize("tiled", [False, True])
def test_kernel_schedule_carries_its_state_across_calls_and_into_decoding(tiled):
    run(f"    TILED = {tiled}\n" + """
    B, Hq, Hk, n, d, F, D = 2, 4, 2, 120, 8, 24, 20
    ts.TILE = 16  # the tiled schedule's state over 2 x 2 tiles
    q, k, v, pq, pk = inputs(B, Hq, Hk, n, d, F, D, seed=1)
    kw = dict(window=8, cache_size=6, chunk=4, sinks=2, decay=torch.log(torch.tensor([0.97, 0.99])), gamma=0.5)
    full, _ = torch_path(q, k, v, pq, pk, **kw)
    st, st0, ys, ys0 = None, None, [], []
    for a, b in [(0, 37), (37, 90), (90, 91), (91, 92), (92, 120)]:  # uneven calls, two single tokens
        sl = lambda t: t[:, :, a:b]
        calls.clear()
        attends.clear()
        y, st = sc.sparse_hybrid_attention(*(sl(t) for t in (q, k, v, pq, pk)), state=st, **kw)
        assert len(calls) == (b - a > 1) and len(attends) == 1  # a single token: no schedule, the attention kernel
        y0, st0 = torch_path(*(sl(t) for t in (q, k, v, pq, pk)), state=st0, **kw)
        same_state(st, st0)
        ys.append(y)
        ys0.append(y0)
    close(torch.cat(ys, 2), full, 1e-5)
    close(torch.cat(ys0, 2), full, 1e-5)
    sc.PREFILL_PIECE = 16  # a prefill without autograd in pieces of 16 tokens: both kernels once per piece
    calls.clear()
    attends.clear()
    with torch.no_grad():
        y, _ = sc.sparse_hybrid_attention(q, k, v, pq, pk, **kw)
    assert len(calls) == len(attends) == 8
    close(y, full, 1e-5)
    """)


def test_attention_kernel_reads_the_cache_by_index_and_bf16_inputs_in_their_own_dtype():
    """On a GPU q, k and v are bf16: the kernel reads them, and each segment's cache through its indices into the
    call's table of candidate keys, with no fp32 or per-segment copy, and computes in fp32 what the PyTorch
    attention computes from the same bf16 values."""
    run("""
    B, Hq, Hk, n, d, F, D = 2, 4, 2, 100, 8, 40, 8  # F: two feature blocks, the second partial
    q, k, v, pq, pk = inputs(B, Hq, Hk, n, d, F, D, seed=3)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    kw = dict(window=8, cache_size=6, chunk=4, sinks=2, decay=torch.log(torch.tensor([0.97, 0.99])), gamma=0.5)
    seen, outs = [], []
    def kernel(q_, phi_q, S, z, tab_k, tab_v, entry, *rest, **kwa):
        seen.append((q_.dtype, tab_k.dtype, tab_k.shape, entry.shape, S.shape[2]))
        outs.append(_attend(q_, phi_q, S, z, tab_k, tab_v, entry, *rest, **kwa))
        return outs[-1]
    ts.attend = kernel
    torch_attend = sc._attend
    def reference(*a, **kwa):
        outs.append(torch_attend(*a, **kwa))
        return outs[-1]
    sc._attend = reference
    y, st = sc.sparse_hybrid_attention(q, k, v, pq, pk, **kw)
    y0, st0 = torch_path(q, k, v, pq, pk, **kw)
    same_state(st, st0)
    M = seen[0][-1]  # segments
    assert M > n // 4 - 2 and seen == [(torch.bfloat16, torch.bfloat16, (B, Hk, 6 + n, d), (B, Hk, M, 6), M)], seen
    assert y.dtype == torch.bfloat16 and len(outs) == 3 and outs[0].dtype == outs[2].dtype == torch.float32
    print(close(outs[0], outs[2], 1e-5))
    """)


def test_kernel_schedule_breaks_ties_by_pool_order():
    # A filler repeats its value: "unique" scores each older copy 0 (COPY_TOL), so equal scores decide slots. Both
    # the kernel and the PyTorch schedule (a stable sort, not torch.topk, whose pick among ties is its own and
    # differs between CPU and CUDA) take the earlier pool entry: they must agree slot by slot and output by output.
    # A pool of 40 + 4 spans two of the kernel's blocks of 32 entries (ties and copies across blocks).
    out = run("""
    assert ts.PB == 32
    B, Hq, Hk, n, d, F, D = 2, 2, 1, 160, 8, 16, 8
    q, k, v, pq, pk = inputs(B, Hq, Hk, n, d, F, D, seed=2, dup=4)
    kw = dict(window=8, cache_size=40, chunk=4, sinks=1, decay=torch.log(torch.tensor([0.98])), gamma=0.5)
    y, st = sc.sparse_hybrid_attention(q, k, v, pq, pk, **kw)
    y0, st0 = torch_path(q, k, v, pq, pk, **kw)
    same_state(st, st0)
    assert torch.equal(st.cache_pos, st0.cache_pos)
    print(close(y, y0, 1e-5))
    """)
    assert float(out) <= 1e-5


def test_training_through_the_kernel_schedule_has_the_torch_gradients():
    # Under autograd the kernel chooses and the states are folded again differentiably (_fold_states): the
    # gradients to q, k, v, both features and the decay equal the PyTorch schedule's, and the float64 path's.
    out = run("""
    B, Hq, Hk, n, d, F, D = 2, 4, 2, 100, 8, 40, 8  # F: two feature blocks, the second partial
    q, k, v, pq, pk = inputs(B, Hq, Hk, n, d, F, D, seed=3)
    decay = torch.log(torch.tensor([0.97, 0.99]))
    kv = torch.ones(B, n, dtype=torch.bool)
    kv[0, :3] = False
    g = torch.randn(B, Hq, n, D, generator=torch.Generator().manual_seed(9))

    def grads(fn, dtype, st=None):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, pq, pk, decay)]
        y, st = fn(*leaves[:5], window=8, cache_size=5, chunk=4, sinks=2, decay=leaves[5], key_valid=kv, gamma=0.5)
        ((y * g.to(dtype)).sum() + st.S.sum() + st.z.sum()).backward()
        return [t.grad for t in leaves]

    calls.clear()
    got = grads(sc.sparse_hybrid_attention, torch.float32)
    assert calls == [False]  # the kernel only chose; the states were folded in PyTorch
    ref32 = grads(torch_path, torch.float32)
    ref64 = grads(torch_path, torch.float64)
    assert len(calls) == 1
    errs = [close(a, b, 1e-4) for a, b in zip(got, ref64)]
    errs32 = [close(a, b, 1e-4) for a, b in zip(ref32, ref64)]
    print(max(errs), max(errs32))
    """)
    got, ref = map(float, out.split())
    assert got <= 1e-4 and ref <= 1e-4


def test_float64_and_single_tokens_take_the_torch_schedule():
    run("""
    q, k, v, pq, pk = inputs(1, 2, 1, 64, 8, 16, 8)
    kw = dict(window=8, cache_size=4, chunk=4, gamma=0.5)
    calls.clear()
    sc.sparse_hybrid_attention(*(t.double() for t in (q, k, v, pq, pk)), **kw)
    _, st = sc.sparse_hybrid_attention(q[:, :, :63], k[:, :, :63], v[:, :, :63], pq[:, :, :63], pk[:, :, :63], **kw)
    assert len(calls) == 1, calls
    sc.sparse_hybrid_attention(q[:, :, 63:], k[:, :, 63:], v[:, :, 63:], pq[:, :, 63:], pk[:, :, 63:], state=st, **kw)
    assert len(calls) == 1, calls
    """)


@pytest.mark.gpu
@pytest.mark.parametrize("tiled, heads", [(False, (9, 3, 64)), (True, (9, 3, 64)), (True, (4, 2, 128)),
                                          (True, (4, 2, 256))])
def test_kernel_schedule_on_cuda_matches_the_torch_schedule(tiled, heads, monkeypatch):
    """The compiled kernel on a GPU at the default model's shapes (SmolLM2: 9 query and 3 KV heads, d 64, F 128;
    window 64, cache 128, chunk 32, 4 sinks, 2,048 tokens), forward without autograd and with its gradients; and
    the tiled schedule (what an A100 runs at head dim 128, and every GPU at 256) there and at head dims 128 and 256.
    Both
    schedules score in full fp32 (the kernel's dots are IEEE, not TF32; PyTorch's CUDA matmuls leave TF32 off by
    default), so on random inputs, where no two scores are within rounding of each other, they keep the same keys;
    outputs agree to fp32 rounding accumulated over 64 boundaries (1e-4 relative, against O(1) for a wrong key)."""
    import torch

    from hedgehog.ops import sparse_cache as sc
    from hedgehog.ops import triton_sparse as ts

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    schedule = ts.schedule
    monkeypatch.setattr(ts, "schedule", lambda *a, **kw: schedule(*a, **{**kw, "tiled": tiled}))
    g = torch.Generator(device="cuda").manual_seed(0)
    (Hq, Hk, d), B, n = heads, 2, 2048
    F = 2 * d
    q = torch.randn(B, Hq, n, d, device="cuda", generator=g)
    k, v = (torch.randn(B, Hk, n, d, device="cuda", generator=g) for _ in range(2))
    pq = torch.rand(B, Hq, n, F, device="cuda", generator=g).softmax(-1)
    pk = torch.rand(B, Hk, n, F, device="cuda", generator=g).softmax(-1)
    decay = torch.log(torch.linspace(0.98, 0.995, Hk, device="cuda"))
    kw = dict(window=64, cache_size=128, chunk=32, sinks=4, gamma=0.5)
    assert ts.serves(q)

    def path(kernel, grad):
        import os
        os.environ["HEDGEHOG_SPARSE_KERNEL"] = "1" if kernel else "0"
        try:
            leaves = [t.clone().requires_grad_(grad) for t in (q, k, v, pq, pk, decay)]
            with torch.set_grad_enabled(grad):
                y, st = sc.sparse_hybrid_attention(*leaves[:5], decay=leaves[5], **kw)
            if grad:
                y.pow(2).sum().backward()
            return y, st, [t.grad for t in leaves] if grad else None
        finally:
            del os.environ["HEDGEHOG_SPARSE_KERNEL"]

    rel = lambda a, b: ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
    for grad in (False, True):
        y, st, gr = path(True, grad)
        y0, st0, gr0 = path(False, grad)
        assert torch.equal(st.cache_pos[st.cache_ok], st0.cache_pos[st0.cache_ok])
        assert rel(y, y0) < 1e-4 and rel(st.S, st0.S) < 1e-4
        if grad:
            assert max(rel(a, b) for a, b in zip(gr, gr0)) < 1e-4


def test_the_converted_model_on_the_gpu_kernels_equals_the_torch_path():
    """The default job's model (hybrid, window 64, 4 sinks, decayed state, sparse cache 128 re-chosen every 32
    tokens) on the kernels a GPU takes: left-padded prefill logits in fp32 and bf16, decoding token by token after
    a prefill, greedy ``generate`` and the gradients of a stage-2 step equal the PyTorch path's. 300 tokens, so
    keys leave the window, fill the cache and fold into the state."""
    out = run("""
    import copy
    from transformers import LlamaConfig, LlamaForCausalLM
    from hedgehog.jobs.config import ConvertJob, hedgehog_config
    from hedgehog.layers.attention import hedgehog_layers
    from hedgehog.layers.generation import HedgehogCache, cache_kwargs
    from hedgehog.models.convert import convert_model

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024))
    job = ConvertJob()
    convert_model(m, hedgehog_config(job))
    cfg = hedgehog_layers(m)[0].hh_config
    assert (cfg.sparse_cache, cfg.sparse_chunk, cfg.window, cfg.sinks) == (128, 32, 64, 4)
    with torch.no_grad():
        for lay in hedgehog_layers(m):
            for p in list(lay.feature_map_q.parameters()) + list(lay.feature_map_k.parameters()):
                p.add_(0.3 * torch.randn_like(p))
    m.eval()
    n = 300
    ids = torch.randint(0, 97, (2, n))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0

    def on_torch(fn):
        os.environ["HEDGEHOG_SPARSE_KERNEL"] = "0"
        try:
            return fn()
        finally:
            del os.environ["HEDGEHOG_SPARSE_KERNEL"]

    with torch.no_grad():
        calls.clear(), attends.clear()
        y = m(ids, attention_mask=mask).logits
        assert len(calls) == len(attends) == 2, (calls, attends)  # both kernels, once per layer
        y0 = on_torch(lambda: m(ids, attention_mask=mask).logits)
        assert len(attends) == 2
        e_prefill = close(y, y0, 1e-4)
        cache, p = HedgehogCache(m), 250
        outs = [m(ids[:, :p], attention_mask=mask[:, :p], **cache_kwargs(m, cache), use_cache=True).logits]
        for t in range(p, n):
            outs.append(m(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], **cache_kwargs(m, cache),
                          use_cache=True).logits)
        assert len(attends) == 2 + 2 * (1 + n - p)  # every decoding step on the attention kernel
        e_decode = close(torch.cat(outs, 1), y0, 1e-4)
        gen = lambda: m.generate(input_ids=ids[:, :280], attention_mask=mask[:, :280], max_new_tokens=6,
                                 do_sample=False, pad_token_id=0)
        assert torch.equal(gen(), on_torch(gen))
        mb = copy.deepcopy(m).to(torch.bfloat16)
        yb = mb(ids, attention_mask=mask).logits
        yb0 = on_torch(lambda: mb(ids, attention_mask=mask).logits)
        assert yb.dtype == torch.bfloat16
        e_bf16 = close(yb.float(), yb0.float(), 2e-2)  # both from the same bf16 q/k/v; outputs rounded to bf16

    def grads():
        m.zero_grad()
        m(ids, attention_mask=mask, labels=ids).loss.backward()
        return [p.grad.clone() for p in m.parameters() if p.grad is not None]

    calls.clear()
    got = grads()
    assert calls == [False, False]  # under autograd the kernel only chose
    ref = on_torch(grads)
    # the kernel path folds the states in one matmul (_fold_states), whose sums associate differently, and two
    # layers compound it: 6.7e-5 of each gradient's largest entry measured here; a wrong formula is O(1)
    e_grad = max(close(a, b, 5e-4) for a, b in zip(got, ref))
    print(e_prefill, e_decode, e_bf16, e_grad)
    """)
    assert len(out.split()) == 4


@pytest.mark.gpu
def test_the_converted_model_on_cuda_equals_its_cpu_run_with_repeated_tokens():
    """The same converted model (the default job's attention; a 97-token vocabulary, so many first-layer values are
    exact copies) on CUDA, through the compiled kernels, and on the CPU, through the PyTorch schedule: the same keys
    chosen (COPY_TOL and the pool-order tie rule), so the logits agree to fp32 rounding of the two devices' matmuls
    (1e-4 relative to the largest logit; a different choice among copies moved them by ~4e-2 under the
    interpreter). Greedy generation gives the same tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hedgehog.jobs.config import ConvertJob, hedgehog_config
    from hedgehog.layers.attention import hedgehog_layers
    from hedgehog.models.convert import convert_model

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=192, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=4096))
    convert_model(m, hedgehog_config(ConvertJob()))
    with torch.no_grad():
        for lay in hedgehog_layers(m):
            for p in list(lay.feature_map_q.parameters()) + list(lay.feature_map_k.parameters()):
                p.add_(0.3 * torch.randn_like(p))
    m.eval()
    ids = torch.randint(0, 97, (2, 1024))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        cpu = m(ids, attention_mask=mask).logits
        gen_cpu = m.generate(input_ids=ids[:, :900], attention_mask=mask[:, :900], max_new_tokens=8, do_sample=False,
                             pad_token_id=0)
        m.cuda()
        gpu = m(ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
        gen_gpu = m.generate(input_ids=ids[:, :900].cuda(), attention_mask=mask[:, :900].cuda(), max_new_tokens=8,
                             do_sample=False, pad_token_id=0).cpu()
    err = ((gpu.double() - cpu.double()).abs().max() / cpu.double().abs().max()).item()
    assert err < 1e-4, err
    assert torch.equal(gen_gpu, gen_cpu)


def test_a_gpu_that_cannot_launch_a_kernel_gets_the_pytorch_path_and_one_warning():
    # At head dim 128 the schedule kernel needs ~188 KB of shared memory, over an A100's 163 KB
    # (test_triton_compile.py): Triton then raises OutOfResources at launch. Stand-ins raise it, with Triton's own
    # class and arguments, for every kernel: the calls must give the PyTorch path's results exactly, warn once per
    # kernel and not try the kernel again.
    out = run("""
    import warnings
    from triton.runtime.errors import OutOfResources
    tried = []
    class Refused:
        def __init__(self, name):
            self.name = name
        def __getitem__(self, grid):
            def launch(*a, **kw):
                tried.append(self.name)
                raise OutOfResources(327680, 232448, "shared memory")
            return launch
    ts._schedule, ts._schedule_tiled, ts._attend = Refused("schedule"), Refused("tiled"), Refused("attention")
    q, k, v, pq, pk = inputs(1, 2, 1, 100, 8, 16, 8)
    kw = dict(window=8, cache_size=12, chunk=4, sinks=1, decay=torch.log(torch.tensor([0.98])))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1, st1 = sc.sparse_hybrid_attention(q, k, v, pq, pk, **kw)
        y2, st2 = sc.sparse_hybrid_attention(q[:, :, :60], k[:, :, :60], v[:, :, :60], pq[:, :, :60], pk[:, :, :60], **kw)
    y0, st0 = torch_path(q, k, v, pq, pk, **kw)
    assert torch.equal(y1, y0) and torch.equal(st1.S, st0.S) and torch.equal(st1.cache_pos, st0.cache_pos)
    msgs = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
    # each kernel tried once (the attention kernel reads the PyTorch schedule's states as well), one warning each
    assert tried == ["schedule", "tiled", "attention"], tried
    assert len(msgs) == 3 and "schedule kernel cannot run" in msgs[0] and "327680" in msgs[0], msgs
    assert "the tiled schedule kernel serves" in msgs[0] and "the PyTorch path serves" in msgs[1], msgs
    # the register schedule alone refused (an A100 at head dim 128): the tiled one serves, without another try
    sc._CANNOT_LAUNCH.clear()
    tried.clear()
    calls.clear()
    ts._schedule_tiled, ts._attend = _kernels[2], _kernels[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y4, st4 = sc.sparse_hybrid_attention(q, k, v, pq, pk, **kw)
        y5, _ = sc.sparse_hybrid_attention(q, k, v, pq, pk, **kw)
    msgs = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
    assert tried == ["schedule"] and len(msgs) == 1 and "tiled schedule kernel serves" in msgs[0], (tried, msgs)
    assert len(calls) == 3 and torch.equal(y4, y5) and torch.equal(st4.cache_pos, st0.cache_pos)
    print(close(y4, y0, 1e-5))
    # the attention kernel alone refused (a schedule that launches)
    sc._CANNOT_LAUNCH.clear()
    tried.clear()
    ts._schedule, ts._attend = _kernels[0], Refused("attention")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y3, _ = sc.sparse_hybrid_attention(q, k, v, pq, pk, **kw)
        sc.sparse_hybrid_attention(q, k, v, pq, pk, **kw)
    msgs = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
    assert tried == ["attention"] and len(msgs) == 1 and "attention kernel" in msgs[0], (tried, msgs)
    print(close(y3, y0, 1e-5))
    """)
    assert all(float(x) <= 1e-5 for x in out.split()), out


def test_states_past_head_dim_128_go_to_the_tiled_schedule_without_trying_the_register_one():
    # At head dim 256 (Gemma-2/3: F x D = 512 x 256) the schedule with its state in registers needs 630 KB of shared
    # memory, over every GPU's limit, and compiles for one to two minutes before the launch is refused
    # (test_triton_compile.py): the op goes to the tiled schedule at once. A stand-in refuses the register one.
    out = run("""
    import warnings
    from triton.runtime.errors import OutOfResources
    assert ts.in_registers(128, 64) and ts.in_registers(256, 128) and not ts.in_registers(512, 256)
    tried = []
    class Refused:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                tried.append("schedule")
                raise OutOfResources(630784, 232448, "shared memory")
            return launch
    ts._schedule = Refused()
    ts.REGISTER_STATE = 16 * 16  # these small shapes (F x D = 32 x 16) stand for head dim 256
    q, k, v, pq, pk = inputs(1, 2, 1, 100, 8, 32, 16)
    kw = dict(window=8, cache_size=12, chunk=4, sinks=1, decay=torch.log(torch.tensor([0.98])))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, st = sc.sparse_hybrid_attention(q, k, v, pq, pk, **kw)
    assert tried == [] and calls == [True], (tried, calls)
    assert not [c for c in caught if issubclass(c.category, RuntimeWarning)]
    y0, st0 = torch_path(q, k, v, pq, pk, **kw)
    same_state(st, st0)
    print(close(y, y0, 1e-5))
    """)
    assert float(out) <= 1e-5
