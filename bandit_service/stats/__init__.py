"""Statistics over summary statistics (counts, sums, sums of squares), so the engine never needs raw events.

``frequentist`` (tests and intervals), ``bayesian`` (Beta-Binomial),
``power`` (sample size, power, minimum detectable effect), ``sequential``
(Wald's SPRT, mixture SPRT with always-valid p-values and confidence
sequences), ``checks`` (sample-ratio mismatch, multiple-comparison
corrections), ``adaptive`` (estimates stratified by allocation period under
moving weights), ``guardrails`` (non-inferiority on error rates and latency
histograms), ``decision`` (ship, do not ship, keep running, stop for harm).
Pure functions; scipy and statsmodels do the work where they already can.
"""
