"""Mid-stage checkpoints, so an interrupted training stage continues where it stopped.

A stage saves its whole state every ``every`` steps and once at its end: the trainable tensors, the
optimizer state, the step and data position, the loss history, the RNG states and the caller's
``extra`` (the job's validation curve). Each save is atomic (temp file, fsync, rename), so a crash or a
SIGKILL mid-write leaves the previous checkpoint whole. The checkpoint records the settings it was
written with; resuming with different settings is refused with the differing settings named, because the
continued run would silently be a different run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from hedgehog.errors import CheckpointError
from hedgehog.utils.atomic import atomic_file


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_diff(saved: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    """``["stage2.tokens: checkpoint 2048, now 4096", ...]`` for every setting that differs."""
    a, b = flatten(saved), flatten(now)
    return [f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class StageCheckpoint:
    """The resumable state of one training stage, in one file.

    Args:
        path: the checkpoint file (``OUT/checkpoints/stage1.pt``).
        every: steps between saves (the stage also saves at its end).
        settings: what must match for a resume (JSON-like, nested dicts allowed).
        extra: the caller's state saved alongside; :meth:`load` restores it in place (lists and dicts keep
            their identity, so the caller's references see the restored values).
    """

    def __init__(self, path, every: int, settings: Dict[str, Any], extra: Optional[Dict[str, Any]] = None):
        self.path = Path(path)
        self.every = max(1, int(every))
        self.settings = settings
        self.extra = extra if extra is not None else {}

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def load(self) -> Optional[Dict[str, Any]]:
        """The saved state, or None when there is none; a corrupt file or other settings are refused."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            saved_settings = state["settings"]
        except Exception as e:  # truncated, corrupt or foreign file: say which and what to do
            raise CheckpointError(
                f"the checkpoint {self.path} cannot be read ({type(e).__name__}: {str(e)[:200]}). It is truncated "
                "or corrupt: delete it to redo that stage from its start, or run without --resume.") from e
        diff = settings_diff(saved_settings, self.settings)
        if diff:
            raise CheckpointError(
                f"cannot resume from {self.path}: it was written with other settings ({'; '.join(diff)}). Rerun "
                "with the checkpoint's settings, or without --resume (or with another --out) to start afresh.")
        for k, v in state.get("extra", {}).items():  # in place: the caller holds references to these
            if isinstance(self.extra.get(k), list):
                self.extra[k][:] = v
            elif isinstance(self.extra.get(k), dict):
                self.extra[k].clear()
                self.extra[k].update(v)
            else:
                self.extra[k] = v
        return state

    def save(self, state: Dict[str, Any]) -> None:
        full = {**state, "settings": self.settings, "extra": self.extra}
        atomic_file(self.path, lambda tmp: torch.save(full, tmp))


def training_state(params: Sequence[torch.Tensor], opt: torch.optim.Optimizer, **counters) -> Dict[str, Any]:
    """What a stage saves: copies of ``params`` (in order), the optimizer, the RNG and ``counters``."""
    return {"params": [p.detach().cpu().clone() for p in params], "optimizer": opt.state_dict(),
            "torch_rng": torch.get_rng_state(), **counters}


def restore_training_state(state: Dict[str, Any], params: Sequence[torch.Tensor], opt: torch.optim.Optimizer,
                           where: Path) -> None:
    """Put a saved stage back: ``params`` in place, the optimizer and the RNG."""
    restore_params(state, params, where)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])


def restore_params(state: Dict[str, Any], params: Sequence[torch.Tensor], where: Path) -> None:
    """Copy the saved tensors into ``params`` (in order, onto their device and dtype); a mismatch is refused."""
    saved = state["params"]
    shapes = [tuple(p.shape) for p in params]
    if [tuple(t.shape) for t in saved] != shapes:
        raise CheckpointError(f"the checkpoint {where} holds {len(saved)} tensors that do not match this model's "
                              f"{len(shapes)} trainable tensors; it belongs to another model or conversion. Delete it "
                              "or run without --resume.")
    with torch.no_grad():
        for p, t in zip(params, saved):
            p.copy_(t.to(p.device, p.dtype))
