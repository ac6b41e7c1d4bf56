"""hfbatch: run OpenAI Batch API files against Hugging Face Inference Providers."""

__version__ = "0.1.0"
