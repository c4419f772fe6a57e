"""The training engine: global batches split over ranks and micro-batches, the agreed finite-loss stop,
gradient accumulation and checkpointing that do not change the result, and a real two-process conversion
(gloo on this CPU) that matches the one-process run and resumes after a kill."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hedgehog.errors import TrainingDivergedError, UserError
from hedgehog.train.engine import Engine, lr_factor, parse_dtype, resolve_device

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")


def test_one_process_engine_is_the_plain_loop():
    e = Engine("cpu", progress=False)
    assert (e.world, e.rank, e.is_main, e.distributed) == (1, 0, True, False)
    b = torch.arange(12).view(4, 3)
    assert torch.equal(torch.cat(e.local(b, accum=2)), b) and len(e.local(b, accum=2)) == 2
    assert e.mean(2.5) == 2.5 and e.means([1, 2]) == [1.0, 2.0] and e.any(True) and not e.any(False)


def test_each_engine_gets_the_device_and_precision_it_asks_for_in_one_process():
    """accelerate keeps one process-wide state: without a fresh one per request, a CUDA run after a CPU run trained
    on the CPU (seen on an H200) and a precision change raised. Here: precision changes in any order, and a state
    left on another device by an earlier run (as a CUDA run leaves it; stood in for on this CPU machine) is not
    inherited."""
    from accelerate.state import PartialState

    assert Engine("cpu", mixed_precision="bf16", progress=False).acc.mixed_precision == "bf16"
    e = Engine("cpu", progress=False)
    assert e.acc.mixed_precision == "no" and e.device.type == "cpu"
    PartialState._shared_state["device"] = torch.device("meta")  # an earlier run's device, not the CPU
    e = Engine("cpu", progress=False)
    assert e.device.type == "cpu" and e.acc.device.type == "cpu" and PartialState().device.type == "cpu"
    w = torch.nn.Parameter(torch.ones(2))
    model, opt = e.prepare(torch.nn.Linear(2, 1), torch.optim.SGD([w], lr=0.1))
    assert next(model.parameters()).device.type == "cpu"


def test_a_batch_that_does_not_split_is_refused_with_the_sizes_that_do():
    e = Engine("cpu", progress=False)
    e.check_batch(4, "the batch", accum=2)
    with pytest.raises(UserError, match=r"multiple of 3 \(e.g. 3, 6, 9\)"):
        e.check_batch(4, "the batch", accum=3)


def test_non_finite_loss_stops_before_the_update():
    e = Engine("cpu", progress=False)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    e.backward((w * float("nan")).sum(), "step 7")
    with pytest.raises(TrainingDivergedError, match="step 7: loss became nan"):
        e.step(opt, [w], lr=0.1)
    assert torch.equal(w.detach(), torch.ones(3)) and w.grad is None
    e.backward((w * 2).sum(), "step 8")  # the engine is usable again: the flag was for that step only
    e.step(opt, [w], lr=0.1, clip=1.0)
    assert torch.allclose(w.detach(), torch.ones(3) - 0.1 * 2 / 12 ** 0.5, atol=1e-6)


def test_losses_are_read_once_per_step_not_per_backward(monkeypatch):
    """backward() never reads a loss back (on a GPU each read stalls the launch queue; stage 1 calls it once per
    layer and step); the step reads every loss since the last in one go and names the first non-finite one; means()
    reads a list of such values at once, with the numbers Python floats would give."""
    e = Engine("cpu", progress=False)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    reads = []

    def no_read(self, *a):
        reads.append(1)
        raise AssertionError("a loss was read back during backward")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", no_read)
        m.setattr(torch.Tensor, "__float__", no_read)
        got = [e.backward((w * c).sum() / 3, f"layer {i}") for i, c in enumerate((0.1, 0.7, float("inf"), 2.0))]
    assert not reads and all(isinstance(g, torch.Tensor) and g.dtype == torch.float64 for g in got)
    with pytest.raises(TrainingDivergedError, match="layer 2: loss became inf"):
        e.step(opt, [w], lr=0.1)
    vals = [torch.tensor(0.1, dtype=torch.float32) * 3, torch.tensor(2 / 3, dtype=torch.float32)]
    per = [0.0, 0.0]
    for i, v in enumerate(vals):
        per[i] += e.backward((w * 0).sum() + v, "x") / 4
    assert e.means(per) == [float(v) / 4 for v in vals]  # float64 sums of the float32 losses, as before
    e.step(opt, [w], lr=0.1)


def test_losses_of_many_backward_calls_without_a_step_do_not_pile_up(monkeypatch):
    """A caller that calls backward many times before a step (or never steps) holds at most PENDING unread losses;
    the step still names the first non-finite one, even when it was read long before."""
    import hedgehog.train.engine as eng

    monkeypatch.setattr(eng, "PENDING", 8)
    e = Engine("cpu", progress=False)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    held = []
    for i in range(50):
        e.backward((w * (float("nan") if i in (3, 30) else 1.0)).sum(), f"call {i}")
        held.append(len(e._pending))
    assert max(held) < 8 and held[-1] == 50 % 8
    with pytest.raises(TrainingDivergedError, match="call 3: loss became nan"):
        e.step(opt, [w], lr=0.1)
    for i in range(20):  # all finite: the steps go through, nothing is left over from before
        e.backward((w * 1.0).sum(), f"again {i}")
    e.step(opt, [w], lr=0.1)
    assert not e._pending and e._bad is None


def test_schedule_and_names():
    assert lr_factor(0, 10, 2) == 0.5 and lr_factor(1, 10, 2) == 1.0
    assert lr_factor(10, 10, 2) == pytest.approx(0.1)
    assert parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(UserError, match="fp32, bf16, fp16"):
        parse_dtype("half")
    with pytest.raises(ValueError, match="--device cpu"):
        resolve_device("cuda:7") if not torch.cuda.is_available() else (_ for _ in ()).throw(ValueError("--device cpu"))


def _tiny_converted(tiny_assets):
    from transformers import AutoModelForCausalLM

    from hedgehog.layers.attention import HedgehogConfig
    from hedgehog.models.convert import convert_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"], dtype=torch.float32)
    convert_model(model, HedgehogConfig(attention="hybrid", window=4))
    return model


@pytest.mark.parametrize("loss", ["kd", "ce"])
def test_accumulation_and_checkpointing_leave_stage_2_unchanged(tiny_assets, loss):
    """Two micro-batches of 2 (and recomputed layers) take the same steps as one batch of 4."""
    from hedgehog.train.stage2 import Stage2Config, add_lora, lora_finetune

    windows = torch.randint(2, 12, (8, 16), generator=torch.Generator().manual_seed(1))
    finals = []
    for accum, ckpt in ((1, False), (2, False), (2, True)):
        cfg = Stage2Config(tokens=4 * 16 * 3, batch_size=4, grad_accum=accum, gradient_checkpointing=ckpt,
                           loss=loss, lr=1e-2)
        pm = add_lora(_tiny_converted(tiny_assets), cfg)
        rep = lora_finetune(pm, windows, cfg, progress=False)
        assert rep["steps"] == 3
        finals.append(([p.detach().clone() for p in pm.parameters() if p.requires_grad],
                       [h["loss"] for h in rep["history"]]))
    ref_p, ref_l = finals[0]
    for params, losses in finals[1:]:
        assert losses == pytest.approx(ref_l, rel=1e-4, abs=1e-7)
        for a, b in zip(ref_p, params):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_weights_convert_with_float32_maps(tiny_assets, tmp_path):
    """--dtype bf16: the teacher's weights in bf16, the maps and LoRA in fp32; the saved model reloads in bf16
    with its maps still fp32 and the same logits."""
    from hedgehog.cli import main
    from hedgehog.models.loading import load

    out = tmp_path / "bf16"
    assert main(["convert", "--model", tiny_assets["model"], "--data", tiny_assets["data"], "--eval-data",
                 tiny_assets["heldout"], "--out", str(out), "--seq-len", "32", "--stage1-tokens", "128",
                 "--stage2-tokens", "128", "--eval-tokens", "128", "--fidelity-tokens", "128", "--dtype", "bf16",
                 "--device", "cpu", "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["settings"]["dtype"] == "bf16" and rep["device"] == "cpu"
    assert all(torch.isfinite(torch.tensor(v)) for v in (rep["student_ppl"], rep["teacher_ppl"]))
    assert rep["reload_max_abs_logit_diff"] < 1e-2
    model, _ = load(out / "model", dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "feature_map" in n} == {torch.float32}
    assert dtypes["model.embed_tokens.weight"] == torch.bfloat16


# ---- two processes ---------------------------------------------------------------------------------

ARGS = ["--seq-len", "32", "--window", "8", "--stage1-tokens", "256", "--stage1-batch", "2", "--stage1-checkpoint-every", "1",
        "--stage2-tokens", "512", "--stage2-batch", "2", "--stage2-checkpoint-every", "2", "--eval-tokens", "128",
        "--fidelity-tokens", "128", "--device", "cpu", "--no-progress"]


def _argv(tiny_assets, out, *extra):
    return ["convert", "--model", tiny_assets["model"], "--data", tiny_assets["data"], "--eval-data",
            tiny_assets["heldout"], "--out", str(out), *ARGS, *extra]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tiny_assets, out, *extra, kill_after_stage2_steps=None, timeout=400, launcher="torchrun"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HEDGEHOG_KILL_AFTER": str(kill_after_stage2_steps or 0)}
    script = str(Path(__file__).with_name("engine_launch.py"))
    if launcher == "accelerate":  # on a CPU: --multi_gpu starts the processes (its --cpu starts only one)
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), script]
    else:
        cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(_free_port()), script]
    cmd += _argv(tiny_assets, out, *extra)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def one_process(tiny_assets, tmp_path_factory):
    from hedgehog.cli import main

    out = tmp_path_factory.mktemp("one") / "run"
    assert main(_argv(tiny_assets, out)) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_match_one(tiny_assets, tmp_path, one_process, launcher):
    if (TORCHRUN if launcher == "torchrun" else ACCELERATE) is None:
        pytest.skip(f"{launcher} not installed")
    t = time.perf_counter()
    proc = _launch(tiny_assets, tmp_path / "two", launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["processes"] == 2 and one_process["processes"] == 1
    assert two["stage1"]["steps"] == one_process["stage1"]["steps"]
    assert two["stage2"]["steps"] == one_process["stage2"]["steps"] == 8
    # the same steps on the same data: equal up to the order of floating-point sums
    assert two["stage1"]["loss_curve"][-1][1] == pytest.approx(one_process["stage1"]["loss_curve"][-1][1], rel=1e-3)
    assert two["student_ppl_stage1"] == pytest.approx(one_process["student_ppl_stage1"], rel=1e-4)
    assert two["student_ppl"] == pytest.approx(one_process["student_ppl"], rel=1e-3)
    assert two["teacher_ppl"] == pytest.approx(one_process["teacher_ppl"], rel=1e-6)
    # the weights themselves: every trained tensor (maps, merged LoRA) as in the one-process run
    from safetensors.torch import load_file

    w1 = load_file(str(Path(one_process["model_dir"]) / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert w1.keys() == w2.keys() and any("feature_map" in k for k in w1)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=2e-5, msg=k)
    print(f"two-process tiny conversion ({launcher}): {time.perf_counter() - t:.0f} s")


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_two_processes_resume_after_a_kill(tiny_assets, tmp_path, one_process):
    out = tmp_path / "killed"
    proc = _launch(tiny_assets, out, kill_after_stage2_steps=5)
    assert proc.returncode != 0 and not (out / "report.json").exists(), proc.stderr[-3000:]
    state = torch.load(out / "checkpoints" / "stage2.pt", weights_only=True)
    assert state["step"] == 4  # saved every 2 steps; steps 5+ were lost with the kill
    proc = _launch(tiny_assets, out, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "report.json").read_text())
    assert res["stage1"]["resumed"] and res["stage2"]["resumed"] and res["stage2"]["steps"] == 8
    assert res["student_ppl"] == pytest.approx(one_process["student_ppl"], rel=1e-3)


def test_layer_blocks_train_the_same_maps_with_partial_forwards(tiny_assets, monkeypatch):
    """Block-wise stage 1 (one layer per teacher forward) ends at the maps of the all-layers run, and each
    forward stops after its block: the last layer never runs for the first block."""
    from hedgehog.layers.attention import hedgehog_layers
    from hedgehog.train.stage1 import Stage1Config, attention_transfer, feature_map_parameters, memory_plan

    windows = torch.randint(2, 12, (8, 16), generator=torch.Generator().manual_seed(3))
    results = []
    for block in (0, 1):
        model = _tiny_converted(tiny_assets)
        last = hedgehog_layers(model)[-1]
        calls = []
        last.register_forward_hook(lambda *_: calls.append(1))
        rep = attention_transfer(model, windows, Stage1Config(tokens=4 * 16 * 2, batch_size=4, layer_block=block),
                                 progress=False)
        assert rep["steps"] == 2 * 4 and rep["memory_plan"]["forwards_per_batch"] == (1 if block == 0 else 2)
        assert len(calls) == 2  # 2 batches: one forward reaches the last layer per batch either way
        results.append([p.detach().clone() for p in feature_map_parameters(model)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any((a - torch.eye(a.shape[-1])).abs().max() > 1e-3 for a in results[0] if a.dim() == 3)  # trained
    plan = memory_plan(_tiny_converted(tiny_assets), 4, 16, 1)
    assert plan["captures_per_forward_gb"] * 2 == pytest.approx(plan["captures_all_layers_gb"])


@pytest.mark.gpu
def test_a_cuda_conversion_after_a_cpu_one_stays_on_cuda():
    """Both stages on CUDA after a CPU run in the same process (a notebook's order): every attention input and
    every trained parameter is on the GPU, none on the CPU."""
    from hedgehog.layers.attention import hedgehog_layers
    from hedgehog.models.convert import convert_model
    from hedgehog.train.stage1 import Stage1Config, attention_transfer
    from hedgehog.train.stage2 import Stage2Config, add_lora, lora_finetune
    from conftest import V, tiny

    ids = torch.randint(0, V, (2, 16))
    attention_transfer(convert_model(tiny("llama").eval()), ids, Stage1Config(tokens=32, batch_size=2),
                       engine=Engine("cpu", progress=False), progress=False)
    model = convert_model(tiny("llama").eval())
    devices = set()
    for layer in hedgehog_layers(model):
        layer.register_forward_pre_hook(
            lambda m, a, kw: devices.add((a[0] if a else kw["hidden_states"]).device.type), with_kwargs=True)
    engine = Engine("cuda", progress=False)
    assert engine.device.type == "cuda"
    model.to(engine.device)
    attention_transfer(model, ids, Stage1Config(tokens=32, batch_size=2), engine=engine, progress=False)
    pm = add_lora(model, Stage2Config(lora_r=4))
    lora_finetune(pm, ids, Stage2Config(tokens=32, batch_size=1), engine=Engine("cuda", progress=False),
                  progress=False)
    assert devices == {"cuda"}
    assert {p.device.type for p in pm.parameters()} == {"cuda"}
