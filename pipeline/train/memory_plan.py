"""What one training worker holds, planned before launch: bytes per worker for the weights, gradients, optimizer
state, EMA and activations of a model config at a ZeRO stage, world size, batch and precision.

The model's parameters are counted on PyTorch's meta device (no memory); the activations are the tensors autograd
saves for backward in one traced forward of the UNet at the run's latent size, also on the meta device, with
attention as a fused (flash) kernel saves it. Activation checkpointing keeps each checkpointed block's inputs instead
of its insides, plus one block's insides while that block is recomputed.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

GiB = 2 ** 30
FRAMEWORK = {"cpu": 0.5 * GiB, "cuda": 1.0 * GiB}  # the process itself: torch, DeepSpeed (and a CUDA context)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per worker. Resident: the process, weights, optimizer state (fp32 master and Adam's moments) and EMA.
    The peak adds, at its larger moment, either backward's (activations and gradients) or the optimizer step's
    (gradients, their fp32 partition and the update's temporaries: `step`)."""
    params: int
    grads: int
    optimizer: int
    ema: int
    activations: int
    framework: int
    step: int = 0

    @property
    def resident(self) -> int:
        return self.framework + self.params + self.optimizer + self.ema

    @property
    def total(self) -> int:
        return self.resident + self.grads + max(self.activations, self.step)

    def row(self) -> dict[str, float]:
        return {k: getattr(self, k) / GiB for k in ("params", "grads", "optimizer", "ema", "activations", "step",
                                                     "framework", "total")}


def count_params(cfg) -> tuple[int, int]:
    """(trainable, frozen) parameters of the LatentDiffusion module DeepSpeed trains, counted on the meta device."""
    return _counts(_meta_model(cfg))


def _meta_model(cfg):
    from ldm.model import LatentDiffusion
    with torch.device("meta"):
        return LatentDiffusion(cfg)


def _counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


@contextmanager
def _flash_attention():
    """Attention traced as a fused kernel (saves q, k, v, the output and a log-sum-exp, not the attention matrix)."""
    import torch.nn.functional as F
    plain = F.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            return plain(q, k, v, attn_mask=attn_mask, **kw)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]
    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain


