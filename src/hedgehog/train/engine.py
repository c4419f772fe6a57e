"""The one training engine: every training loop (stage 1, stage 2, from scratch, MQAR, the encoder
fine-tune) runs its optimizer steps through :class:`Engine`, a thin layer on ``accelerate``'s
``Accelerator``.

What the engine owns, so the loops do not: the device, the process group (one process by default; under
``torchrun`` or ``accelerate launch`` one rank per process, DDP, or FSDP/DeepSpeed from an accelerate
config), mixed precision (``accelerate launch --mixed_precision bf16`` or ``mixed_precision=``), each
rank's share of a batch, gradient accumulation, the finite-loss check (agreed across ranks, so no rank
hangs in a collective when another stops), gradient clipping, the learning-rate schedule, metric
reduction across ranks, progress bars and checkpoint writes on the main process only.

Batches are *global*: ``batch_size`` is what one optimizer step sees over all processes, split evenly
across ranks, so N processes take the same steps on the same data as one and end at the same weights up
to rounding. A batch that does not split evenly is refused, naming the sizes that do.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from hedgehog.errors import TrainingDivergedError, UserError

log = logging.getLogger("hedgehog")

MIXED_PRECISION = ("no", "bf16", "fp16")
# --dtype: the weights of the model being converted (the teacher); feature maps and LoRA stay float32
# losses kept unread between steps; a caller that calls backward more often without a step gets them read (one sync)
# and only the first non-finite one kept, so they never pile up
PENDING = 256
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not one of {', '.join(DTYPES)} (fp32: full precision; bf16/fp16: the "
                        "model's weights in half precision, the feature maps and LoRA in float32).")
    return DTYPES[name]


def device_arg(name: str) -> torch.device:
    """:func:`resolve_device` for a ``--device`` flag: a device this machine lacks is a :class:`UserError`."""
    try:
        return resolve_device(name)
    except ValueError as e:
        raise UserError(str(e)) from None


def resolve_device(name: str) -> torch.device:
    """'auto' -> the first CUDA device if there is one, else the CPU; 'cpu', 'cuda', 'cuda:N' as torch reads them.

    A CUDA device on a machine without one (or an index past the last) is a ValueError that names the fix, raised
    before any data or model is loaded."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r} ({e}); use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: training runs on 'cpu' or 'cuda' ('auto' picks)")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device {name!r}: this PyTorch sees no CUDA device (torch {torch.__version__}); "
                             "use --device cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {name!r}: only {n} CUDA device(s) here (cuda:0 .. cuda:{n - 1})")
    return dev


def _launched() -> bool:
    """True under a multi-process launcher (torchrun, accelerate launch): its ranks own the device setup."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _fresh_state_unless_launched(dev: torch.device, mixed_precision: Optional[str]) -> None:
    """accelerate keeps one process-wide state (device, precision) from the first ``Accelerator`` on; a later one
    asking for another device silently gets the first one's (a CUDA run after a CPU run trains on the CPU), and
    another precision raises. In a single process nothing else depends on that state between our stages, so an
    engine asking for something else starts it afresh. Under a launcher the state is the launcher's: kept."""
    from accelerate.state import AcceleratorState, PartialState

    if _launched() or not PartialState._shared_state:
        return
    state = PartialState()
    same_device = state.device.type == dev.type and (dev.index is None or state.device.index == dev.index)
    acc = AcceleratorState._shared_state
    want = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    same_precision = not acc or acc.get("_mixed_precision") == want
    if not (same_device and same_precision):
        log.debug("accelerate state reset: it held %s/%s, this engine asks for %s/%s", state.device,
                  acc.get("_mixed_precision"), dev, mixed_precision)
        AcceleratorState._reset_state(reset_partial_state=True)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0.1 of the peak at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def cycle_batches(windows: torch.Tensor, batch_size: int, start: int = 0) -> Iterator[Tuple[int, torch.Tensor]]:
    """``(index, batch)`` forever: consecutive ``batch_size`` rows of ``windows`` from row ``start``, wrapping."""
    i = start
    while True:
        idx = [(i + j) % windows.shape[0] for j in range(batch_size)]
        yield i, windows[idx]
        i += batch_size


