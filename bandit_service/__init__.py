"""The bandit service: from aggregates to decisions.

``policies`` (allocation weights, one class per strategy), ``refresher``
(recomputes weights when aggregates change, one leader at a time),
``allocations`` (stores and publishes each weights version), ``assignment``
(sticky units), ``stats`` (the statistics, over summary statistics),
``report`` (the experiment report and its decision), ``rollouts``
(progressive rollouts), ``lifecycle`` (champion promotion), ``api`` (the HTTP
API), ``simulation`` (policies and estimators under simulated traffic).
It never imports ``stream_jobs``: the two meet only in PostgreSQL.
"""
