"""GNDPO (Globally Normalized Distillation Policy Optimization) for Hugging Face TRL."""

from .config import GNDPOConfig
from .evaluation import ReverseKLCallback, heldout_reverse_kl
from .trainer import GNDPOTrainer

__version__ = "0.1.0"
__all__ = ["GNDPOConfig", "GNDPOTrainer", "ReverseKLCallback", "heldout_reverse_kl", "__version__"]
