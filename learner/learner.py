"""The policy's learner: one DeepSpeed ZeRO rank per Ray actor; GRPO and SFT optimizer steps.

Each rank (a learner.rank.DeepSpeedRank) holds a DeepSpeed engine over the policy (ZeRO stage
1, 2 or 3; fp32 or bf16; the CPU accelerator with gloo on CPU machines) and, when the KL
penalty is on, a frozen reference model that the driver names (`load_reference`: the policy as
RL starts, or a model folder). The driver sends each rank its shard of the batch; gradients
are averaged across ranks by DeepSpeed.

Loss normalisation across micro-batches and ranks is the rank's (learner/rank.py): every
micro-batch's loss is weighted by its share of the optimizer step's tokens (or sequences, for
sequence aggregation), counted over all ranks. The logged losses are weighted the same way
(summed over micro-batches and ranks, then divided by the counts).

Every rank runs the same number of forward and backward passes, whatever its shard: ZeRO-3
gathers parameters in collectives inside them, and a rank with fewer would leave the others
waiting forever. Ranks agree on the largest micro-batch count and pad with empty micro-batches
(one token pair, no loss) that weigh nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from common.records import Sampling
from learner.batch import TrainBatch
from learner.config import AlgorithmConfig, LearnerConfig
from learner.rank import DeepSpeedRank, all_reduce, ds_config, global_max, global_sum

RAW = Sampling(n=1, seed=0)
"""Temperature 1, no truncation: the model's own distribution (SFT, the sync check)."""


