"""Summed log-probabilities of answer tokens: the one computation behind SFT, DPO, eval and the reference cache.

- `parts`: what is read off a Hugging Face causal LM (decoder body, output head, cache keyword, compute dtype);
- `projection`: hidden states -> log p(target), chunked, recomputed in backward;
- `planner`: which rows of a batch run together, so padding costs (almost) nothing;
- `layouts`: the plain and the prefix-shared layout;
- `answer`: `answer_logps`, which picks the layout, and its module form for data-parallel wrappers.
"""
