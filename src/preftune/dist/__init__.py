"""Several processes under torchrun: the process environment and reductions (`env`), FSDP2 sharding and whole
state dicts (`fsdp`), and the data-parallel forms of the policy's and the reference's log-probs (`logp_module`)."""
