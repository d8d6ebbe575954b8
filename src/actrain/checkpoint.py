"""Run-folder files: atomic checkpoints, safetensors weights and ``load_model``.

Weights are stored as safetensors with the model's spec in the file's metadata, so a weights
file alone is enough to rebuild the network and nothing in it can execute code. Resume
checkpoints hold only tensors and plain values and are read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from actrain.models import create_model

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
#: The files a training run writes into its folder.
RUN_FILES = (
    CONFIG,
    METRICS,
    CHECKPOINT,
    "final.json",
    "model_g.safetensors",
    "model_f.safetensors",
)


from actrain.errors import CheckpointError  # noqa: E402  (re-exported)


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # after the write: mkstemp's 0600 (which safetensors' writer keeps) would hide
        # results from other users
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    _atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _torch_file(path):
            raise CheckpointError(_NOT_OURS.format(path=path)) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-tensor checkpoint ({first[:120]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        if not _torch_file(path):
            raise CheckpointError(_NOT_OURS.format(path=path)) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: truncated or corrupt ({first[:160]})"
        ) from None


_NOT_OURS = (
    "{path} is not a checkpoint or weights file written by actrain"
    " (expected a run folder, its checkpoint.pt or a model_*.safetensors file)"
)


def _torch_file(path: Path) -> bool:
    """Whether ``path`` starts like a ``torch.save`` file (a zip archive, or a legacy
    pickle), so that a broken one is told apart from a file of another kind."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return True  # unreadable: the error message of the load says why
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def save_weights(path: Path, model: nn.Module, metadata: dict[str, Any] | None = None) -> None:
    """Safetensors weights with the spec needed by :func:`load_model` in the header."""
    if not isinstance(getattr(model, "spec", None), dict):
        raise TypeError(
            f"save_weights: {type(model).__name__} has no .spec (the recipe load_model rebuilds"
            " it from): build the model with actrain.models.create_model"
        )
    extra = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    meta = {"spec": json.dumps(model.spec), **extra}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=meta))


def read_weights_metadata(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read weights {path}: not a safetensors file, or truncated ({first[:160]})"
        ) from None
    try:
        return {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError:
        raise CheckpointError(
            f"{path}: its metadata is not actrain's (not written by actrain)"
        ) from None


# final.json's status once a finished run was resumed and checkpointed past its final weights
SUPERSEDED = "resumed (the checkpoint is newer than the final weights)"


def _weights_path(path: Path, role: str) -> Path:
    """A run folder's final weights, or its checkpoint while the run is going (or was resumed
    past its final weights)."""
    if path.is_dir():
        candidate = path / f"model_{role}.safetensors"
        checkpoint = path / CHECKPOINT
        if candidate.is_file() and not (checkpoint.is_file() and _superseded(path)):
            return candidate
        return checkpoint
    return path


def _superseded(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "final.json").read_text()).get("status") == SUPERSEDED
    except (OSError, ValueError):
        return False


def load_model(
    path: str | Path, role: str | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild a trained model (eval mode, logits for inputs in [0, 1]).

    ``path`` is a run folder (its final ``model_{role}.safetensors``, or the latest checkpoint
    while the run is still going) or a ``.safetensors`` file written by actrain. ``role``: "g"
    (the default) or "f"; a weights file is the model it holds, and a ``role`` it contradicts
    is an error.
    """
    path = Path(path)
    if role not in (None, "g", "f"):
        raise ValueError(f"role: 'g' (the robust model) or 'f' (ACT's natural one), got {role!r}")
    if not path.exists():
        raise CheckpointError(f"no such run folder or weights file: {path}")
    if path.is_file() and path.suffix == ".safetensors":
        own = read_weights_metadata(path).get("role")
        if role is not None and own in ("g", "f") and own != role:
            raise CheckpointError(f"{path} holds model {own.upper()}, not {role.upper()}")
    role = role or "g"
    wpath = _weights_path(path, role)
    if wpath.suffix == ".safetensors":
        meta = read_weights_metadata(wpath)
        if "spec" not in meta:
            raise CheckpointError(
                f"{wpath} has no model spec in its metadata (not written by actrain)"
            )
        model = create_model(**meta["spec"])
        state = load_file(str(wpath))
    else:
        ckpt = load_checkpoint(wpath)
        if role not in ckpt.get("models", {}):
            held = ", ".join(sorted(str(k).upper() for k in ckpt.get("models", {})))
            raise CheckpointError(
                f"{wpath} holds no model {role.upper()} (it holds {held or 'no model'})"
            )
        model = create_model(**json.loads(ckpt["specs"])[role])
        state = ckpt["models"][role]
    _load_state(model, state, wpath)
    model.meta = read_weights_metadata(wpath) if wpath.suffix == ".safetensors" else {}
    return model.to(device).eval()


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if shapes:
            k = shapes[0]
            parts.append(
                f"shape of {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            )
        raise CheckpointError(f"{where} does not match the architecture: {'; '.join(parts)}")
    model.load_state_dict(state)


def run_config(path: str | Path) -> dict[str, Any]:
    """The training config stored with a run folder or weights file ({} if none)."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG).is_file():
        return json.loads((path / CONFIG).read_text())
    if path.is_file() and path.suffix == ".safetensors":
        return read_weights_metadata(path).get("config", {})
    return {}
