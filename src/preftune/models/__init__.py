"""Models: loading Hugging Face causal LMs and tokenizers (`load`), device and dtypes (`precision`), LoRA and QLoRA
adapters and merged models (`lora`)."""
