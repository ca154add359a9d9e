"""Statistics over summary statistics (counts, sums, sums of squares), so the engine never needs raw events.

``frequentist`` (tests and intervals), ``bayesian`` (Beta-Binomial), ``power``
(sample size, power, minimum detectable effect). Pure functions; scipy and
statsmodels do the work where they already can.
"""
