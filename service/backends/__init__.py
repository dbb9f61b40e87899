"""Inference backends: anything that maps images (B,C,H,W) float32 in [0,1] to logits (B, n_classes)."""
