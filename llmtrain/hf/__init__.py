"""Hugging Face interchange: export our checkpoints as transformers model directories
(export.py) and load transformers directories as our models (load.py)."""

from __future__ import annotations

from types import ModuleType

from llmtrain.models import bert, gpt2, llama, t5

# our architecture -> (module with the HF mappings, HF class of a pretrain checkpoint, HF model_type)
ARCHS: dict[str, tuple[ModuleType, str, str]] = {
    "gpt2": (gpt2, "GPT2LMHeadModel", "gpt2"),
    "llama": (llama, "LlamaForCausalLM", "llama"),
    "bert": (bert, "BertForPreTraining", "bert"),
    "t5": (t5, "T5ForConditionalGeneration", "t5"),
}
BY_MODEL_TYPE = {model_type: name for name, (_, _, model_type) in ARCHS.items()}
HF_PREFIX = "hf:"
