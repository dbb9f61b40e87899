"""Robustness evaluation (torch): differentiable MI over the served bundle, attacks, checks, reports."""
