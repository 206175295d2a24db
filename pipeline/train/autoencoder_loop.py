"""The Ray Train worker loop of jobs/train_autoencoder.py (paper §3.1, App. G), top to bottom:

  set-up: the autoencoder in DDP (Ray Train `prepare_model`), the PatchGAN discriminator and learned logvar
  (gradients averaged by hand), two Adam optimizers, EMA
  -> restore -> each step: reconstruct, generator loss (rec + perceptual + adaptive-weighted GAN + KL or
     codebook), generator step; discriminator step once `disc_start` is reached; EMA
  -> periodic work: the step line and metrics, a reconstruction grid, a checkpoint
  -> at the end a checkpoint holding a safetensors export directly usable by jobs/encode_latents.py.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from functools import partial

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ldm.autoencoder import AutoencoderKL, build_autoencoder
from ldm.config import AutoencoderConfig, FirstStageLossConfig, to_dict
from ldm.ema import EMA
from ldm.losses import FirstStageLoss
from ldm.metrics import psnr
from pipeline.train.checkpoints import read_state, safe_load
from pipeline.train.kit import Progress, Worker, WorkerRun, batches, restore_checkpoint, save_checkpoint
from pipeline.train.options import AETrainOptions, lr_lambda

BETAS = (0.5, 0.9)  # taming / CompVis stage-1 Adam settings


@dataclass(frozen=True)
class AEJob:
    opts: AETrainOptions
    autoencoder: AutoencoderConfig
    loss: FirstStageLossConfig
    run: WorkerRun


@dataclass
class Stage1:
    """What stage 1 trains: the autoencoder (G), the loss with its discriminator (D) and logvar, and their Adams."""
    ae: torch.nn.Module
    loss: FirstStageLoss
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema: EMA | None

    @classmethod
    def build(cls, job: AEJob, device) -> "Stage1":
        torch.manual_seed(job.opts.seed)  # same initial weights on every rank
        ae = build_autoencoder(job.autoencoder).to(device)
        loss = FirstStageLoss(job.loss, job.autoencoder.reg, job.autoencoder.in_channels).to(device)
        # fused: one kernel over all tensors, a fraction of the per-tensor loop's cost (docs/measurements.md)
        opt_g = torch.optim.Adam(list(ae.parameters()) + [loss.logvar], lr=job.opts.lr, betas=BETAS, fused=True)
        opt_d = torch.optim.Adam(loss.discriminator.parameters(), lr=job.opts.lr, betas=BETAS, fused=True)
        ema = EMA(ae.state_dict(), job.opts.ema_decay) if job.opts.ema_decay > 0 else None
        return cls(ae, loss, opt_g, opt_d, ema)

    def files(self) -> dict:
        """The checkpoint's files; the frozen perceptual net is not saved."""
        out = {"autoencoder.pt": self.ae, "opt_g.pt": self.opt_g, "opt_d.pt": self.opt_d}
        out["loss.pt"] = {k: v for k, v in self.loss.state_dict().items() if not k.startswith("perceptual.")}
        if self.ema is not None:
            out["ema.pt"] = self.ema
        return out

    def load(self, d: str, state: dict, device) -> None:
        for name, part in self.files().items():
            if name == "loss.pt":
                self.loss.load_state_dict(safe_load(os.path.join(d, name), map_location=device), strict=False)
            elif name != "ema.pt" or os.path.exists(os.path.join(d, name)):
                part.load_state_dict(safe_load(os.path.join(d, name), map_location=device))
        state.update(read_state(d))

    def export(self, job: AEJob, step: int, out_dir: str) -> str:
        """The EMA weights (when kept) as an ldm-ray checkpoint that jobs/encode_latents.py --autoencoder reads."""
        from ldm.checkpoint import save_components
        sd = {k: v.detach().cpu() for k, v in self.ae.state_dict().items()}
        if self.ema is not None:
            sd = {k: (self.ema.shadow[k].to("cpu", v.dtype) if k in self.ema.shadow else v) for k, v in sd.items()}
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "autoencoder.safetensors")
        save_components(path, {"autoencoder": sd}, {"autoencoder": to_dict(job.autoencoder), "loss": to_dict(job.loss)},
                        {"step": str(step), "ema": str(self.ema is not None)})
        return path


