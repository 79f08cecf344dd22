"""iit_fast: fast causal distillation (DIITO) of masked and causal language models (BERT, RoBERTa,
DistilBERT; GPT-2, Llama, Qwen2, Mistral)."""
__version__ = "0.1.0"

from .export import export  # noqa: E402  iit_fast.export(student, tokenizer, path): a plain Hugging Face folder
