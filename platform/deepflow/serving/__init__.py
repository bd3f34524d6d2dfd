"""Serving: deployments converge on their replicas through serve jobs (``converge``),
whose operators start and stop engine daemons (``operators``); ``supervisor`` watches them."""
