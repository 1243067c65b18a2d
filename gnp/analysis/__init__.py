"""The flatness of finished runs (`python -m gnp.analysis RUN_DIR ...`, README: Flatness of the
trained models). A room of its own beside the training loop: it reads a run directory's config,
summary and checkpoint and the run's dataset, and writes analysis.json.

- objective.py: the run's training loss on a fixed subset (value, gradient, Hessian-vector
  products, accumulated over batches), with the in-loss L2 term of the run's own method;
- hessian.py: the Hessian's top eigenvalues (Lanczos) and trace (Hutchinson);
- density.py: the Hessian's spectral density (stochastic Lanczos quadrature);
- blocks.py: the top eigenvalue and trace of the Hessian of each top-level block of the model;
- sharpness.py: SAM's sharpness at a radius rho;
- landscape.py: loss surfaces along filter-normalised directions, and between two runs;
- run.py: reading a run, the cached and resumable analysis of one run;
- __main__.py: the command line.
"""
