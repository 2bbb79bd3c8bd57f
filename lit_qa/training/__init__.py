# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Training: the one loop (`loop.fit`) and what happens around it, one file each.

- `launch`: before the loop: Fabric, data, model, no-answer head, optimizer (what every finetune script calls).
- `loop`: `fit`, a step at a time: batch, forward, backward, optimizer step, maybe validate and save.
- `progress`: `Progress`, the run's counters (step, epoch, validations, best step) a checkpoint records.
- `batches`: the data order, a pure function of (seed, epoch). `loss`: the answer-token loss.
- `optimizer`: the learning-rate schedule and the guarded optimizer step (non-finite losses, fp16 scaling).
- `validation`: validation loss, sample generations, F1 of answered validation questions.
- `selection`: the best step (``best/``) and the no-answer threshold saved with it.
- `resume`: step checkpoints written atomically, and resuming from them exactly.
- `signals`: stopping cleanly on SIGTERM / SIGINT.
- `args`, `distributed` (DDP / FSDP2), `memory` (the memory estimator).
"""
