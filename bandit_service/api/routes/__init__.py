"""One router per resource: health, experiments, serving (assign and events), rollouts."""
