"""The language-model core below training: `packed` (packed batches, per-sequence attention, the answer-only loss,
held-out metrics) and `dropout` (LoRA dropout with one cheap mask per input). Training, module selection,
evaluation, merging and routing all use it; it imports none of them."""
