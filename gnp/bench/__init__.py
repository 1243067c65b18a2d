"""`make bench` as library code (scripts/benchmark.py is its command line), one concern per module:

    settings  the models, fast paths and configs measured, the synthetic data, the device defaults
    parts     the one place that reaches into the training loop (building a run's parts, training)
    steps     what is timed: the suite's training step, and the hand-written two-pass reference step
    timing    device synchronisation, interleaved rounds, medians and spreads, paired ratios
    memory    peak memory of one step variant (CUDA's allocator, or a CPU child process's resident set)
    stages/   one module per stage: methods (steps, evaluation, memory), shards (the layout), exact, loader,
              loop, cuda (synchronisation and end-to-end checks), analysis (the cost of a flatness analysis)
    run       a whole run: the stages in order, each recorded (or its error) as soon as it ends
    speed_tables  the speed tables of docs/speed.md, rendered from results/benchmarks/

The file format of results/benchmarks/ and its one reader are gnp.measurements, which the tables' time
estimates read too.
"""
