"""The reproduction: the studies that test the papers' claims with the library (`multinorm.optim`, `multinorm.train`).

Nothing in the library imports this package. One module per concept:

    runner       `make figures` / `make smoke`: the study notebooks run with papermill (`python -m multinorm.studies`)
    sweep        grids of training runs: cached by configuration, resumable, parallel
    stats        paired intervals over seeds, token speed-ups, the verdict words
    convergence  notebook 02: tune every method, seeds, paired comparisons, verdicts on the papers' claims
    ablations    notebook 04: the variants of SinkGD and SWAN and the answers their comparisons give
    scaling      notebook 05: cells of batch x width, trends toward the papers' regime
    fixed_point  notebook 01: fixed-point residuals of the normalizations and their summary
    memory       notebook 03: the analytic memory model (the papers' convention)
    gradients    real gradients of a LLaMA for notebook 01
    bigram       the count-bigram reference loss (regime check R1)
    report       tables, figures and README sections from results/
    playground   notebook 00's widgets; e2e drives them in a real browser (`make e2e`)

The benchmarks (`make bench`) are `multinorm.bench`, beside this package.
"""
