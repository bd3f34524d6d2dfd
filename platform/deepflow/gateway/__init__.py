"""The inference gateway: OpenAI routes on the platform API that forward each request straight
to an engine instance chosen by the deployment's policy (never through Prefect or Celery)."""
