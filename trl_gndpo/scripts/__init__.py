"""Scripts that `trl-gndpo` hands to `accelerate launch` (as `trl grpo` hands trl/scripts/grpo.py)."""
