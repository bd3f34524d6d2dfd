"""Replicas: a deployment's engine daemons. Deployments converge on their replica count
through ``deploy`` jobs (``converge``), whose operators start and stop the daemons
(``operators``); ``supervisor`` watches them; ``daemons`` ends one by the pid in its row."""
