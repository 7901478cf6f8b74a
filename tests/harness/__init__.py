"""A ComfyUI-like test bed for the pack: fake ComfyUI modules over a temp folder layout, test doubles of
the core nodes the shipped workflows use, a UI→API workflow converter and a small executor that
follows ComfyUI's rules (output nodes as roots, ExecutionBlocker, VALIDATE_INPUTS at submit time)."""
