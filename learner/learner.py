"""The learner: one DeepSpeed ZeRO rank per Ray actor; GRPO and SFT optimizer steps.

Each rank holds a DeepSpeed engine over the policy (ZeRO stage 1, 2 or 3; fp32 or bf16; the
CPU accelerator with gloo on CPU machines) and, when the KL penalty is on, a frozen
reference copy of the initial policy. The driver sends each rank its shard of the batch;
gradients are averaged across ranks by DeepSpeed.

Loss normalisation across micro-batches and ranks: every micro-batch's loss is weighted by
its share of the optimizer step's tokens (or sequences, for sequence aggregation), counted
over all ranks, so the accumulated gradient equals that of the whole batch at once, however
it is cut. DeepSpeed's managed accumulation and its 1/gas loss scaling are switched off for
that reason: every backward() accumulates, and step() is the boundary.
"""

from __future__ import annotations

import os

import numpy as np

from cluster.config import AlgorithmConfig, LearnerConfig
from learner.batch import TrainBatch


class Learner:
    """One data-parallel rank. Create `num_ranks` of these as Ray actors (see cluster/placement)."""

    def __init__(self, model_path: str, cfg: LearnerConfig, algo: AlgorithmConfig,
                 temperature: float, rank: int, master_addr: str, master_port: int):
        gpu = cfg.num_gpus > 0  # Ray shows each rank its own GPU(s), as device 0
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          LOCAL_RANK="0", WORLD_SIZE=str(cfg.num_ranks), DS_ACCELERATOR="cuda" if gpu else "cpu")
        import warnings

        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM

        # DeepSpeed calls torch.distributed functions that torch has deprecated; not ours to fix.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

        torch.set_num_threads(cfg.threads)
        torch.manual_seed(algo.seed)
        self.cfg, self.algo, self.temperature, self.rank = cfg, algo, temperature, rank
        self.dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        self.device = torch.device("cuda", 0) if gpu else torch.device("cpu")
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", auto_mpi_discovery=False)
        # Eager attention on CPU: SDPA's CPU kernels (the flash backward above all) took 1.5x
        # as long per SmolLM2 step on these short sequences (bench/RESULTS.md).
        attention = cfg.attention if cfg.attention != "auto" else ("sdpa" if gpu else "eager")
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation=attention)
        self.sync_end = None  # rank 0's end of the broadcast weight-sync group
        self.reference = None
        if algo.kl_beta > 0:
            self.reference = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=self.dtype, attn_implementation=attention).to(self.device).eval()
            self.reference.requires_grad_(False)
        # torch's fused AdamW (CPU and CUDA): the per-tensor loop took 1.2 s of a 15 s SmolLM2
        # step. DeepSpeed's FusedAdam would compile a C++ op for minutes on CPU.
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config(cfg))

    # ---- one optimizer step -------------------------------------------------------------

    def train_step(self, shard: TrainBatch, lr: float, num_updates: int = 1) -> dict[str, float]:
        """GRPO on this rank's shard: `num_updates` optimizer steps over equal mini-batches.

        With one update the old policy is the current one (ratio 1, exact on-policy gradient);
        with several it is the engine's sampling log-probs, or the learner's own recompute
        before the first update when `recompute_old_logprobs` is set (see learner/grpo.py, 5).
        With `max_staleness` > 0 the old policy is the learner's own (recomputed when needed)
        and tokens are weighted by truncated importance weights against the sampler (6).
        """
        import torch

        from learner import grpo

        plan = self._plan(shard, num_updates)
        stale = self.algo.max_staleness > 0  # samples may come from the previous policy (grpo.py, 6)
        fixed = self._fixed_logprobs(plan, need_old=num_updates > 1 and (self.algo.recompute_old_logprobs or stale))
        metrics: dict[str, list[float]] = {}
        for index, (mini, mini_fixed) in enumerate(zip(plan, fixed)):
            total = self._global_count(mini)
            for micro, (old, ref) in zip(mini, mini_fixed):
                logprobs, entropy = self._logprobs(micro, with_entropy=True)  # [n, L-1] each
                sampled, mask = self._tensor(micro.sampling_logprobs), self._tensor(micro.loss_mask)
                if old is None:
                    old = logprobs.detach() if num_updates == 1 else sampled
                weights = grpo.importance_weights(old, sampled, mask, self.algo.is_cap) if stale else None
                loss, stats = grpo.policy_loss(
                    logprobs, old, self._tensor(micro.advantages), mask,
                    clip_low=self.algo.clip_low, clip_high=self.algo.clip_high, ref_logprobs=ref,
                    kl_beta=self.algo.kl_beta, aggregation=self.algo.aggregation, entropy=entropy,
                    is_weights=weights)
                share = self._count(micro) / total * self.cfg.num_ranks
                self.engine.backward(loss * share, scale_wrt_gas=False)
                if index == 0:  # before this step's first update: the engine's policy vs ours
                    stats["offpolicy_gap"] = _masked_abs_diff(logprobs, micro)
                for k, v in stats.items():
                    metrics.setdefault(k, []).append(v)
            metrics.setdefault("grad_norm", []).append(self._optimizer_step(lr))
        return {k: float(np.mean(v)) for k, v in metrics.items()}

    def sft_step(self, shard: TrainBatch, lr: float) -> dict[str, float]:
        """One cross-entropy optimizer step on reference traces (loss on masked tokens only)."""
        import torch

        from learner.grpo import masked_mean

        (micros,) = self._plan(shard, 1)
        total = self._global_count(micros, tokens=True)
        losses = []
        for micro in micros:
            logprobs, _ = self._logprobs(micro, with_entropy=False)  # [n, L-1]
            mask = self._tensor(micro.loss_mask)  # [n, L-1]
            loss = -masked_mean(logprobs, mask)
            share = float(mask.sum()) / total * self.cfg.num_ranks
            self.engine.backward(loss * share, scale_wrt_gas=False)
            losses.append(loss.item())
        return {"loss": float(np.mean(losses)), "grad_norm": self._optimizer_step(lr)}

    def num_params(self) -> int:
        """The policy's parameter count (ZeRO-3 partitions report their full size)."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())

    def reset_optimizer(self) -> None:
        """Forget the optimizer's moments, e.g. between SFT and RL (their gradients differ ~10x
        in scale, and Adam's second moment would shrink RL's first hundreds of steps)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # the torch AdamW under ZeRO
        inner.state.clear()  # torch optimizers re-create their state on the next step

    def _optimizer_step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()  # finalises the gradients accumulated since the last step
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    # ---- log-probs ----------------------------------------------------------------------

    def _logprobs(self, micro: TrainBatch, with_entropy: bool):
        """Log-probs [n, L-1] of each next token under the policy, at the sampling temperature."""
        import torch

        from learner.grpo import entropy_of_logprobs

        logprobs, every = _next_token_logprobs(self.engine, micro.input_ids, micro.attention_mask,
                                               self.temperature, micro.loss_mask, self.cfg.zero_stage < 3,
                                               micro.segment_ids)
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = _scatter(entropy_of_logprobs(every), micro.loss_mask)  # [n, L-1]
        return logprobs, entropy

    def _fixed_logprobs(self, plan: list[list[TrainBatch]], need_old: bool) -> list[list[tuple]]:
        """(old, reference) log-probs [n, L-1] per micro-batch of `plan`; None where not needed."""
        import torch

        out = []
        with torch.no_grad():
            for mini in plan:
                out.append([])
                for micro in mini:
                    old = self._logprobs(micro, with_entropy=False)[0] if need_old else None
                    ref = None
                    if self.reference is not None:
                        ref, _ = _next_token_logprobs(self.reference, micro.input_ids, micro.attention_mask,
                                                      self.temperature, micro.loss_mask)
                    out[-1].append((old, ref))
        return out

    def score(self, token_ids: np.ndarray) -> np.ndarray:
        """Raw (temperature 1) log-probs [T-1] of a fixed sequence, for the weight-sync check."""
        import torch

        ids = np.asarray(token_ids, dtype=np.int64)[None]  # [1, T]
        with torch.no_grad():
            logprobs, _ = _next_token_logprobs(self.engine, ids, np.ones_like(ids), 1.0,
                                               split_head=self.cfg.zero_stage < 3)  # [1, T-1]
        return logprobs[0].cpu().numpy()

    # ---- weight sync (the learner half; see cluster/weight_sync.py) -----------------------

    def gather_weights(self) -> dict[str, np.ndarray] | None:
        """Full float32 weights for the object-store transport (rank 0; the others only join)."""
        from cluster import weight_sync

        return weight_sync.gather_weights(self.engine, self.cfg.zero_stage, self.rank)

    def weight_manifest(self) -> list:
        from cluster import weight_sync

        return weight_sync.learner_manifest(self.engine)

    def sync_address(self) -> tuple[str, int]:
        """Where this rank would host the sync group's store: its node's IP and a free port."""
        import ray

        from cluster.placement import free_port

        return ray.util.get_node_ip_address(), free_port()

    def join_sync_group(self, host: str, port: int, rank: int, world_size: int, timeout_s: float) -> None:
        from cluster import weight_sync

        group = weight_sync.join_group(host, port, rank, world_size, timeout_s, "cpu")
        self.sync_end = weight_sync.BroadcastEnd(group, "cpu")

    def send_weights(self, bucket_bytes: int, timeout_s: float) -> int:
        """Broadcast transport: rank 0 sends to the sync group; every rank joins a ZeRO-3 gather."""
        from cluster import weight_sync

        return weight_sync.send_weights(self.engine, self.cfg.zero_stage, self.rank,
                                        self.sync_end, bucket_bytes, timeout_s)

    def save(self, out_dir: str, tokenizer_dir: str) -> None:
        """Write the policy as an HF folder (safetensors + tokenizer) that vLLM loads as is."""
        import torch
        from transformers import AutoTokenizer

        weights = self.gather_weights()
        if weights is None:
            return
        module = self.engine.module
        module.save_pretrained(out_dir, state_dict={k: torch.tensor(v) for k, v in weights.items()},
                               safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)

    # ---- checkpoints --------------------------------------------------------------------

    def save_state(self, ckpt_dir: str) -> None:
        """Write this rank's training state (weights, optimizer moments, RNG) under
        `ckpt_dir`; every rank must call it (ZeRO shards the optimizer over them)."""
        import torch

        self.engine.save_checkpoint(ckpt_dir, tag="learner", save_latest=False,
                                    client_state={f"torch_rng_{self.rank}": torch.get_rng_state()})

    def load_state(self, ckpt_dir: str) -> None:
        """Restore what `save_state` wrote (same rank count and ZeRO stage)."""
        import torch

        path, client = self.engine.load_checkpoint(ckpt_dir, tag="learner", load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no learner state in {ckpt_dir}")
        torch.set_rng_state(client[f"torch_rng_{self.rank}"])

    # ---- batching -----------------------------------------------------------------------

    def _plan(self, shard: TrainBatch, num_updates: int) -> list[list[TrainBatch]]:
        """Mini-batches (one per optimizer step), each cut into micro-batches."""
        plan = []
        for mini in shard.split(num_updates):
            # Shortest first, so each micro-batch pads to lengths like its own: the step's
            # gradient is a sum over micro-batches and does not depend on their order.
            by_length = mini.select(np.argsort(mini.attention_mask.sum(axis=1), kind="stable"))
            plan.append(by_length.split(-(-len(mini) // self.cfg.micro_batch_size)))
        return plan

    def _tensor(self, array: np.ndarray):
        """A batch array as a tensor on this rank's device."""
        import torch

        return torch.as_tensor(array, device=self.device)

    def _count(self, batch: TrainBatch, tokens: bool = False) -> float:
        """This batch's weight in the loss: its tokens, or its non-empty sequences."""
        if tokens or self.algo.aggregation == "token":
            return float(batch.loss_mask.sum())
        return float((batch.loss_mask.sum(axis=1) > 0).sum())

    def _global_count(self, micros: list[TrainBatch], tokens: bool = False) -> float:
        """`_count` summed over micro-batches and over all ranks (one all-reduce)."""
        return global_sum(sum(self._count(m, tokens) for m in micros), self.device)


def global_sum(value: float, device) -> float:
    """`value` summed over all ranks (one all-reduce; at least 1, as a loss weight's divisor)."""
    import torch
    import torch.distributed as dist

    total = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return max(float(total[0]), 1.0)


def ds_config(cfg: LearnerConfig) -> dict:
    """The DeepSpeed config of a learner rank. We own accumulation (any number of backward()
    calls, then step() is the boundary), so DeepSpeed's managed accumulation is off."""
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


def _next_token_logprobs(model, input_ids: np.ndarray, attention_mask: np.ndarray, temperature: float,
                         targets: np.ndarray | None = None, split_head: bool = True,
                         segment_ids: np.ndarray | None = None):
    """(log-probs [n, L-1] of tokens 1..L-1 given their prefix, 0 where `targets` [n, L-1] is
    0; log-probs of the whole vocabulary [m, V] at the m target positions) at `temperature`.

    Only the target positions go through the LM head: with a vocabulary of 49k, the head and
    the log-softmax over it cost as much as the rest of a 135M model, and prompt and padding
    positions need neither. `model` is an HF causal LM or a DeepSpeed engine around one.
    `split_head=False` runs the model whole and keeps logits from the first target column on:
    ZeRO-3 gathers parameters in hooks around the whole model's forward, and a head called
    apart from it got a different gradient (tests/test_learner.py). `segment_ids` [n, L] mark
    packed examples (learner/sft.py): each attends only to itself, from position 0.
    """
    import torch

    module = getattr(model, "module", model)  # the HF model inside a DeepSpeed engine
    device = next(module.parameters()).device
    ids, mask = torch.as_tensor(input_ids, device=device), torch.as_tensor(attention_mask, device=device)  # [n, L]
    extra = {}
    if segment_ids is not None:
        mask, extra["position_ids"] = _packed_inputs(segment_ids, next(module.parameters()).dtype, device)
    keep = (torch.ones((ids.shape[0], ids.shape[1] - 1), dtype=torch.bool, device=device) if targets is None
            else torch.as_tensor(targets, device=device).bool())  # [n, L-1]
    if split_head:
        hidden = module.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False, **extra).last_hidden_state
        logits = module.get_output_embeddings()(hidden[:, :-1][keep])  # [m, V]
    else:
        start = int(keep.any(dim=0).int().argmax()) if keep.any() else 0  # the first column with a target
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra,
                       logits_to_keep=ids.shape[1] - start).logits[:, :-1][keep[:, start:]]  # [m, V]
    every = torch.log_softmax(logits.float() / temperature, dim=-1)  # [m, V]
    picked = every.gather(-1, ids[:, 1:][keep][:, None]).squeeze(-1)  # [m]
    return _scatter(picked, keep), every


def _packed_inputs(segment_ids: np.ndarray, dtype, device):
    """(additive attention mask [n, 1, L, L], position ids [n, L]) of packed rows: 0 where a
    query may attend (same example, not later), the dtype's lowest value elsewhere. HF
    models take a 4D mask as given; eager attention needs it additive, not boolean."""
    import torch

    from learner.sft import allowed_attention, positions

    allowed = torch.as_tensor(allowed_attention(segment_ids), device=device)[:, None]  # [n, 1, L, L]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask, torch.as_tensor(positions(segment_ids), device=device)


def _scatter(values, keep):
    """[m] values at the True positions of `keep` [n, L-1] (array or tensor), 0 elsewhere."""
    import torch

    keep = torch.as_tensor(keep, device=values.device).bool()
    return torch.zeros(keep.shape, dtype=values.dtype, device=values.device).masked_scatter(keep, values)


def _masked_abs_diff(logprobs, micro: TrainBatch) -> float:
    """Mean |learner - engine| log-prob over response tokens: the off-policy gap."""
    import torch

    from learner.grpo import masked_mean

    diff = (logprobs.detach() - torch.as_tensor(micro.sampling_logprobs, device=logprobs.device)).abs()  # [n, L-1]
    return float(masked_mean(diff, torch.as_tensor(micro.loss_mask, device=logprobs.device)))
