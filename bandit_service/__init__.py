"""Allocation policies, the weight refresher, assignment and the HTTP API (next milestone)."""
