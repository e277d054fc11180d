"""Bridges to other libraries: Hugging Face transformers (`ramba.integrations.hf`) and lm-evaluation-harness
(`ramba.integrations.lm_eval`). Each needs its optional extra (`pip install ramba[hf]`); ramba works without."""
