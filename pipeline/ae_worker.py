"""The Ray Train worker loop of jobs/train_autoencoder.py (paper §3.1, App. G), top to bottom:

  autoencoder in DDP (Ray Train `prepare_model`), PatchGAN discriminator + learned logvar averaged by hand
  -> restore -> per step: reconstruct, generator loss (rec + perceptual + adaptive-weighted GAN + KL or
     codebook), generator step; discriminator step once `disc_start` is reached; EMA; log
  -> checkpoint every N steps (reported to Ray Train), reconstruction grid every M steps
  -> at the end a safetensors export directly usable by jobs/encode_latents.py --autoencoder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

from ldm.autoencoder import AutoencoderKL, build_autoencoder
from ldm.config import AutoencoderConfig, FirstStageLossConfig, from_dict, to_dict
from ldm.ema import EMA
from ldm.losses import FirstStageLoss
from ldm.metrics import psnr
from pipeline.checkpoints import read_state, restore, restore_plan, safe_load, seal
from pipeline.runtime import resumable_batches
from pipeline.train_config import lr_lambda
from pipeline.tracking import Tracker, say


def _average_grads(params) -> None:
    """Data-parallel mean of gradients for the parts outside DDP (discriminator, logvar)."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def ae_train_loop(config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    opts = config["train"]
    cfg: AutoencoderConfig = from_dict(AutoencoderConfig, config["autoencoder"])
    loss_cfg: FirstStageLossConfig = from_dict(FirstStageLossConfig, config["loss"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, opts["threads_per_worker"]))
    log = say if rank == 0 else (lambda *a: None)
    tracker = Tracker(opts["mlflow_uri"], opts["mlflow_run_id"]) if rank == 0 else Tracker("", "")

    torch.manual_seed(opts["seed"])
    raw = build_autoencoder(cfg).to(device)
    loss_fn = FirstStageLoss(loss_cfg, cfg.reg, cfg.in_channels).to(device)
    betas = (0.5, 0.9)  # taming / CompVis stage-1 settings
    opt_g = torch.optim.Adam(list(raw.parameters()) + [loss_fn.logvar], lr=opts["lr"], betas=betas)
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=opts["lr"], betas=betas)
    sched_fn = lr_lambda(opts["lr_schedule"], opts["warmup_steps"], opts["max_steps"], opts["min_lr_ratio"])
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, sched_fn)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, sched_fn)
    ema = EMA(raw.state_dict(), opts["ema_decay"]) if opts["ema_decay"] > 0 else None
    state = {"step": 0, "images_seen": 0, "epoch": 0, "batch_in_epoch": 0}

    def load(d: str) -> None:
        get = lambda name: safe_load(os.path.join(d, name), map_location=device)  # noqa: E731
        raw.load_state_dict(get("autoencoder.pt"))
        loss_fn.load_state_dict(get("loss.pt"), strict=False)  # frozen perceptual net is not saved
        opt_g.load_state_dict(get("opt_g.pt"))
        opt_d.load_state_dict(get("opt_d.pt"))
        sched_g.load_state_dict(get("sched_g.pt"))
        sched_d.load_state_dict(get("sched_d.pt"))
        if ema is not None and os.path.exists(os.path.join(d, "ema.pt")):
            ema.load_state_dict(get("ema.pt"))
        state.update(read_state(d))

    if restore(restore_plan(opts["resume_from"], opts["known_checkpoints"]), load, log):
        log(f"[stage1] resumed at step {state['step']} ({state['images_seen']} images seen)")
    model = ray.train.torch.prepare_model(raw)  # DDP across workers (gloo on CPU, NCCL on GPU)
    last_layer = raw.decoder.last_layer

    def trainable_loss_state() -> dict:
        return {k: v for k, v in loss_fn.state_dict().items() if not k.startswith("perceptual.")}

    def export(out_dir: str) -> str:
        from ldm.checkpoint import save_components
        sd = {k: v.detach().cpu() for k, v in raw.state_dict().items()}
        if ema is not None:
            sd = {k: (ema.shadow[k].to("cpu", v.dtype) if k in ema.shadow else v) for k, v in sd.items()}
        path = os.path.join(out_dir, "autoencoder.safetensors")
        save_components(path, {"autoencoder": sd}, {"autoencoder": to_dict(cfg), "loss": to_dict(loss_cfg)},
                        {"step": str(state["step"]), "ema": str(ema is not None)})
        return path

    def checkpoint(metrics: dict, final: bool = False) -> None:
        d = tempfile.mkdtemp(prefix="ae-ckpt-")
        try:
            if rank == 0:  # DDP keeps every rank's weights equal: one copy is the checkpoint
                torch.save(raw.state_dict(), os.path.join(d, "autoencoder.pt"))
                torch.save(trainable_loss_state(), os.path.join(d, "loss.pt"))
                torch.save(opt_g.state_dict(), os.path.join(d, "opt_g.pt"))
                torch.save(opt_d.state_dict(), os.path.join(d, "opt_d.pt"))
                torch.save(sched_g.state_dict(), os.path.join(d, "sched_g.pt"))
                torch.save(sched_d.state_dict(), os.path.join(d, "sched_d.pt"))
                if ema is not None:
                    torch.save(ema.state_dict(), os.path.join(d, "ema.pt"))
                with open(os.path.join(d, "train_state.json"), "w") as f:
                    json.dump(state, f)
                if final:
                    os.makedirs(os.path.join(d, "export"))
                    tracker.artifact(export(os.path.join(d, "export")), "model")
                seal(d, 0, 1)  # DDP: rank 0 writes the whole checkpoint
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def recon_grid(x: torch.Tensor, step: int) -> None:
        from pipeline.grid import save_grid
        n = min(8, x.shape[0])
        with torch.no_grad():
            out = raw(x[:n]) if cfg.reg == "vq" else raw(x[:n], sample_posterior=False)
        rows = torch.stack([x[:n], out[0].clamp(-1, 1)], 1).flatten(0, 1)  # input | reconstruction pairs
        path = os.path.join(tempfile.mkdtemp(), f"recon_{step:07d}.png")
        save_grid(rows.cpu(), path, nrow=2 * min(4, n), upscale=max(1, 64 // cfg.resolution))
        tracker.artifact(path, "reconstructions")

    data = ray.train.get_dataset_shard("train")
    B = opts["batch_size"]
    t0, seen0, step0 = time.time(), state["images_seen"], state["step"]
    for batch in resumable_batches(data, state, B, opts["shuffle_buffer"], opts["seed"], rank):
        if state["step"] >= opts["max_steps"]:
            break
        step = state["step"]
        x = batch["image"].to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if isinstance(raw, AutoencoderKL):
            xrec, post = model(x)
            kw = {"posterior": post}
        else:
            xrec, qloss, info = model(x)
            kw = {"codebook_loss": qloss}
        g_loss, logs = loss_fn.generator_loss(x, xrec, step, last_layer, **kw)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        _average_grads([loss_fn.logvar])
        opt_g.step()
        if loss_fn.disc_factor(step) > 0:
            d_loss, dlogs = loss_fn.discriminator_loss(x, xrec.detach(), step)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            _average_grads(loss_fn.discriminator.parameters())
            opt_d.step()
            logs.update(dlogs)
        sched_g.step()
        sched_d.step()
        if ema is not None:
            ema.update(raw.state_dict())
        state["step"] += 1
        state["images_seen"] += x.shape[0] * world
        step = state["step"]
        with torch.no_grad():
            logs["psnr"] = psnr(xrec.clamp(-1, 1), x).mean()
        if cfg.reg == "vq":
            logs["perplexity"], logs["codebook_usage"] = info["perplexity"], info["usage"]
        if cfg.reg == "kl":
            logs["kl"] = post.kl().mean().detach()
        for k, v in logs.items():
            tracker.metric(k, float(v), step)
        rate = (state["images_seen"] - seen0) / max(1e-9, time.time() - t0)
        tracker.metric("samples_per_s", rate, step)
        tracker.metric("lr", sched_g.get_last_lr()[0], step)
        if step % opts["log_every"] == 0 or step == opts["max_steps"]:
            eta = (opts["max_steps"] - step) * (time.time() - t0) / max(1, step - step0)
            log(f"[stage1] step {step}/{opts['max_steps']} | rec {float(logs['rec_loss']):.4f} | psnr "
                f"{float(logs['psnr']):.2f} dB | g {float(logs['g_loss']):.3f} | "
                f"d {float(logs.get('d_loss', 0.0)):.3f} | {rate:.1f} img/s | "
                f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
            tracker.flush()
        if rank == 0 and opts["sample_every"] and step % opts["sample_every"] == 0:
            recon_grid(x, step)
        if step >= opts["max_steps"]:
            break
        if step % opts["checkpoint_every"] == 0:
            checkpoint({"step": step, "rec_loss": float(logs["rec_loss"]), "psnr": float(logs["psnr"])})
    tracker.flush()
    checkpoint({"step": state["step"], "images_seen": state["images_seen"]}, final=True)
    tracker.flush()
