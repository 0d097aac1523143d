"""preftune: fine-tune causal language models on human preferences (SFT, then DPO)."""

__version__ = "0.1.0"
