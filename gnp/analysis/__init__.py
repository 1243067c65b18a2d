"""The flatness of finished runs (`python -m gnp.analysis RUN_DIR ...`, docs/flatness.md: Flatness of the
trained models). A room of its own beside the training loop: it reads a run directory's config,
summary and checkpoint and the run's dataset, and writes analysis.json.

- objective.py: the run's training loss on a fixed subset (value, gradient, Hessian-vector
  products by double backward or forward-over-reverse, accumulated over batches; the loss as a
  function of the parameters), with the in-loss L2 term of the run's own method;
- hessian.py: the Hessian's top eigenvalues (Lanczos) and trace (Hutch++ or Hutchinson);
- density.py: the Hessian's spectral density (stochastic Lanczos quadrature);
- blocks.py: the top eigenvalue and trace of the Hessian of each top-level block of the model;
- sharpness.py: SAM's sharpness at a radius rho;
- landscape.py: loss surfaces along filter-normalised directions, and between two runs;
- run.py: reading a run, the cached and resumable analysis of one run;
- __main__.py: the command line.

The public entry point for other tools is `subset_loss(run_dir, ...)`: the analysed loss, its batches
and `loss_fn(params)`.
"""
from gnp.analysis.objective import SubsetLoss
from gnp.analysis.run import AnalysisError, subset_loss

__all__ = ["AnalysisError", "SubsetLoss", "subset_loss"]