class Engine:
    """Devices, processes, precision and the optimizer step for one training stage.

    Args:
        device: 'auto', 'cpu', 'cuda' or 'cuda:N' (:func:`resolve_device`). Under a multi-process launcher each
            rank takes the device the launcher gives it (its local rank's GPU, or the CPU).
        mixed_precision: 'no', 'bf16' or 'fp16'; None reads the launcher's setting (``accelerate launch
            --mixed_precision``), else 'no'.
        progress: show progress bars (on the main process only).
    """

    def __init__(self, device: str = "auto", mixed_precision: Optional[str] = None, progress: bool = True):
        from accelerate import Accelerator

        if mixed_precision is not None and mixed_precision not in MIXED_PRECISION:
            raise UserError(f"mixed precision {mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}.")
        dev = resolve_device(device)
        if dev.type == "cuda" and dev.index is not None:
            torch.cuda.set_device(dev)
        from accelerate.utils import DistributedDataParallelKwargs

        # Unused parameters are normal here: the hybrid's feature maps get no gradient from a window no longer
        # than --window, and a frozen-map stage 2 leaves some trainable tensors idle on a step.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        _fresh_state_unless_launched(dev, mixed_precision)
        self.acc = Accelerator(cpu=dev.type == "cpu", mixed_precision=mixed_precision, kwargs_handlers=[ddp])
        self.device = self.acc.device if self.world > 1 or dev.index is None else dev
        if self.world == 1 and self.acc.device.type != dev.type:  # never train somewhere else than asked
            raise UserError(f"asked to train on {dev} but accelerate placed this process on {self.acc.device} "
                            "(its process-wide state was set up earlier for another device); start a new process, "
                            "or pass the same --device to every run in this one.")
        self.progress = progress and self.is_main
        # each loss since the last step, detached on the device: read in one sync at the step (see backward)
        self._pending: List[Tuple[str, torch.Tensor]] = []
        self._bad: Optional[Tuple[str, float]] = None  # the first non-finite loss among those read before the step

    # ---- processes ---------------------------------------------------------------------------------
    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def wait(self) -> None:
        """Barrier: every rank waits here for the others (no-op in one process)."""
        self.acc.wait_for_everyone()

    def check_batch(self, batch_size: int, what: str, accum: int = 1) -> None:
        """Refuse a global batch that does not split evenly over the ranks (and the accumulation steps)."""
        parts = self.world * max(1, accum)
        if batch_size % parts:
            ok = ", ".join(str(parts * i) for i in range(1, 4))
            raise UserError(f"{what} is {batch_size}, which does not split evenly over {self.world} process(es)"
                            + (f" x {accum} accumulation steps" if accum > 1 else "")
                            + f". The batch is global (one optimizer step over all processes), so pass a multiple "
                            f"of {parts} (e.g. {ok}), or run on fewer processes.")

    def local(self, batch: torch.Tensor, accum: int = 1) -> List[torch.Tensor]:
        """This rank's share of a global batch, on this rank's device, split into ``accum`` micro-batches."""
        mine = batch.chunk(self.world)[self.rank] if self.distributed else batch
        return [m.to(self.device) for m in mine.chunk(max(1, accum))]

    def mean(self, value: float) -> float:
        """``value`` averaged over the ranks (a metric: every rank gets the same number)."""
        return self.means([value])[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (so all ranks take the same branch)."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return self.acc.reduce(t, "sum").item() > 0

    def means(self, values: Sequence) -> List[float]:
        """Each of ``values`` (numbers, or 0-d tensors such as :meth:`backward` returns, read in one device sync)
        averaged over the ranks, in one collective."""
        if values and all(isinstance(v, torch.Tensor) for v in values):
            values = torch.stack([v.detach().reshape(()).double() for v in values]).tolist()
        if not self.distributed or not values:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], device=self.device)
        return self.acc.reduce(t, "mean").tolist()

    # ---- models and optimizers -----------------------------------------------------------------------
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """Model and optimizer for a full forward/backward loop: on the device, and under several processes
        wrapped as the accelerate config says (DDP by default, FSDP or DeepSpeed). Returns ``(model, opt)``;
        :meth:`unwrap` gives the plain model back for evaluation and saving."""
        if not self.distributed:
            return model.to(self.device), optimizer
        return self.acc.prepare(model, optimizer)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.acc.unwrap_model(model) if self.distributed else model

    def no_sync(self, model: nn.Module, last: bool):
        """Skip the gradient all-reduce on accumulation micro-batches before the last one."""
        return contextlib.nullcontext() if last or not self.distributed else self.acc.no_sync(model)

    def autocast(self):
        return self.acc.autocast()

    # ---- the step ------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, where: str, scale: float = 1.0) -> torch.Tensor:
        """Back-propagate ``loss * scale``; returns ``loss`` detached, as a 0-d float64 tensor on its device (sums
        of it stay there; :meth:`means` reads them in one sync). No device sync here: on a GPU stage 1 calls this
        once per layer and step, and reading each loss would stall the launch queue each time. A non-finite loss
        stops the next :meth:`step` on every rank, which checks every loss since the last step at once. (It is
        still propagated: under DDP the gradient all-reduce runs inside the backward, and a rank that skipped it
        would leave the others waiting.)"""
        value = loss.detach().reshape(()).double()
        self._pending.append((where, value))
        if len(self._pending) >= PENDING:  # many backward calls without a step: read them now, keep the first bad
            bad = self._first_bad_loss()  # (always read: it empties the list)
            self._bad = self._bad or bad
        self.acc.backward(loss * scale if scale != 1.0 else loss)
        return value

    def _first_bad_loss(self) -> Optional[Tuple[str, float]]:
        """``(where, value)`` of the first non-finite loss since the last step, or None (one device sync)."""
        pending, self._pending = self._pending, []
        if not pending:
            return None
        finite = torch.isfinite(torch.stack([v for _, v in pending]))
        if bool(finite.all()):
            return None
        i = int((~finite).nonzero()[0, 0])
        return pending[i][0], float(pending[i][1])

    def step(self, opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], *, lr: float,
             clip: Optional[float] = None, sync: bool = False) -> None:
        """One optimizer update after the :meth:`backward` calls of this step.

        ``sync``: average the gradients of ``params`` over the ranks here (for parameters outside a
        :meth:`prepare`-d model, e.g. stage 1's feature maps, trained from per-layer losses without a
        model forward). ``clip``: the gradient-norm bound. A non-finite loss on any rank stops every rank
        with :class:`~hedgehog.errors.TrainingDivergedError` before the update."""
        bad = self._first_bad_loss()
        bad, self._bad = self._bad or bad, None
        if self.distributed:
            flag = self.acc.reduce(torch.tensor([1.0 if bad else 0.0], device=self.device), "sum").item()
        else:
            flag = 1.0 if bad else 0.0
        if flag:
            where, value = bad or ("another process", float("nan"))
            opt.zero_grad(set_to_none=True)
            raise TrainingDivergedError(
                f"{where}: loss became {value} (not finite). Lower the learning rate (now {lr:g}) or check the "
                "inputs; the last good checkpoint is kept.")
        params = [p for p in params if p.grad is not None]
        if sync and self.distributed:
            for p in params:
                p.grad = self.acc.reduce(p.grad, "mean")
        if clip:
            self.acc.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    @staticmethod
    def set_lr(opt: torch.optim.Optimizer, base_lr: float, step: int, total: int, warmup: int) -> None:
        for g in opt.param_groups:
            g["lr"] = base_lr * lr_factor(step, total, warmup)

    # ---- output --------------------------------------------------------------------------------------
    def bar(self, **kw):
        from tqdm.auto import tqdm

        return tqdm(disable=not self.progress, **kw)

    def on_main(self, write) -> None:
        """Call ``write()`` on the main process only (a checkpoint, a file); every rank continues once it is done."""
        if self.is_main:
            write()
        self.wait()
