"""Policy model, SFT, GRPO; `train/rl.py` is the `ray job submit` entrypoint (next stage)."""
