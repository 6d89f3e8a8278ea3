"""kdray: knowledge distillation for top-down SimCC pose estimators (TSD, CDKD) on Ray."""
__version__ = "0.1.0"
