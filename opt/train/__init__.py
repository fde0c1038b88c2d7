"""Training: OPT's recipe with torch FSDP2 on Ray Train, sharded committed checkpoints, resume."""
