"""The Ray Train worker loop of jobs/train_ldm.py, top to bottom:

  set up DeepSpeed on the LatentDiffusion module (UNet + trainable tau, if any) -> restore a checkpoint
  -> for each step: draw z = mean + std * eps from the cached posterior, scale it, drop captions for CFG,
     L_LDM (paper eq. 2) -> NaN guard -> DeepSpeed backward/step -> EMA -> log
  -> every N steps a checkpoint (DeepSpeed shards + EMA + RNG + data position) reported to Ray Train
  -> every M steps a sample grid (EMA model, DDIM + CFG) -> at the end a consolidated safetensors export.

The frozen autoencoder and text encoder stay outside DeepSpeed. MLflow is written by rank 0 only, and a
tracking server that goes away costs a warning, never the run.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import tempfile
import time
import torch

from ldm.conditioning import apply_drop, drop_mask
from ldm.config import LDMConfig, from_dict, to_dict
from ldm.diffusion import Schedule, diffusion_loss
from ldm.ema import EMA
from ldm.model import LatentDiffusion
from pipeline.checkpoints import harden_deepspeed, read_state, restore, restore_plan, safe_load, seal
from pipeline.errors import CheckpointError, NonFiniteLoss
from pipeline.sample import condition, generate, null_condition
from pipeline.runtime import resumable_batches
from pipeline.train_config import lr_lambda
from pipeline.tracking import Tracker, say as _say


def _import_deepspeed(cpu: bool):
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # skip the ~150 s JIT build of DeepSpeed's CPU shared-memory all-reduce; gloo does the work here
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed
    return deepspeed


def deepspeed_config(opts: dict, world: int, use_gpu: bool) -> dict:
    from pipeline.train_config import load_deepspeed_preset
    ds = load_deepspeed_preset(opts["zero_stage"], opts.get("deepspeed_config") or None)
    ds["train_micro_batch_size_per_gpu"] = opts["batch_size"]
    ds["gradient_accumulation_steps"] = opts["grad_accum"]
    ds["train_batch_size"] = opts["batch_size"] * opts["grad_accum"] * world
    ds["gradient_clipping"] = opts["grad_clip"]
    ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    ds["optimizer"]["params"]["lr"] = opts["lr"]
    ds["optimizer"]["params"]["weight_decay"] = opts["weight_decay"]
    if opts["precision"] == "bf16":
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
    if opts["offload"] and opts["zero_stage"] >= 1:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if opts["zero_stage"] == 3:
            ds["zero_optimization"]["offload_param"] = {"device": "cpu"}
    return ds


def _gathered(engine, stage: int):
    import deepspeed
    if stage == 3:
        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    import contextlib
    return contextlib.nullcontext()


def _full_state(engine, stage: int) -> dict[str, torch.Tensor]:
    with _gathered(engine, stage):
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in engine.module.state_dict().items()}


def _split(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    opts = config["train"]
    cfg: LDMConfig = from_dict(LDMConfig, config["ldm"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = torch.cuda.is_available() and opts["use_gpu"]
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    torch.set_num_threads(max(1, opts["threads_per_worker"]))
    deepspeed = _import_deepspeed(cpu=not use_gpu)
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", auto_mpi_discovery=False)
    stage = opts["zero_stage"]
    log = _say if rank == 0 else (lambda *a: None)
    tracker = Tracker(opts["mlflow_uri"], opts["mlflow_run_id"]) if rank == 0 else Tracker("", "")

    # ---- conditioning: cached embeddings, a frozen encoder on cached tokens, the trained transformer, or class
    cond_cfg = cfg.conditioning
    mode = cond_cfg.kind
    text = None
    if mode == "text":
        if cond_cfg.text_encoder == "transformer":
            mode = "trainable"
        else:
            from ldm.conditioning import FrozenHFTextEncoder
            text = FrozenHFTextEncoder(opts["text_encoder"], cond_cfg.max_length).to(device)
            mode = "cached_emb" if opts["cached_embeddings"] else "frozen"
    torch.manual_seed(opts["seed"])  # same initial weights on every rank
    model = LatentDiffusion(cfg)
    null = null_condition(mode, model, text, device)

    ds_cfg = deepspeed_config(opts, world, use_gpu)
    sched_fn = lr_lambda(opts["lr_schedule"], opts["warmup_steps"], opts["max_steps"], opts["min_lr_ratio"])
    engine, _, _, lr_sched = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched_fn), dist_init_required=False)
    schedule = Schedule.from_config(cfg.diffusion)
    gen = torch.Generator(device=device).manual_seed(opts["seed"] * 1000 + rank)
    ema = EMA(_full_state(engine, stage), opts["ema_decay"]).to(device) if rank == 0 else None
    if stage == 3 and rank != 0:
        _full_state(engine, stage)  # the gather above is collective
    state = {"step": 0, "images_seen": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_steps": 0}

    harden_deepspeed(engine)  # its checkpoint files are read weights-only, like every other file we load

    # ---- restore: this run's latest checkpoint (worker restart), else --resume, else the run dir's newest intact
    def load(d: str) -> None:
        path, _ = engine.load_checkpoint(d, tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"{d} holds no DeepSpeed checkpoint 'ds'")
        state.update(read_state(d))
        rng = os.path.join(d, f"rng_rank{rank}.pt")
        if os.path.exists(rng):
            gen.set_state(safe_load(rng))
        if rank == 0:
            ema.load_state_dict(safe_load(os.path.join(d, "ema.pt")))

    if restore(restore_plan(opts["resume_from"], opts["known_checkpoints"]), load, log):
        log(f"[train] resumed at step {state['step']} ({state['images_seen']} images seen, epoch {state['epoch']}, "
            f"batch {state['batch_in_epoch']} of it)")

    shape = tuple(opts["latent_shape"])
    scale, shift = opts["scale_factor"], opts["shift_factor"]
    ae = None

    def samples(step: int) -> None:
        """Rank 0: a grid from fixed prompts and seeds with the EMA model, DDIM + CFG, decoded."""
        nonlocal ae
        from pipeline.grid import save_grid
        if ae is None:
            from pipeline.models import load_autoencoder
            ae = load_autoencoder(opts["autoencoder"], tracking_uri=opts["mlflow_uri"]).model.to(device)
        net = LatentDiffusion(cfg).to(device).eval()
        net.load_state_dict({k: v.to(net.state_dict()[k].dtype) for k, v in ema.shadow.items()}, strict=False)
        prompts = opts["sample_prompts"]
        cond, uncond = condition(prompts, mode, net, text, null, device)
        images = generate(net, ae.decode, cond, uncond, len(prompts), shape, scale, shift, opts["sample_steps"],
                          opts["cfg_scale"], opts["sample_seed"], device=device).cpu()
        d = tempfile.mkdtemp()
        path = os.path.join(d, f"step_{step:07d}.png")
        save_grid(images, path, nrow=min(8, len(prompts)))
        with open(os.path.join(d, "prompts.txt"), "w") as f:
            f.write("\n".join(str(p) for p in prompts))
        tracker.artifact(path, "samples")
        tracker.artifact(os.path.join(d, "prompts.txt"), "samples")
        log(f"[train] step {step}: sample grid {os.path.basename(path)} ({len(prompts)} prompts, "
            f"cfg {opts['cfg_scale']})")

    def export(step: int, out_dir: str) -> str | None:
        """Consolidated safetensors: UNet, EMA UNet, trained text transformer, config, AE reference."""
        full = _full_state(engine, stage)
        if rank != 0:
            return None
        from ldm.checkpoint import save_components
        shadow = ema.state_dict()["shadow"]
        comps = {"unet": _split(full, "unet."), "ema_unet": _split(shadow, "unet.")}
        if model.cond_stage is not None:
            comps["cond_stage"] = _split(full, "cond_stage.")
            comps["ema_cond_stage"] = _split(shadow, "cond_stage.")
        path = os.path.join(out_dir, "model.safetensors")
        meta = {"step": str(step), "scale_factor": str(scale), "shift_factor": str(shift),
                "latent_shape": json.dumps(list(shape)),
                "autoencoder": json.dumps(opts["autoencoder_identity"]),
                "text_encoder": json.dumps(opts["text_encoder_identity"])}
        save_components(path, comps, {**to_dict(cfg), "scale_factor": scale}, meta)
        return path

    def checkpoint(metrics: dict, final: bool = False) -> None:
        d = tempfile.mkdtemp(prefix="ldm-ckpt-")
        try:
            engine.save_checkpoint(d, tag="ds", client_state={"step": state["step"]})
            torch.save(gen.get_state(), os.path.join(d, f"rng_rank{rank}.pt"))
            if rank == 0:
                torch.save(ema.state_dict(), os.path.join(d, "ema.pt"))
                with open(os.path.join(d, "train_state.json"), "w") as f:
                    json.dump(state, f)
            if final:
                os.makedirs(os.path.join(d, "export"), exist_ok=True)
                path = export(state["step"], os.path.join(d, "export"))
                if path:
                    tracker.artifact(path, "model")
            seal(d, rank, world)  # last: a reader can tell a whole checkpoint from a cut one
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        finally:
            shutil.rmtree(d, ignore_errors=True)

    # ---- the loop
    data = ray.train.get_dataset_shard("train")
    B, acc = opts["batch_size"], opts["grad_accum"]
    t_start, seen_start, step_start = time.time(), state["images_seen"], state["step"]
    consecutive_bad, last_loss = 0, float("nan")
    loss_sum, loss_n = 0.0, 0
    log(f"[train] rank 0 of {world}: device {device}, {torch.get_num_threads()} torch threads, conditioning {mode}")
    if state["step"] >= opts["max_steps"]:
        log(f"[train] already at step {state['step']} >= --max-steps {opts['max_steps']}; nothing to train")
    for batch in resumable_batches(data, state, B, opts["shuffle_buffer"], opts["seed"], rank):
        if state["step"] >= opts["max_steps"]:
            break
        mean = batch["latent_mean"].to(device).float().view(-1, *shape)
        std = batch["latent_std"].to(device).float().view(-1, *shape)
        eps = torch.randn(mean.shape, generator=gen, device=device)
        z0 = (mean + std * eps - shift) * scale  # z ~ q(z|x), rescaled to unit variance (§4.3.2)
        drop = drop_mask(z0.shape[0], cond_cfg.cond_drop_prob, gen, device)  # CFG dropout, at train time
        kw = {}
        if mode == "cached_emb":
            c = batch["text_emb"].to(device).float().view(z0.shape[0], cond_cfg.max_length, -1)
            kw = {"context": apply_drop(c, null["context"], drop),
                  "mask": apply_drop(batch["attention_mask"].to(device).long(), null["mask"], drop)}
        elif mode == "frozen":
            ids, m = batch["input_ids"].to(device).long(), batch["attention_mask"].to(device).long()
            with torch.no_grad():
                c = text.encode(ids, m)
            kw = {"context": apply_drop(c, null["context"], drop), "mask": apply_drop(m, null["mask"], drop)}
        elif mode == "trainable":
            kw = {"input_ids": apply_drop(batch["input_ids"].to(device).long(), null["input_ids"], drop),
                  "mask": apply_drop(batch["attention_mask"].to(device).long(), null["mask"], drop)}
        elif mode == "class":
            kw = {"y": apply_drop(batch["label"].to(device).long(), null["y"], drop)}
        loss = diffusion_loss(engine, z0, cfg.diffusion, schedule, generator=gen, **kw).mean()
        # NaN guard: every rank agrees before anyone calls backward
        ok = torch.isfinite(loss.detach()).float().reshape(1)  # on the loss's device: NCCL reduces CUDA tensors only
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() < 1:
            state["skipped_steps"] += 1
            consecutive_bad += 1
            tracker.metric("skipped_steps", state["skipped_steps"], state["step"])
            log(f"[train] step {state['step']}: non-finite loss, step skipped "
                f"({consecutive_bad} in a row, {state['skipped_steps']} in all)")
            if consecutive_bad >= opts["nan_tolerance"]:
                tracker.flush()
                raise NonFiniteLoss(
                    f"{consecutive_bad} non-finite losses in a row at step {state['step']} (limit "
                    f"--nan-tolerance {opts['nan_tolerance']}); stopping. The last good checkpoint is intact: "
                    f"lower the learning rate or check the latent cache for NaN/Inf, then --resume")
            continue
        engine.backward(loss)
        engine.step()
        loss_sum += loss.item()
        loss_n += 1
        if not engine.is_gradient_accumulation_boundary() and loss_n % acc:
            continue
        if not engine.was_step_applied():  # DeepSpeed saw non-finite gradients and skipped the update
            state["skipped_steps"] += 1
            consecutive_bad += 1
            if consecutive_bad >= opts["nan_tolerance"]:
                raise NonFiniteLoss(f"{consecutive_bad} non-finite gradient steps in a row at step {state['step']}")
            continue
        consecutive_bad = 0
        state["step"] += 1
        state["images_seen"] += z0.shape[0] * acc * world
        step = state["step"]
        mean_loss = torch.tensor([loss_sum / max(1, loss_n)], device=device)
        dist.all_reduce(mean_loss)
        last_loss = mean_loss.item() / world
        loss_sum, loss_n = 0.0, 0
        if ema is not None or stage == 3:
            if step % opts["ema_every"] == 0:
                if stage == 3:
                    full = _full_state(engine, stage)
                    if ema is not None:
                        ema.update(full)
                else:
                    ema.update(engine.module.state_dict())
        elapsed = time.time() - t_start
        rate = (state["images_seen"] - seen_start) / max(1e-9, elapsed)
        lr = lr_sched.get_last_lr()[0]
        gn = engine.get_global_grad_norm()
        tracker.metric("loss", last_loss, step)
        tracker.metric("lr", lr, step)
        tracker.metric("samples_per_s", rate, step)
        tracker.metric("images_seen", state["images_seen"], step)
        tracker.metric("skipped_steps", state["skipped_steps"], step)
        if gn is not None and math.isfinite(float(gn)):
            tracker.metric("grad_norm", float(gn), step)
        if step % opts["log_every"] == 0 or step == opts["max_steps"]:
            eta = (opts["max_steps"] - step) * elapsed / max(1, step - step_start)
            log(f"[train] step {step}/{opts['max_steps']} | images {state['images_seen']} | loss {last_loss:.4f} "
                f"| lr {lr:.2e} | {rate:.1f} samples/s | skipped {state['skipped_steps']} | "
                f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
            tracker.flush()
        if opts["sample_every"] and step % opts["sample_every"] == 0 and rank == 0 and opts["autoencoder"]:
            try:
                samples(step)
            except Exception as e:  # noqa: BLE001 - a sampling problem must not kill training
                log(f"[train] WARNING: sampling at step {step} failed: {type(e).__name__}: {e}")
        metrics = {"step": step, "loss": last_loss, "images_seen": state["images_seen"],
                   "skipped_steps": state["skipped_steps"]}
        if step >= opts["max_steps"]:
            break
        if step % opts["checkpoint_every"] == 0:
            checkpoint(metrics)
    final = {"step": state["step"], "loss": last_loss, "images_seen": state["images_seen"],
             "skipped_steps": state["skipped_steps"]}
    tracker.flush()
    checkpoint(final, final=True)
    tracker.flush()

