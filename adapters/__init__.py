"""Pure-PyTorch core of the pack (no ComfyUI imports): LLM prompt encoding, the LLM Diff Adapter and LI-DiT."""
