"""Online DPO: rounds of generating answers with the current policy, judging them, pairing best against worst,
and training DPO steps on those pairs (rounds.py runs it; judges.py, pairs.py, prompts.py, config.py)."""