def _average_grads(params) -> None:
    """Data-parallel mean of gradients for the parts outside DDP (discriminator, logvar)."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def train_step(s: Stage1, model, x: torch.Tensor, step: int, lr: float) -> tuple[dict, torch.Tensor]:
    """One generator step and, from `disc_start` on, one discriminator step (paper App. G; taming's recipe)."""
    _set_lr(s.opt_g, lr)
    _set_lr(s.opt_d, lr)
    if isinstance(s.ae, AutoencoderKL):
        xrec, post = model(x)
        g_loss, logs = s.loss.generator_loss(x, xrec, step, s.ae.decoder.last_layer, posterior=post)
        logs["kl"] = post.kl().mean().detach()
    else:
        xrec, qloss, info = model(x)
        g_loss, logs = s.loss.generator_loss(x, xrec, step, s.ae.decoder.last_layer, codebook_loss=qloss)
        logs["perplexity"], logs["codebook_usage"] = info["perplexity"], info["usage"]
    s.opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    _average_grads([s.loss.logvar])
    s.opt_g.step()
    if s.loss.disc_factor(step) > 0:
        d_loss, dlogs = s.loss.discriminator_loss(x, xrec.detach(), step)
        s.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        _average_grads(s.loss.discriminator.parameters())
        s.opt_d.step()
        logs.update(dlogs)
    if s.ema is not None:
        s.ema.update(s.ae.state_dict())
    with torch.no_grad():
        logs["psnr"] = psnr(xrec.clamp(-1, 1), x).mean()
    return {k: float(v) for k, v in logs.items()}, xrec


def recon_grid(w: Worker, ae: torch.nn.Module, cfg: AutoencoderConfig, x: torch.Tensor, step: int) -> None:
    """Rank 0: input | reconstruction pairs of a training batch."""
    from pipeline.evaluate.grid import save_grid
    n = min(8, x.shape[0])
    with torch.no_grad():
        out = ae(x[:n]) if cfg.reg == "vq" else ae(x[:n], sample_posterior=False)
    rows = torch.stack([x[:n], out[0].clamp(-1, 1)], 1).flatten(0, 1)
    path = os.path.join(tempfile.mkdtemp(), f"recon_{step:07d}.png")
    save_grid(rows.cpu(), path, nrow=2 * min(4, n), upscale=max(1, 64 // cfg.resolution))
    w.tracker.artifact(path, "reconstructions")


def checkpoint(job: AEJob, w: Worker, s: Stage1, state: dict, metrics: dict, final: bool = False) -> None:
    with save_checkpoint(w, metrics, every_rank_writes=False) as d:  # DDP: equal weights, rank 0 writes one copy
        if d is None:
            return
        for name, part in s.files().items():
            torch.save(part if isinstance(part, dict) else part.state_dict(), os.path.join(d, name))
        with open(os.path.join(d, "train_state.json"), "w") as f:
            json.dump(state, f)
        if final:
            w.tracker.artifact(s.export(job, state["step"], os.path.join(d, "export")), "model")


def ae_train_loop(config: dict) -> None:
    job: AEJob = config["job"]
    o, cfg = job.opts, job.autoencoder
    w = Worker.start(o, job.run, "stage1")

    # ---- set-up
    s = Stage1.build(job, w.device)
    lr_at = lr_lambda(o.lr_schedule, o.warmup_steps, o.max_steps, o.min_lr_ratio)
    state = {"step": 0, "images_seen": 0, "epoch": 0, "batch_in_epoch": 0}

    # ---- restore, then DDP across workers (gloo on CPU, NCCL on GPU)
    if restore_checkpoint(job.run, partial(s.load, state=state, device=w.device), w):
        w.say(f"resumed at step {state['step']} ({state['images_seen']} images seen)")
    model = ray.train.torch.prepare_model(s.ae)

    # ---- the loop
    progress = Progress(state, o.max_steps)
    logs = {}
    shard = ray.train.get_dataset_shard("train")
    stream = batches(shard, state, o.batch_size, o.shuffle_buffer, o.seed, w.rank)
    # the data position counts a batch as consumed once it is handed out: stop before asking for one more
    for batch in stream if state["step"] < o.max_steps else ():
        x = batch["image"].to(w.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        logs, _ = train_step(s, model, x, state["step"], o.lr * lr_at(state["step"]))
        state["step"] += 1
        state["images_seen"] += x.shape[0] * w.world
        step = state["step"]

        # ---- periodic work: metrics and the step line, a reconstruction grid, a checkpoint
        progress.tick()
        for k, v in {**logs, "samples_per_s": progress.rate(), "lr": o.lr * lr_at(step - 1)}.items():
            w.tracker.metric(k, v, step)
        if progress.due(o.log_every):
            w.say(progress.line(f"rec {logs['rec_loss']:.4f} | psnr {logs['psnr']:.2f} dB | g {logs['g_loss']:.3f} "
                                f"| d {logs.get('d_loss', 0.0):.3f}"))
            w.tracker.flush()
        if w.rank == 0 and o.sample_every and step % o.sample_every == 0:
            recon_grid(w, s.ae, cfg, x, step)
        if step >= o.max_steps:
            break
        if step % o.checkpoint_every == 0:
            checkpoint(job, w, s, state, {"step": step, "rec_loss": logs["rec_loss"], "psnr": logs["psnr"]})
    w.tracker.flush()
    checkpoint(job, w, s, state, {"step": state["step"], "images_seen": state["images_seen"],
                                  "steady_samples_per_s": progress.steady()}, final=True)
    w.tracker.flush()
