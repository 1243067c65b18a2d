"""gnp: gradient-norm penalty, SAM and SGD on CIFAR."""
from gnp.method import GradientNormPenalty

__all__ = ["GradientNormPenalty"]
