"""iit_fast: fast causal distillation (DIITO) of masked language models."""
__version__ = "0.1.0"
