"""mixinfer: an adversarial-aware model server built on Mixup Inference (Pang, Xu, Zhu, ICLR 2020)."""

__version__ = "0.1.0"
