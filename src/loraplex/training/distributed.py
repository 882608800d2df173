"""Several training processes (`accelerate launch`, `torchrun`, `loraplex train --nproc N`): who writes, and agreement.

Every process runs the same recipe, loads the same base and trains every adapter together with the others
(data parallel: each optimizer step's batch is split over the processes). The main process alone writes files,
prints tables and shows progress; the others wait for it where they would read what it wrote.

`distributed.strategy: fsdp` trains each adapter on a copy of the base sharded with FSDP2 (`shard`): every
decoder layer, the LM head and the rest are sharded over the processes and gathered around their forward and
backward; the adapter's weights are then gathered whole (`full_adapter_state`) into the unsharded model, which
saves, checks and reloads it as with one process. `distributed.strategy: deepspeed` does the same through
DeepSpeed ZeRO-3 (`deepspeed_config`): the Trainer's DeepSpeed engine partitions a copy of the model, whose adapter
is gathered whole afterwards the same way.
"""
from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys

import torch

from ..device import on_gpu
from ..errors import LoraplexError
from ..lm.packed import answer_head, causal_lm


def launched() -> bool:
    """True in a process started by a distributed launcher (it sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def state():
    """accelerate's process state (the same object the Trainer uses); joins the process group when launched."""
    from accelerate import PartialState

    return PartialState(cpu=not on_gpu())


def world_size() -> int:
    return state().num_processes if launched() else 1


def is_main() -> bool:
    return state().is_main_process if launched() else True


def wait_for_everyone() -> None:
    if launched():
        state().wait_for_everyone()


def gather(value) -> list:
    """`value` of every process, in rank order (a list of one outside a launch)."""
    if not launched():
        return [value]
    state()
    values: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def sum_over_processes(value: int) -> int:
    """The sum of an integer over every process."""
    return sum(gather(value))


def on_main(decide, *args, **kwargs):
    """`decide(*args, **kwargs)` run by the main process alone; every process gets its result."""
    return gather(decide(*args, **kwargs) if is_main() else None)[0]


def sharded(strategy: str) -> bool:
    """Whether adapters train on an FSDP2-sharded copy of the base (`strategy` 'fsdp' in a launch)."""
    return strategy == "fsdp" and launched()


def decoder_layers(lm) -> list:
    """The causal LM's decoder layers: its modules of the classes transformers keeps whole (`_no_split_modules`)."""
    layer_classes = set(getattr(lm, "_no_split_modules", None) or [])
    return [module for module in lm.modules() if type(module).__name__ in layer_classes]


def zero3(strategy: str) -> bool:
    """Whether adapters train through DeepSpeed ZeRO-3 (`strategy` 'deepspeed' in a launch)."""
    return strategy == "deepspeed" and launched()


def deepspeed_config(peft_model) -> dict:
    """ZeRO-3 for the Trainer's DeepSpeed engine: the base, the adapter and its optimizer state partitioned over the
    processes, each weight gathered around its module's forward and backward. As with `shard` (FSDP), at most about
    two decoder layers are held gathered at a time, and a layer is gathered again for its backward (DeepSpeed's
    defaults keep up to 10^9 parameters gathered: the whole of a model below a few billion). 'auto' values are the
    Trainer's own (batch, accumulation, clipping, buckets sized by the hidden size); each weight keeps its dtype, as
    with one process (no DeepSpeed casting)."""
    layer = max((sum(p.numel() for p in m.parameters()) for m in decoder_layers(causal_lm(peft_model))),
                default=10**8)
    return {
        "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                              "stage3_gather_16bit_weights_on_model_save": False,
                              "stage3_max_live_parameters": 2 * layer, "stage3_max_reuse_distance": layer,
                              "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto"},
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False}, "fp16": {"enabled": False},
        "steps_per_print": 10**9,
    }


def count_deepspeed_processes_on_cpu() -> None:
    """accelerate sets DeepSpeed up for accelerators only: on a CPU (tests, gloo) the process state it makes for the
    Trainer counts one process of rank 0 in every process. Give it the process group's ranks, which DeepSpeed's
    engine uses anyway, so that batches are shared out and the main process alone writes."""
    from accelerate import PartialState

    PartialState._shared_state.update(num_processes=torch.distributed.get_world_size(),
                                      process_index=torch.distributed.get_rank(),
                                      local_process_index=int(os.environ.get("LOCAL_RANK", "0")))


def end_deepspeed() -> None:
    """After a ZeRO-3 training: transformers stops treating later models as ZeRO-3 ones (loading, generation)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def shard(peft_model):
    """A copy of `peft_model` sharded with FSDP2 over every process (`fully_shard` per decoder layer, the LM head
    when it has its own weight, then the whole model); its shards sit on this process's device. Each weight keeps
    its dtype, as with one process: a bfloat16 base is gathered and computes in bfloat16, the LoRA weights, their
    gradients and the gradients' reduction stay float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    state()
    model = copy.deepcopy(peft_model)
    lm = causal_lm(model)
    head = answer_head(lm)  # the loss runs in the head's forward, where FSDP holds its weight gathered
    mesh = init_device_mesh("cuda" if on_gpu() else "cpu", (world_size(),))
    for module in decoder_layers(lm):
        fully_shard(module, mesh=mesh)
    # a head tied to the embeddings stays in the root's group, which FSDP keeps gathered from the model's forward
    # to its backward (the root does not reshard after its forward)
    if head.weight is not lm.get_input_embeddings().weight:
        fully_shard(head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.is_distributed_loading_by_transformers = True  # the Trainer neither wraps it in DDP nor moves it
    return model


def full_adapter_state(peft_model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights (PEFT's state dict) as whole tensors, in every process: shards are gathered."""
    from peft import get_peft_model_state_dict
    from torch.distributed.tensor import DTensor

    with _zero3_gathered(peft_model, adapter):
        weights = get_peft_model_state_dict(peft_model, adapter_name=adapter)
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
                for k, v in weights.items()}


def _zero3_gathered(peft_model, adapter: str):
    """The adapter's weights partitioned by ZeRO-3 held whole for the block (nothing to do for other models)."""
    partitioned = [p for name, p in peft_model.named_parameters()
                   if hasattr(p, "ds_id") and f".{adapter}." in f"{name}."]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


def launch(processes: int, command: list[str]) -> int:
    """Run `loraplex <command>` in `processes` processes on this machine (torch's launcher); the exit code.

    On a CPU the cores are shared out (OMP_NUM_THREADS), since every process would otherwise start one thread
    per core and they would slow each other down.
    """
    env = dict(os.environ)
    if not on_gpu():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                "-m", "loraplex", *command]
    code = subprocess.run(launcher, env=env).returncode
    if code:
        raise LoraplexError(f"training stopped in one of the {processes} processes (exit code {code}); its message "
                            "is above. Every process stops with it; fix the cause and run the same command with "
                            "resume=True to continue from the last checkpoint")
    return 0
