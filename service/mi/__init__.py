"""Mixup Inference: parameters, detection rule and the batched engine (numpy + a backend, no torch)."""
