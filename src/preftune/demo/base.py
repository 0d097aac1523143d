"""The demo's starting point: a byte-level BPE tokenizer trained on the corpus, and a tiny random Llama.

Both are saved together as an ordinary Hugging Face model folder, so the SFT stage loads it like any other model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPECIALS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>"}


@dataclass(frozen=True)
class TinySize:
    """Model shape; `vocab` is an upper bound (BPE stops early on a small corpus)."""

    vocab: int = 1024
    hidden: int = 128
    layers: int = 2
    heads: int = 4


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with <pad>/<bos>/<eos>; every encoded text starts with <bos>. Deterministic in `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos = SPECIALS["bos"]
    # A leading <bos> gives the first real token something to be predicted from.
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=SPECIALS["eos"],
                                   pad_token=SPECIALS["pad"])


def write_base_model(texts: list[str], out_dir: Path, size: TinySize, seed: int) -> Path:
    """Train the tokenizer on `texts`, build a random Llama of `size` seeded by `seed`, save both to `out_dir`."""
    from ..models.load import save_model

    tokenizer = train_tokenizer(texts, size.vocab)
    model = tiny_llama(len(tokenizer), hidden=size.hidden, layers=size.layers, heads=size.heads,
                       max_positions=64, bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                       pad_id=tokenizer.pad_token_id, seed=seed)
    save_model(model, tokenizer, out_dir)
    return out_dir


def tiny_llama(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int | None = None,
               max_positions: int = 512, bos_id: int | None = None, eos_id: int | None = None,
               pad_id: int | None = None, seed: int = 0):
    """A small random-weight Llama for the demo and tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_positions, bos_token_id=bos_id, eos_token_id=eos_id,
                      pad_token_id=pad_id, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)
