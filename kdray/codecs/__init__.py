"""Coordinate codecs: SimCC (kdray.codecs.simcc)."""
from kdray.codecs.simcc import SimCCCodec, flip_logits, sigma_for_size, soft_argmax

__all__ = ["SimCCCodec", "flip_logits", "sigma_for_size", "soft_argmax"]
