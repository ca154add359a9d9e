"""Progressive rollouts: ``machine`` (the pure state machine and stage judgement), ``controller``
(its I/O partner inside the refresher's leader: durable state, transitions, weights) and
``webhooks`` (notifications and the confirm gate)."""
