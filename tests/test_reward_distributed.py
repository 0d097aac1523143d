"""A reward model trained on 2 ranks (DDP, gloo on the CPU) equals one process with the whole batch."""

from __future__ import annotations

import pytest

from tinylm import fact_pairs, make_model_dir, write_jsonl
from test_distributed import LR, STEPS, assert_same_steps, assert_same_weights, run_single, run_torchrun


@pytest.mark.slow
def test_rm_ddp_two_ranks_match_one_process(tmp_path):
    model = make_model_dir(tmp_path / "model")
    rows = [{**row, "margin": (i % 3) * 0.5} for i, row in enumerate(fact_pairs(32))]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)

    def args(out, batch):
        return ["rm", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / out), "--max-steps",
                str(STEPS), "--lr", LR, "--dtype", "float32", "--device", "cpu", "--quiet", "--center-rewards",
                "0.01", "--batch-size", str(batch)]

    run_single(args("single", 8))
    run_torchrun([args("ddp", 4)])
    assert_same_steps(tmp_path / "single", tmp_path / "ddp")
    # Rows pad to a different width in a batch of 8 than in two of 4, which moves the rewards by ~1e-7; three Adam
    # steps at lr 1e-2 carry that to ~1.2e-5 in the weights (measured), while every tensor moves by more than 1e-2.
    assert_same_weights(tmp_path / "single", tmp_path / "ddp", tol=5e-5)
