"""gnp: gradient-norm penalty, SAM, its family and plain training on CIFAR; the methods are in gnp.methods.

`from gnp import GNP` works as `from gnp.methods import GNP`; importing `gnp` alone imports no torch, so
that the command line's first checks answer at once."""

__all__ = ["ASAM", "GNP", "Plain", "SAM"]


def __getattr__(name: str):
    if name in __all__:
        from gnp import methods

        return getattr(methods, name)
    raise AttributeError(f"module 'gnp' has no attribute {name!r}")
