"""DeepFlow: a serverless platform for large-language-model work."""

__version__ = "0.1.0"
