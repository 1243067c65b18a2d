"""The stages of `make bench`, one module each: `measure_*` returns the stage's record (a dict in the
benchmark file, gnp.measurements) and `show` prints it. gnp.bench.run runs them in order."""
