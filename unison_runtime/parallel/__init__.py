"""Scale-out: one generation across several processes, many instructions across a cluster.

- :mod:`.context` splits one generation's video tokens across N processes with diffusers'
  context parallelism (Ulysses or ring attention) and a context-parallel plan for
  ``WanVACETransformer3DModel`` (:data:`.context.vace_cp_plan`).
- :mod:`.distributed` sets up the process group torchrun describes (gloo on CPUs, NCCL on GPUs).
- :mod:`.mirror` lets rank 0 run the ordinary pipeline while the other ranks repeat each
  transformer call with it, so only rank 0 plans, encodes, decodes and writes.
- :mod:`.torchrun` is ``torchrun --nproc-per-node N -m unison_runtime run ...``.
- :mod:`.batch` runs ``run --batch prompts.jsonl`` in-process; :mod:`.ray_batch` on a Ray cluster.

Nothing here is imported unless one of those is asked for; Ray only with ``--ray``.
"""