class Learner(DeepSpeedRank):
    """One data-parallel rank of the policy. Create `num_ranks` of these as Ray actors (see
    cluster/placement)."""

    def __init__(self, model_path: str, cfg: LearnerConfig, algo: AlgorithmConfig,
                 sampling: Sampling, rank: int, master_addr: str, master_port: int):
        """`sampling`: how the engines sample (temperature, top-k, top-p); the learner's
        log-probs are those of the same distribution."""
        super().__init__(cfg, algo.seed, rank, master_addr, master_port)
        import torch
        from transformers import AutoModelForCausalLM

        self.algo, self.sampling = algo.resolved(), sampling
        self.kl_sampling = dataclasses.replace(sampling, top_k=0, top_p=1.0)  # the KL's: temperature only
        self.dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        self.sync_end = None  # rank 0's end of the broadcast weight-sync group
        self.reference = None  # the KL penalty's frozen model, once the driver names it
        self.reference_path: str | None = None
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                     attn_implementation=self.attention)
        self._start_engine(model)

    def load_reference(self, model_dir: str) -> None:
        """Freeze the model in `model_dir` as the KL penalty's reference (learner/grpo.py, 3).
        It must have the policy's parameter names and shapes.

        It is held like the policy: under ZeRO-3 as a DeepSpeed engine without optimizer, each
        rank keeping 1/num_ranks of its weights and gathering them layer by layer in forward (as
        OpenRLHF holds its reference); under ZeRO-1/2, which keep the policy's weights whole on
        every rank, whole. Its log-probs are computed once per batch, before the first update
        (`_fixed_logprobs`), in chunks of `logprob_chunk` target tokens."""
        import deepspeed
        from transformers import AutoModelForCausalLM

        from common.weight_sync import parameter_shapes

        ours = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in self.engine.module.named_parameters()}
        theirs = parameter_shapes(model_dir)
        if any(theirs.get(name, shape) != shape for name, shape in ours.items()):
            raise ValueError(f"algorithm.kl_reference: {model_dir} has other parameter shapes than the policy")
        self.reference = None  # the previous reference's memory is freed before the next loads
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype, attn_implementation=self.attention)
        model.requires_grad_(False)
        if self.cfg.zero_stage == 3:
            self.reference = deepspeed.initialize(model=model.eval(), config=ds_config(self.cfg))[0]
        else:
            self.reference = model.to(self.device).eval()
        self.reference_path = model_dir

    # ---- one optimizer step -------------------------------------------------------------

    def train_step(self, shard: TrainBatch, lr: float, num_updates: int = 1) -> dict[str, float]:
        """GRPO on this rank's shard: `num_updates` optimizer steps over equal mini-batches.

        pi_old is the current policy with one update (ratio 1, the exact on-policy gradient);
        with several, the engine's sampling log-probs or, with `old_logprobs=learner`, the
        learner's own recompute before the first update (learner/grpo.py, 5). A mismatch
        correction weights each token by pi_old / pi_sampler (points 6, 11). Returns the whole
        step's metrics, the same on every rank: token-weighted means over all ranks' tokens
        (pg_loss weighted like the loss: by tokens, or by sequences for sequence and constant
        aggregation; masked_sequences by sequences), and grad_norm averaged over the updates.
        The mismatch metrics are taken where pi_old is the learner's: every token when it is
        recomputed or there is one update, else the first mini-batch (before its update).
        """
        from learner import grpo

        a = self.algo
        plan = self._plan(shard, num_updates)
        kl_in_loss = a.kl_in == "loss"
        fixed = self._fixed_logprobs(plan, need_old=num_updates > 1 and a.old_logprobs == "learner",
                                     need_ref=kl_in_loss)
        means, norms = _WeightedMeans(), []
        for index, (mini, mini_fixed) in enumerate(zip(plan, fixed)):
            total = self._global_count(mini)
            for micro, (old, ref) in zip(mini, mini_fixed):
                logprobs, entropy, untruncated = self._logprobs(
                    micro, with_entropy=True, untruncated=ref is not None,
                    entropy_grad=a.entropy_coef > 0)  # [n, L-1] each
                sampled, mask = self._tensor(micro.sampling_logprobs), self._tensor(micro.loss_mask)
                learner_old = old if old is not None else logprobs.detach() if num_updates == 1 or index == 0 else None
                if old is None:
                    old = logprobs.detach() if num_updates == 1 else sampled
                weights = None
                if a.mismatch != "none":
                    weights = grpo.importance_weights(old, sampled, mask, a.mismatch, a.is_cap, a.mismatch_low,
                                                      a.mismatch_high)
                loss, stats = grpo.policy_loss(
                    logprobs, old, self._tensor(micro.advantages), mask, loss=a.loss,
                    clip_low=a.clip_low, clip_high=a.clip_high, dual_clip=a.dual_clip, ref_logprobs=ref,
                    kl_beta=a.kl_beta if kl_in_loss else 0.0, kl_estimator=a.kl_estimator,
                    aggregation=a.aggregation, max_tokens=self.sampling.max_new_tokens, entropy=entropy,
                    entropy_coef=a.entropy_coef, is_weights=weights, kl_logprobs=untruncated)
                self.engine.backward(loss * (self._count(micro) / total * self.cfg.num_ranks), scale_wrt_gas=False)
                if learner_old is not None:  # the sampler against the learner's pi_old
                    stats |= grpo.mismatch_metrics(learner_old, sampled, mask, weights)
                means.add(stats, float(micro.loss_mask.sum()), pg_loss=self._count(micro),
                          masked_sequences=float((micro.loss_mask.sum(axis=1) > 0).sum()))
            norms.append(self._optimizer_step(lr))
        return {**means.global_means(self.device), "grad_norm": float(np.mean(norms))}

    def sequence_kl(self, shard: TrainBatch) -> np.ndarray:
        """[n]: each answer's KL estimate to the reference, summed over its tokens, in the
        shard's order, for the penalty folded into the reward (`algorithm.kl_in=reward`;
        learner/grpo.py, point 3). The sampler's log-probs stand for the policy: they are the
        distribution the answer was drawn from, and need no forward pass of the policy."""
        import torch

        from learner import grpo

        # In the shard's order (not `_plan`'s, sorted by length), padded as `_plan` pads.
        count = -(-len(shard) // self.cfg.micro_batch_size)
        micros = shard.split(count) if count else []
        micros += [TrainBatch.placeholder()] * (global_max([count], self.device)[0] - count)
        out = []
        with torch.no_grad():
            for micro in micros:
                ref, _, _ = _next_token_logprobs(self.reference, micro.input_ids, micro.attention_mask,
                                                 self.kl_sampling, micro.loss_mask, chunk=self.cfg.logprob_chunk)
                out.append(grpo.sequence_kl(self._tensor(micro.sampling_logprobs), ref, self._tensor(micro.loss_mask),
                                            self.algo.kl_estimator).cpu().numpy())  # [n]
        return np.concatenate(out[:count]) if count else np.zeros(0)

    def sft_step(self, shard: TrainBatch, lr: float) -> dict[str, float]:
        """One cross-entropy optimizer step on reference traces (loss on masked tokens only),
        on the model's own distribution (temperature 1, untruncated), whatever RL samples with.
        `loss` is the mean over all ranks' target tokens."""
        from learner.grpo import masked_mean

        (micros,) = self._plan(shard, 1)
        total = self._global_count(micros, tokens=True)
        means = _WeightedMeans()
        for micro in micros:
            logprobs, _, _ = self._logprobs(micro, with_entropy=False, sampling=RAW)  # [n, L-1]
            mask = self._tensor(micro.loss_mask)  # [n, L-1]
            loss = -masked_mean(logprobs, mask)
            tokens = float(micro.loss_mask.sum())
            self.engine.backward(loss * (tokens / total * self.cfg.num_ranks), scale_wrt_gas=False)
            means.add({"loss": loss.item()}, tokens)
        return {**means.global_means(self.device), "grad_norm": self._optimizer_step(lr)}

    # ---- log-probs ----------------------------------------------------------------------

    def _logprobs(self, micro: TrainBatch, with_entropy: bool, untruncated: bool = False,
                  sampling: Sampling | None = None, entropy_grad: bool = False):
        """(log-probs [n, L-1] of each next token under the policy, in the distribution the
        engines sample from; its entropy [n, L-1] (with its gradient where `entropy_grad`) or
        None; with `untruncated`, the log-probs at the temperature without the top-k / top-p
        cut, for the KL term, else None)."""
        entropy = "grad" if entropy_grad else with_entropy
        return _next_token_logprobs(self.engine, micro.input_ids, micro.attention_mask, sampling or self.sampling,
                                    micro.loss_mask, micro.segment_ids, untruncated, entropy, self.cfg.logprob_chunk)

    def _fixed_logprobs(self, plan: list[list[TrainBatch]], need_old: bool, need_ref: bool) -> list[list[tuple]]:
        """(old, reference) log-probs [n, L-1] per micro-batch of `plan`; None where not needed
        (the reference's where `need_ref` and there is a reference).
        The reference's are untruncated (the KL compares models, not samplers: a token outside
        the reference's top-p would otherwise cost an infinite penalty)."""
        import torch

        out = []
        with torch.no_grad():
            for mini in plan:
                out.append([])
                for micro in mini:
                    old = self._logprobs(micro, with_entropy=False)[0] if need_old else None
                    ref = None
                    if need_ref and self.reference is not None:
                        ref, _, _ = _next_token_logprobs(self.reference, micro.input_ids, micro.attention_mask,
                                                         self.kl_sampling, micro.loss_mask,
                                                         chunk=self.cfg.logprob_chunk)
                    out[-1].append((old, ref))
        return out

    def score(self, token_ids: np.ndarray) -> np.ndarray:
        """Raw (temperature 1) log-probs [T-1] of a fixed sequence, for the weight-sync check."""
        import torch

        ids = np.asarray(token_ids, dtype=np.int64)[None]  # [1, T]
        with torch.no_grad():
            logprobs, _, _ = _next_token_logprobs(self.engine, ids, np.ones_like(ids), RAW,
                                                  chunk=self.cfg.logprob_chunk)  # [1, T-1]
        return logprobs[0].cpu().numpy()

    # ---- weight sync (the learner half; see common/weight_sync.py) -----------------------
    # The object-store transport is the rank's `gather_weights` (learner/rank.py).

    def share_weights(self) -> list[tuple[str, bytes]]:
        """CUDA IPC handles to this rank's parameters, for the engine beside it (colocated)."""
        from common import weight_sync

        return weight_sync.share_weights(self.engine)

    def weight_manifest(self) -> list:
        from common import weight_sync

        return weight_sync.learner_manifest(self.engine)

    def sync_address(self) -> tuple[str, int]:
        """Where this rank would host the sync group's store: its node's IP and a free port."""
        import ray

        from common.net import free_port

        return ray.util.get_node_ip_address(), free_port()

    def join_sync_group(self, host: str, port: int, rank: int, world_size: int, timeout_s: float,
                        device: str) -> None:
        """Join a new sync group (leaving the one formed before, if any); its buffers live on
        `device`: this rank's GPU when it is an NCCL group."""
        from common import weight_sync

        if self.sync_end is not None:
            self.sync_end.close()
        group = weight_sync.join_group(host, port, rank, world_size, timeout_s, device)
        self.sync_end = weight_sync.BroadcastEnd(group, device)

    def send_weights(self, bucket_bytes: int, timeout_s: float) -> int:
        """Broadcast transport: rank 0 sends to the sync group; every rank joins a ZeRO-3 gather."""
        from common import weight_sync

        return weight_sync.send_weights(self.engine, self.cfg.zero_stage, self.rank,
                                        self.sync_end, bucket_bytes, timeout_s)

    # ---- batching -----------------------------------------------------------------------

    def _plan(self, shard: TrainBatch, num_updates: int) -> list[list[TrainBatch]]:
        """Mini-batches (one per optimizer step), each cut into micro-batches, the same number
        on every rank (padded with empty ones): see the module docstring."""
        plan = []
        for mini in shard.split(num_updates):
            # Shortest first, so each micro-batch pads to lengths like its own: the step's
            # gradient is a sum over micro-batches and does not depend on their order.
            by_length = mini.select(np.argsort(mini.attention_mask.sum(axis=1), kind="stable"))
            plan.append(by_length.split(-(-len(mini) // self.cfg.micro_batch_size)) if len(mini) else [])
        counts = global_max([len(micros) for micros in plan], self.device)
        return [micros + [TrainBatch.placeholder()] * (count - len(micros)) for micros, count in zip(plan, counts)]

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


class _WeightedMeans:
    """Metrics of micro-batches, kept as weighted sums so the step reports the means the
    optimizer step used: sum(value x weight) / sum(weight) over all micro-batches and ranks."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}  # name -> [sum of value x weight, sum of weight]

    def add(self, stats: dict[str, float], weight: float, **weights: float) -> None:
        """`stats` of one micro-batch, each weighted by `weight` unless `weights` names its own."""
        for name, value in stats.items():
            w = weights.get(name, weight)
            acc = self.sums.setdefault(name, [0.0, 0.0])
            acc[0] += value * w
            acc[1] += w

    def global_means(self, device) -> dict[str, float]:
        """The means over every rank (one all-reduce; every rank has the same names)."""
        names = sorted(self.sums)
        flat = all_reduce([x for name in names for x in self.sums[name]], device, "sum")
        return {name: flat[2 * i] / flat[2 * i + 1] if flat[2 * i + 1] else 0.0 for i, name in enumerate(names)}


def _next_token_logprobs(model, input_ids: np.ndarray, attention_mask: np.ndarray, sampling: Sampling,
                         targets: np.ndarray | None = None, segment_ids: np.ndarray | None = None,
                         untruncated: bool = False, entropy: bool | str = False, chunk: int = 0):
    """(log-probs [n, L-1] of tokens 1..L-1 given their prefix in the distribution `sampling`
    draws from (`Sampling.logprobs`: temperature, top-k, top-p), 0 where `targets` [n, L-1] is
    0; with `entropy`, that distribution's entropy [n, L-1], without gradient unless `entropy` is
    "grad", else None; with
    `untruncated`, the log-probs [n, L-1] at the temperature without the cuts, else None).

    Only the target positions go through the LM head: with a vocabulary of 49k, the head and
    the log-softmax over it cost as much as the rest of a 135M model, and prompt and padding
    positions need neither. `model` is an HF causal LM or a DeepSpeed engine around one; it
    runs whole, with the head's forward replaced for the call (`_head_replaced`) by one that
    takes the target positions' hidden states to log-probs. `segment_ids` [n, L] mark packed
    examples (learner/sft.py): each attends only to itself, from position 0.

    `chunk` > 0 runs the m target positions `chunk` at a time, each chunk's head, log-softmax,
    picked token, untruncated log-prob and entropy under torch.utils.checkpoint (non-reentrant)
    when there is more than one chunk and a gradient to take: backward keeps [chunk]-sized
    outputs and recomputes the chunk's [chunk, V] logits (the head's forward once more). `chunk`
    = 0 keeps the [m, V] log-probs for backward and peaks with the logits and the entropy's
    intermediates beside them: ~20 bytes per vocabulary entry per target, 14 GB for 4k answer
    tokens of Qwen2.5's 152k vocabulary (bench/RESULTS.md, learner memory).
    """
    import torch

    module = getattr(model, "module", model)  # the HF model inside a DeepSpeed engine
    device = next(module.parameters()).device
    # Copied: arrays from Ray's object store are read-only, which torch warns about.
    ids, mask = torch.tensor(input_ids, device=device), torch.tensor(attention_mask, device=device)  # [n, L]
    extra = {}
    if segment_ids is not None:
        mask, extra["position_ids"] = _packed_inputs(segment_ids, next(module.parameters()).dtype, device)
    keep = (torch.ones((ids.shape[0], ids.shape[1] - 1), dtype=torch.bool, device=device) if targets is None
            else torch.tensor(targets, device=device).bool())  # [n, L-1]
    start = int(keep.any(dim=0).int().argmax()) if keep.any() else 0  # the first column with a target
    picked_ids = ids[:, 1:][keep]  # [m]

    def head_logprobs(head, hidden):  # hidden states [n, L-start, H] -> [m, 3]
        hidden = hidden[:, :-1][keep[:, start:]]  # [m, H]
        step, parts = chunk or max(len(hidden), 1), []
        # One chunk recomputed would peak as high in backward as one kept: it is kept.
        recompute = torch.is_grad_enabled() and len(hidden) > step
        for at in range(0, max(len(hidden), 1), step):
            args = (head, hidden[at:at + step], picked_ids[at:at + step], sampling, untruncated, entropy)
            parts.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False)
                         if recompute else _chunk_logprobs(*args))  # [c, 3]
        return torch.cat(parts)  # [m, 3]

    with _head_replaced(module, head_logprobs):
        out = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra,
                    logits_to_keep=ids.shape[1] - start).logits  # [m, 3]
    picked, raw, spread = (_scatter(out[:, i], keep) for i in range(3))  # [n, L-1] each
    return picked, (spread if entropy else None), (raw if untruncated else None)


def _chunk_logprobs(head, hidden, targets, sampling: Sampling, untruncated: bool, entropy: bool | str):
    """[c, 3]: log-prob, untruncated log-prob (the first again unless asked and truncating) and
    entropy (0 unless asked; with its gradient only when `entropy` is "grad", for an entropy
    bonus) of `targets` [c] after hidden states [c, H]; `head` is the LM head's own forward.
    The entropy comes last: a checkpoint's recompute stops once it has what backward needs, so
    one without gradient is not computed again."""
    import torch

    from learner.grpo import entropy_of_logprobs

    logits = head(hidden).float()  # [c, V]
    every = sampling.logprobs(logits)  # [c, V]
    picked = every.gather(-1, targets[:, None]).squeeze(-1)  # [c]
    raw = picked
    if untruncated and sampling.truncates:  # one more log-softmax only where the cuts make it differ
        raw = sampling.logprobs(logits, truncate=False).gather(-1, targets[:, None]).squeeze(-1)  # [c]
    with contextlib.nullcontext() if entropy == "grad" else torch.no_grad():
        spread = entropy_of_logprobs(every) if entropy else torch.zeros_like(picked)  # [c]
    return torch.stack([picked, raw, spread], dim=-1)  # [c, 3]


@contextlib.contextmanager
def _head_replaced(module, forward):
    """`module`, an HF causal LM, with its LM head's forward replaced by `forward(head, hidden)`
    for the duration, where `head` is the head's own forward (without hooks).

    The model runs whole, through the DeepSpeed engine when there is one, and the head inside
    it, once per call, because ZeRO-3 requires both: the engine's forward counts micro-batches
    (the first's gradient is copied into the optimizer's partitions, later ones are added: a
    decoder called apart from it replaced the accumulated gradient with its own), and the
    head's weight, partitioned over the ranks, is gathered by hooks around the head's call: one
    call gathers it once for the forward and once for the backward of all chunks, whose
    recomputes call the head's forward without hooks; a call per chunk would gather it once per
    chunk, a different number of times on ranks with different answer lengths, and hang.
    Models whose forward changes the logits after the head are refused."""
    import functools

    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):  # Gemma 2, Cohere, Granite
        if getattr(module.config, name, None) not in (None, 1.0):
            raise ValueError(f"{type(module).__name__} changes its logits after the LM head ({name}); "
                             "the learner's log-probs would not be the model's")
    head = module.get_output_embeddings()
    own = functools.partial(type(head).forward, head)
    head.forward = functools.partial(forward, own)
    try:
        yield
    finally:
        del head.forward  # the class's forward again


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
