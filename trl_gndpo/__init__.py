"""GNDPO (Globally Normalized Distillation Policy Optimization) for Hugging Face TRL."""

from .config import GNDPOConfig
from .trainer import GNDPOTrainer

__version__ = "0.1.0"
__all__ = ["GNDPOConfig", "GNDPOTrainer", "__version__"]
