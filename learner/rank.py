"""A DeepSpeed ZeRO data-parallel rank: what the policy's learner (learner/learner.py) and the
reward model's trainer (learner/reward_model.py) share.

`DeepSpeedRank` is one rank in a Ray actor of its own: the process's environment, seed and
process group; the HF model under a DeepSpeed engine with torch's AdamW; the optimizer step;
the weights gathered and written as an HF folder; the training state saved and restored. The
two trainers subclass it and add their own steps (GRPO and SFT; Bradley-Terry) and models.

Accumulation is ours: DeepSpeed's managed accumulation and its 1/gas loss scaling are off
(`ds_config`), every backward() accumulates and `_optimizer_step` is the boundary. A trainer
weights each micro-batch's loss by its share of the step's tokens, sequences or pairs counted
over all ranks (`global_sum`), times `num_ranks` since DeepSpeed averages gradients over the
ranks, so the step's gradient is that of its whole batch at once, however it is cut.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from learner.config import LearnerConfig


def extensions_dir(cache_dir: str | Path) -> Path:
    """Where DeepSpeed keeps its compiled ops for this Python environment: a folder of its own
    under `cache_dir`/torch_extensions. The build command holds the environment's paths, so
    two environments (two checkouts' .venv) sharing one folder rebuilt the op (a minute) each
    time they took turns."""
    key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return Path(cache_dir).expanduser() / "torch_extensions" / f"{Path(sys.prefix).name}-{key}"


def set_rank_env(cfg: LearnerConfig, rank: int, master_addr: str, master_port: int) -> None:
    """The environment DeepSpeed reads in a rank's process (before it is imported).

    DeepSpeed compiles its CPU communication op with the `ninja` first on PATH, into a cache
    shared by every run. It is this environment's pinned ninja, whatever PATH started the
    process: ninja 1.11 (a system package) and 1.12+ record commands with different hashes,
    so processes that found different ninjas rebuilt the op (a minute) each time they took turns.

    torch.compile is off (TORCHDYNAMO_DISABLE): a rank runs eager, and DeepSpeed's ZeRO
    imports its Muon optimizer, whose kernels are torch.compile'd at import, which pulled in
    inductor: 3 s of a rank's 12 s start on CPU.
    """
    gpu = cfg.num_gpus > 0
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      LOCAL_RANK="0", WORLD_SIZE=str(cfg.num_ranks), DS_ACCELERATOR="cuda" if gpu else "cpu",
                      TORCHDYNAMO_DISABLE="1",
                      PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def ds_config(cfg: LearnerConfig) -> dict:
    """The DeepSpeed config of a rank. We own accumulation (any number of backward() calls,
    then step() is the boundary), so DeepSpeed's managed accumulation is off."""
    return {
        "managed_gradient_accumulation": False,
        "train_micro_batch_size_per_gpu": 1,  # nominal; the real sizes are ours
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def checkpoint_layers(model) -> None:
    """Make `model`, an HF model, recompute each transformer layer's activations in backward
    instead of keeping them: HF gradient checkpointing, non-reentrant (torch's recommended mode:
    the recompute runs inside the same backward, so ZeRO-3's hooks see it as any other forward).

    HF recomputes a layer only in training mode, and the models here train in eval mode, as
    from_pretrained leaves them: the engines sample without dropout, so the learner scores
    without it. Only the layers' own flags are set, not their submodules': attention and MLP
    stay in eval mode, with their dropout off."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"learner.gradient_checkpointing: {type(model).__name__} has no layers HF recomputes")
    for layer in layers:
        layer.training = True


class DeepSpeedRank:
    """One data-parallel rank training an HF model; create `cfg.num_ranks` of a subclass as Ray
    actors. A subclass's __init__ calls this one first (environment, seed and process group,
    before any model exists), loads its float32 model with `self.attention`, then hands it to
    `_start_engine`."""

    def __init__(self, cfg: LearnerConfig, seed: int, rank: int, master_addr: str, master_port: int):
        gpu = cfg.num_gpus > 0  # Ray shows each rank its own GPU(s), as device 0
        set_rank_env(cfg, rank, master_addr, master_port)
        import warnings

        import deepspeed
        import torch

        # DeepSpeed calls torch.distributed functions that torch has deprecated; not ours to fix.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

        torch.set_num_threads(cfg.threads)
        torch.manual_seed(seed)  # a new head (the reward model's score) starts alike on every rank
        self.cfg, self.rank = cfg, rank
        self.device = torch.device("cuda", 0) if gpu else torch.device("cpu")
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", auto_mpi_discovery=False)
        # Eager attention on CPU: SDPA's CPU kernels (the flash backward above all) took 1.5x
        # as long per SmolLM2 step on these short sequences (bench/RESULTS.md).
        self.attention = cfg.attention if cfg.attention != "auto" else ("sdpa" if gpu else "eager")

    def _start_engine(self, model) -> None:
        """Train `model` from here on: `self.engine` (DeepSpeed's, around it) and `self.optimizer`."""
        import deepspeed
        import torch

        if self.cfg.gradient_checkpointing:
            checkpoint_layers(model)
        # torch's fused AdamW (CPU and CUDA): the per-tensor loop took 1.2 s of a 15 s SmolLM2
        # step. DeepSpeed's FusedAdam would compile a C++ op for minutes on CPU.
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                      fused=True)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=ds_config(self.cfg))

    def _optimizer_step(self, lr: float) -> float:
        """Step at learning rate `lr` on the gradients accumulated since the last step (clipped
        to `grad_clip` by DeepSpeed); returns their norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()  # finalises the gradients accumulated since the last step
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def reset_optimizer(self) -> None:
        """Forget the optimizer's moments, e.g. between SFT and RL (their gradients differ ~10x
        in scale, and Adam's second moment would shrink RL's first hundreds of steps)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # the torch AdamW under ZeRO
        inner.state.clear()  # torch optimizers re-create their state on the next step

    # ---- weights out ----------------------------------------------------------------------

    def gather_weights(self, bucket_bytes: int = 64 * 2**20) -> dict[str, np.ndarray] | None:
        """Full float32 weights by HF name on rank 0, None elsewhere; every rank must call it
        (ZeRO-3 gathers them `bucket_bytes` at a time). The object-store transport of the
        policy's weight sync (cluster/weight_sync.py) and `save`."""
        from common import weight_sync

        return weight_sync.gather_weights(self.engine, self.cfg.zero_stage, self.rank, bucket_bytes)

    def save(self, out_dir: str, tokenizer_dir: str) -> None:
        """Write the model as an HF folder (safetensors + the tokenizer of `tokenizer_dir`, which
        vLLM loads as is) on rank 0; every rank must call it (ZeRO-3 gathers the weights)."""
        import torch
        from transformers import AutoTokenizer

        weights = self.gather_weights()
        if weights is None:
            return
        self.engine.module.save_pretrained(out_dir, state_dict={k: torch.tensor(v) for k, v in weights.items()},
                                           safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)

    # ---- checkpoints ----------------------------------------------------------------------

    def save_state(self, ckpt_dir: str) -> None:
        """Write this rank's training state (weights, optimizer moments, RNG) under
        `ckpt_dir`; every rank must call it (ZeRO shards the optimizer over them). The torch
        RNG goes to a file of the rank's own: under ZeRO-1/2 DeepSpeed writes one model-states
        file, rank 0's, for all ranks, and with it only rank 0's client state."""
        import torch

        self.engine.save_checkpoint(ckpt_dir, tag="learner", save_latest=False)
        torch.save(torch.get_rng_state(), Path(ckpt_dir) / f"torch_rng_{self.rank}.pt")

    def load_state(self, ckpt_dir: str) -> None:
        """Restore what `save_state` wrote (same rank count and ZeRO stage)."""
        import torch

        path, client = self.engine.load_checkpoint(ckpt_dir, tag="learner", load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no learner state in {ckpt_dir}")
        rng = Path(ckpt_dir) / f"torch_rng_{self.rank}.pt"  # checkpoints written before kept it in `client`
        torch.set_rng_state(torch.load(rng) if rng.exists() else client[f"torch_rng_{self.rank}"])


# ---- collectives over the ranks -------------------------------------------------------------

def global_sum(value: float, device) -> float:
    """`value` summed over all ranks (one all-reduce; at least 1, as a loss weight's divisor)."""
    return max(all_reduce([float(value)], device, "sum")[0], 1.0)


def global_max(values: list[int], device) -> list[int]:
    """Each of `values`, the largest over all ranks (one all-reduce)."""
    return [int(v) for v in all_reduce([float(v) for v in values], device, "max")]


def all_reduce(values: list[float], device, op: str) -> list[float]:
    """`values` summed (`op` "sum") or maximised ("max") elementwise over all ranks, in float64."""
    import torch
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1 and len(values):
        dist.all_reduce(total, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return total.tolist()
