"""actrain: Adversarial Concurrent Training (ACT) and its baselines in PyTorch."""

from actrain.checkpoint import load_model
from actrain.models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["__version__", "create_model", "list_models", "load_model"]
