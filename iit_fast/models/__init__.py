"""The models: Hugging Face LMs run block by block (intervened on, resumed), loaded and checked.

- `intervenable.py`: `IntervenableLM`, the family-neutral wrapper (sites, interventions, resume, cache,
  activation checkpointing);
- `adapter.py` + one file a family (`bert.py`, `roberta.py`, `distilbert.py`, `gpt2.py`, `llama.py`): what
  differs per family; `registry.py` maps `config.model_type` to its adapter;
- `load.py`: a local checkpoint folder -> (IntervenableLM, tokenizer), every check before a weight is read;
  `partitioned.py`: reading it in pieces (safetensors byte ranges, ZeRO-3 partitions);
- `student.py`: a student initialised from its teacher.

This file only re-exports the public names.
"""
from .adapter import FamilyAdapter
from .intervenable import CHECKPOINTING, IntervenableLM, IntervenableMLM, Intervention, PassOutput
from .load import check_same_tokenizer, load_model
from .registry import ADAPTERS, FAMILIES, adapter_for, supported_classes
from .student import init_student_from_teacher, student_layer_map

__all__ = ["ADAPTERS", "CHECKPOINTING", "FAMILIES", "FamilyAdapter", "IntervenableLM", "IntervenableMLM",
           "Intervention", "PassOutput", "adapter_for", "check_same_tokenizer", "init_student_from_teacher",
           "load_model", "student_layer_map", "supported_classes"]
