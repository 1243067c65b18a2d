"""gnp: gradient-norm penalty, SAM, ASAM and plain training on CIFAR; the methods are in gnp.methods."""
from gnp.methods import ASAM, GNP, SAM, Plain

__all__ = ["ASAM", "GNP", "Plain", "SAM"]
