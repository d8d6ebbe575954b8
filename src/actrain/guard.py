"""Catastrophic-overfitting guard for fast adversarial training (issue 8).

Single-step training (FGSM-RS above all) can suddenly lose all robustness to multi-step attacks
within an epoch while FGSM accuracy keeps rising (Wong, Rice & Kolter 2020, section 5). Their
remedy is early stopping on PGD accuracy of a held-out batch; this is it: after each epoch G is
attacked by PGD-k on a fixed, class-balanced batch of the evaluation set with a fixed random
start, the best weights so far are kept in memory (and in the checkpoint, so resume stays
exact), and once the accuracy falls more than ``threshold`` points below its best the run stops
with the best weights restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from actrain.attacks import pgd_robustness
from actrain.data.sampling import balanced_subset_indices


class OverfitGuard:
    """Watches G's PGD accuracy on one batch; remembers the best weights of every model."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        eps: float,
        steps: int,
        threshold: float,
        size: int,
        seed: int,
    ) -> None:
        keep = balanced_subset_indices(y.cpu(), min(size, len(y)), seed=seed)
        keep = keep.to(y.device)
        self.x, self.y = x[keep], y[keep]
        self.eps = eps
        self.steps = steps
        self.step_size = 2.5 * eps / steps  # Madry's rule for PGD-k
        self.threshold = threshold
        self.seed = seed
        self.best_acc: float | None = None
        self.best_epoch = 0
        self.best_state: dict[str, dict[str, Tensor]] | None = None
        self.triggered: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return f"guard_pgd{self.steps}_acc_g"

    def robust_accuracy(
        self,
        g: nn.Module,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> float:
        """PGD-k accuracy (%) of ``g`` on the guard batch; the same start noise every epoch, so
        only the weights change the number. Uses its own generator: training's random stream
        is left alone."""
        gen = torch.Generator(device=self.x.device).manual_seed(self.seed)
        res = pgd_robustness(
            g,
            self.x,
            self.y,
            self.eps,
            self.step_size,
            self.steps,
            restarts=1,
            autocast=autocast,
            generator=gen,
        )
        return 100.0 * float(res.robust.float().mean())

    def check(
        self,
        epoch: int,
        models: dict[str, nn.Module],
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> dict[str, Any]:
        """Measure after ``epoch`` (1-based); on a collapse restore the best weights into
        ``models`` and set :attr:`triggered`. Returns the metrics for the epoch record."""
        acc = self.robust_accuracy(models["g"], autocast)
        out: dict[str, Any] = {self.key: acc}
        if self.best_acc is None or acc >= self.best_acc:
            self.best_acc, self.best_epoch = acc, epoch
            self.best_state = {
                r: {k: v.detach().clone() for k, v in m.state_dict().items()}
                for r, m in models.items()
            }
        elif self.best_acc - acc > self.threshold:
            self.triggered = {
                "epoch": epoch,
                "robust_acc": acc,
                "best_epoch": self.best_epoch,
                "best_robust_acc": self.best_acc,
            }
            self.restore(models)
            out["overfit_guard"] = "stopped"
        return out

    def restore(self, models: dict[str, nn.Module]) -> None:
        """Load the best weights (and batch-norm statistics) into ``models``."""
        if self.best_state is None:
            return
        with torch.no_grad():
            for r, m in models.items():
                m.load_state_dict(self.best_state[r])

    def message(self) -> str:
        t = self.triggered or {}
        return (
            f"actrain: overfitting guard: PGD-{self.steps} accuracy of G on {len(self.y)}"
            f" held-out images fell from {t.get('best_robust_acc', 0):.1f}% (epoch"
            f" {t.get('best_epoch')}) to {t.get('robust_acc', 0):.1f}% (epoch {t.get('epoch')}),"
            f" more than {self.threshold:g} points: catastrophic overfitting. Training stopped;"
            f" the epoch-{t.get('best_epoch')} weights are restored and kept as the final weights"
        )

    def summary(self) -> dict[str, Any]:
        """What final.json records."""
        out: dict[str, Any] = {
            "enabled": True,
            "triggered": self.triggered is not None,
            "threshold": self.threshold,
            "images": len(self.y),
            "pgd_steps": self.steps,
            "best_epoch": self.best_epoch,
            "best_robust_acc": self.best_acc,
        }
        if self.triggered:
            out["stopped_at_epoch"] = self.triggered["epoch"]
            out["robust_acc_at_stop"] = self.triggered["robust_acc"]
        return out

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "triggered": dict(self.triggered) if self.triggered else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_acc = state.get("best_acc")
        self.best_epoch = int(state.get("best_epoch", 0))
        self.best_state = state.get("best_state")
        self.triggered = state.get("triggered")
