"""Training: the loop (`loop`), what it builds first (`setup`), what it optimises (`objectives`, `optim`), where
reference log-probs come from (`reference`, `reference_cache`), and what survives it (`checkpoint`, `run_dir`,
`signals`)."""
