"""gnp: gradient-norm penalty, SAM and SGD on CIFAR."""
