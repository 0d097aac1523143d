"""Test helpers: a tokenizer trained on the spot, a tiny random Llama saved as a Hugging Face folder, data."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ("the capital of france is paris . the capital of italy is rome . water boils at one hundred degrees . "
         "the sky is blue and grass is green . cats chase mice and dogs chase cats . "
         "Human: what is the capital of spain ? Assistant: madrid is the capital of spain .").split()

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model_dir(path: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    from preftune.demo.base import tiny_llama

    tok = make_tokenizer()
    model = tiny_llama(len(tok), hidden=hidden, layers=layers, heads=4, pad_id=tok.pad_token_id,
                       eos_id=tok.eos_token_id, bos_id=tok.bos_token_id, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fact_pairs(n: int = 32):
    """Text preference pairs with a consistent signal: chosen says 'paris', rejected says 'rome'."""
    prompts = ["the capital of france is", "Human: what is the capital of france ? Assistant:",
               "the sky is blue and the capital of france is", "cats chase mice . the capital of france is"]
    return [{"prompt": prompts[i % len(prompts)] + " " * (i % 2), "chosen": " paris .", "rejected": " rome ."}
            for i in range(n)]


def train_switched(model_dir: Path, switch: str, patched_class: str) -> dict:
    """Two 3-step DPO runs of a model object loaded from `model_dir`, with the config field `switch` True, then
    False. For each: (result, [whether each `patched_class` module had a forward of its own during the run], whether
    any module still has one after it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import preftune

    settings = {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "max_length": 64, "device": "cpu", "dtype": "float32",
                "seed": 3, "warmup_steps": 0}
    out = {}
    for on in (True, False):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        during = []

        def look(row, model=model):
            if not during:
                during.extend("forward" in vars(m) for m in model.modules() if type(m).__name__ == patched_class)

        result = preftune.train("dpo", model=model, tokenizer=tokenizer, data=fact_pairs(16), callbacks=[look],
                                **{switch: on}, **settings)
        out[on] = (result, during, any("forward" in vars(m) for m in model.modules()))
    return out