def activation_bytes(cfg, batch: int, latent_hw: tuple[int, int], dtype: torch.dtype, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward in one UNet forward of `batch` latents (the peak of a training step's
    activations), traced on the meta device."""
    from dataclasses import replace

    from ldm.unet import ResBlock, UNetModel
    from ldm.attention import BasicTransformerBlock
    u = replace(cfg.unet, grad_checkpointing=False)
    with torch.device("meta"):
        unet = UNetModel(u).to(dtype)
    seen: dict[int, int] = {p.untyped_storage()._cdata: 0 for p in unet.parameters()}  # weights are not activations
    inside: list = []            # the checkpointable block running now (outermost)
    per_block: dict[int, int] = {}
    block_inputs: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        key = s._cdata
        if key not in seen:
            seen[key] = s.nbytes()
            if inside:
                per_block[id(inside[0])] = per_block.get(id(inside[0]), 0) + s.nbytes()
        return t

    def enter(m, args):
        if not inside:
            x = args[0]
            block_inputs[id(m)] = x.untyped_storage().nbytes()
        inside.append(m)

    def leave(m, args, out):
        inside.pop()
    for m in unet.modules():
        if isinstance(m, (ResBlock, BasicTransformerBlock)):
            m.register_forward_pre_hook(enter)
            m.register_forward_hook(leave)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _flash_attention():
        unet(*_inputs(u, batch, latent_hw, dtype))
    total = sum(seen.values())
    if not checkpointing:
        return total
    outside = total - sum(per_block.values())
    return outside + sum(block_inputs.values()) + max(per_block.values(), default=0)


def _inputs(u, batch: int, hw: tuple[int, int], dtype) -> tuple:
    with torch.device("meta"):
        x = torch.empty(batch, u.in_channels, *hw, dtype=dtype, requires_grad=False)
        t = torch.zeros(batch, dtype=torch.long)
        ctx = torch.empty(batch, 77, u.context_dim, dtype=dtype) if u.context_dim else None
        y = (torch.zeros(batch, dtype=torch.long) if u.num_classes else
             torch.empty(batch, u.adm_in_channels, dtype=dtype) if u.adm_in_channels else None)
        micro = torch.empty(batch, 6) if u.micro_cond else None
    return x, t, ctx, y, None, None, micro


def plan(cfg, *, zero_stage: int, workers: int, batch: int, latent_hw: tuple[int, int], precision: str,
         checkpointing: bool | None = None, device: str = "cuda", ema: bool = True) -> MemoryPlan:
    """The worst worker's bytes (rank 0: it also holds the whole EMA below ZeRO-3). `batch` is the worker's
    micro-batch; `precision` fp32 | bf16 | autocast (fp32 weights, bf16 activations)."""
    model = _meta_model(cfg)
    n, frozen = _counts(model)
    w = max(1, workers)
    low = 2 if precision == "bf16" else 4                   # weights and gradients as the model holds them
    shard = w if zero_stage >= 3 else 1
    params = (n + frozen) * low // shard
    if zero_stage >= 3:  # a gathered block's full weights while it runs
        params += _largest_block(model.unet) * low
    grads = n * low // (w if zero_stage >= 2 else 1)
    opt_shard = w if zero_stage >= 1 else 1
    # Adam's two fp32 moments, and an fp32 master copy wherever DeepSpeed keeps one (ZeRO 1-3, or bf16 weights)
    optimizer = n * (8 + (4 if zero_stage >= 1 or precision == "bf16" else 0)) // opt_shard
    step = 2 * 4 * n // opt_shard  # the step: the fp32 gradient partition, and the fused update's temporaries
    ema_bytes = (4 * n // (w if zero_stage >= 3 else 1)) if ema else 0
    act_dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    ckpt = cfg.unet.grad_checkpointing if checkpointing is None else checkpointing
    act = activation_bytes(cfg, batch, latent_hw, act_dtype, ckpt)
    if precision == "autocast":  # torch.autocast keeps a bf16 copy of each weight it casts, for the step
        act += 2 * (n + frozen)
    return MemoryPlan(params, grads, optimizer, ema_bytes, act, int(FRAMEWORK.get(device, FRAMEWORK["cuda"])), step)


def _largest_block(unet) -> int:
    blocks = list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks)
    return max(sum(p.numel() for p in b.parameters()) for b in blocks)


def check_fits(cfg, opts, latent_hw: tuple[int, int], log) -> MemoryPlan | None:
    """Before launch: the plan of the worst worker of this run, logged, and a warning when it exceeds what a worker
    has: a GPU's memory (known where this driver sees the GPU kind the workers use) or, on CPUs, the Ray cluster's
    memory shared by the workers. Never stops the run: the plan is an estimate (docs/benchmarks.md measures it)."""
    import ray
    batch = opts.batch_size * (opts.data_streams or opts.num_workers) // opts.num_workers
    device = "cuda" if opts.use_gpu else "cpu"
    try:
        p = plan(cfg, zero_stage=opts.zero_stage, workers=opts.num_workers, batch=batch, latent_hw=latent_hw,
                 precision=opts.precision, device=device)
    except Exception as e:  # noqa: BLE001 - a model the tracer cannot follow still trains
        log(f"[train] no memory plan for this model ({type(e).__name__}: {e})")
        return None
    parts = ", ".join(f"{k} {v:.2f}" for k, v in p.row().items() if k != "total")
    log(f"[train] memory plan per worker (GiB): {parts}; peak {p.total / GiB:.2f}")
    if opts.use_gpu:
        if not torch.cuda.is_available():
            return p
        have, what = torch.cuda.get_device_properties(0).total_memory, f"a {torch.cuda.get_device_name(0)}"
    else:
        have, what = ray.cluster_resources().get("memory", 0) / opts.num_workers, "its share of the cluster's memory"
    if have and p.total > have:
        log(f"[train] WARNING: a worker is planned to need {p.total / GiB:.1f} GiB, more than {what} "
            f"({have / GiB:.1f} GiB): expect an out-of-memory error. Lower --batch-size, raise --zero-stage, train in "
            f"bf16, or set unet.grad_checkpointing=true (python bench/memory_plan.py compares them)")
    return p
