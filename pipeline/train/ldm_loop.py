"""The Ray Train worker loop of jobs/train_ldm.py, top to bottom:

  set-up: the LatentDiffusion module (UNet + trainable tau, if any) in DeepSpeed, its Conditioner, EMA, noise
  -> restore a checkpoint (DeepSpeed shards + EMA + RNG + data position)
  -> each step: z ~ q(z|x) from the cached posterior, rescaled (§4.3.2), CFG dropout of the condition,
     L_LDM (paper eq. 2) -> NaN guard -> DeepSpeed backward/step -> EMA
  -> periodic work: the step line and metrics, a sample grid (EMA model, DDIM + CFG), a checkpoint
  -> at the end a checkpoint holding the consolidated safetensors export.

The frozen autoencoder and text encoder stay outside DeepSpeed. MLflow is written by rank 0 only, and a
tracking server that goes away costs a warning, never the run.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from ldm.autoencoder import DiagonalGaussian
from ldm.conditioning import Conditioner, drop_mask
from ldm.config import LDMConfig, to_dict
from ldm.diffusion import Schedule, diffusion_loss, sample_noise, sample_timesteps
from ldm.latent_scale import LatentScale
from ldm.model import LatentDiffusion
from pipeline.common.errors import NonFiniteLoss
from pipeline.train.checkpoints import harden_deepspeed, load_deepspeed, read_state, safe_load
from pipeline.train.kit import Progress, Worker, WorkerRun, restore_checkpoint, save_checkpoint
from pipeline.train.options import TrainOptions, load_deepspeed_preset, lr_lambda
from pipeline.train.sharded_ema import RankZeroEMA, ShardedEMA, build_ema


@dataclass(frozen=True)
class LDMJob:
    """Everything a worker needs, typed: the job's options, the model config, and what the driver read from the
    latent cache."""
    opts: TrainOptions
    cfg: LDMConfig
    run: WorkerRun
    precision: str                       # fp32 | bf16 | autocast (resolved by the driver)
    latent_shape: tuple[int, int, int]
    latent_scale: LatentScale
    sample_prompts: tuple  # captions, class ids, or low-res images (h, w, 3 uint8)
    autoencoder: str                     # first stage for the sample grids
    autoencoder_identity: dict           # the cache's, stored in the export
    text_encoder: str                    # frozen text encoder folder ("" = the offline MiniLM)
    text_encoder_identity: dict
    data: "TrainData"
    run_name: str = ""                   # the run dir's name, kept in checkpoints (a new phase tells its start)


@dataclass(frozen=True)
class TrainData:
    """The latent cache as the workers read it (pipeline/train/epoch_plan.py): its parts, their rows, the
    columns a step needs, whether a worker keeps the parts it has read, --filter with the rows of each part
    it keeps (counted by the driver), and the units the epoch plan orders: each a shard's parts (a bucketed
    cache: a shard's parts of one bucket), read as one table in key order."""
    files: tuple[str, ...]
    rows: tuple[int, ...]
    columns: tuple[str, ...]
    keep: bool
    filter: str = ""
    filtered_rows: tuple[int, ...] = ()
    buckets: tuple[tuple[int, int], ...] = ()  # each part's aspect bucket (h, w) in pixels; () = square crops
    rename: tuple[tuple[str, str], ...] = ()   # another resolution's latent columns -> the names a step reads
    scale: int = 1                       # that resolution / the cache's first (crop offsets are the first's)
    units: tuple[tuple[int, ...], ...] = ()  # part indices of each unit; () = every part its own unit
    # CPUs per read task. An elastic run asks none: Ray Train places as many workers as the nodes hold, so a node may
    # keep less than a whole CPU free, and a 1-CPU read task would wait for one forever. A read decompresses a part
    # of latents, light beside the step.
    read_cpus: float = 1.0

    def batches(self, o: TrainOptions, w: "Worker"):
        """This worker's data streams (epoch_plan.Streams), each planned over the run's `o.data_streams`."""
        from pipeline.train.epoch_plan import (BucketedBatches, KeyOrderedUnits, PlannedBatches, RayDataParts,
                                               Streams)
        from pipeline.train.row_filter import RowFilter
        flt = RowFilter.parse(self.filter)
        rows = self.filtered_rows if flt else self.rows
        units = self.units or tuple((p,) for p in range(len(self.files)))
        sort = "key" not in self.columns  # the key orders a unit's rows and is dropped after
        reader = RayDataParts(self.files, self.rows, self.columns + (("key",) if sort else ()), self.keep, flt,
                              self.filtered_rows, dict(self.rename), self.read_cpus)
        reader = KeyOrderedUnits(reader, units, drop_key=sort)
        unit_rows = [sum(rows[p] for p in u) for u in units]
        if self.buckets:
            def make(stream):
                return BucketedBatches(reader, unit_rows, [self.buckets[u[0]] for u in units], o.data_streams,
                                       stream, o.batch_size, o.shuffle_buffer, o.seed, log=w.say)
        else:
            def make(stream):
                return PlannedBatches(reader, unit_rows, o.data_streams, stream, o.batch_size, o.shuffle_buffer,
                                      o.seed, log=w.say)
        return Streams(make, o.data_streams, w.world, w.rank)


def import_deepspeed(cpu: bool):
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # skip the ~150 s JIT build of DeepSpeed's CPU shared-memory all-reduce; gloo does the work here
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed
    return deepspeed


def deepspeed_config(o: TrainOptions, precision: str, world: int, cuda: bool) -> dict:
    ds = load_deepspeed_preset(o.zero_stage, o.deepspeed_config or None)
    # ZeRO-2/3 copy each gradient into one contiguous buffer as backward makes it: it spares a GPU's allocator
    # fragmentation and costs a CPU step ~5% (demo LDM on 2 cores: 0.89x -> 0.94x of the bare step, paired medians;
    # bench/train_throughput.py), so it is on where the device is CUDA unless --deepspeed-config says otherwise
    if o.zero_stage >= 2:
        ds["zero_optimization"].setdefault("contiguous_gradients", cuda)
    micro = o.batch_size * (o.data_streams or world) // world  # --batch-size rows from each data stream it hosts
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = o.grad_accum
    ds["train_batch_size"] = micro * o.grad_accum * world
    ds["gradient_clipping"] = o.grad_clip
    # torch's fused AdamW over ZeRO's flat partition: a fraction of the per-tensor loop's cost (docs/measurements.md)
    ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True, "fused": True}})
    ds["optimizer"]["params"]["lr"] = o.lr
    ds["optimizer"]["params"]["weight_decay"] = o.weight_decay
    if precision == "bf16":
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
    elif precision == "autocast":  # fp32 weights and optimizer, bf16 matmuls/convs under torch.autocast
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if o.offload and o.zero_stage >= 1:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if o.zero_stage == 3:
            ds["zero_optimization"]["offload_param"] = {"device": "cpu"}
    return ds


def full_state(engine, stage: int) -> dict[str, torch.Tensor]:
    """The whole module's weights in fp32 on the CPU (ZeRO-3: gathered, a collective every rank joins)."""
    import deepspeed
    gather = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None) if stage == 3
              else contextlib.nullcontext())
    with gather:
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in engine.module.state_dict().items()}


def _split(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_checkpoint(d: str, *, t: "Trainee", state: dict, job: "LDMJob", w: "Worker") -> None:
    load_deepspeed(t.engine, d, w.world, w.log)  # re-partitioned when another number of workers wrote it
    saved = read_state(d)
    state.update(saved)
    here = job.latent_shape[-1] * job.cfg.autoencoder.downsample_factor
    if job.run.phase_start and saved.get("run") != job.run_name:  # --resume-from: a new phase starts here
        state.update(epoch=0, batch_in_epoch=0)
        w.say(f"new phase at {here}px from a run at {saved.get('resolution', '?')}px (step {saved['step']}): weights, "
              f"optimizer, EMA and step carried over; the data position restarts")
    if saved.get("world", w.world) != w.world:
        w.say(f"checkpoint written by {saved['world']} worker(s), continued on {w.world}: the same "
              f"{job.opts.data_streams} data stream(s), so the same global batches")
    state.update(resolution=here, run=job.run_name, world=w.world, data_streams=job.opts.data_streams)
    for s, gen in t.gens.items():  # each data stream's noise goes on where it stopped, whichever worker hosts it
        rng = next((f for f in (os.path.join(d, f"rng_stream{s}.pt"), os.path.join(d, f"rng_rank{s}.pt"))
                    if os.path.exists(f)), None)
        if rng:
            gen.set_state(safe_load(rng))
    for e in (t.ema, *t.posthoc):
        e.load(d)


def export(job: LDMJob, engine, ema: RankZeroEMA | ShardedEMA, rank: int, step: int, out_dir: str) -> str | None:
    """Rank 0: consolidated safetensors (UNet, EMA UNet, trained text transformer), the config, the latent scale
    and the identities of the first stage and text encoder. Every rank calls it (ZeRO-3 gathers)."""
    from ldm.checkpoint import save_components
    if rank != 0 and job.opts.zero_stage != 3:  # ZeRO-3 ranks still join the gathers
        return None
    full = full_state(engine, job.opts.zero_stage)
    shadow = ema.full()
    if rank != 0:
        return None
    shadow = {k: v.cpu() for k, v in shadow.items()}
    comps = {"unet": _split(full, "unet."), "ema_unet": _split(shadow, "unet.")}
    if engine.module.cond_stage is not None:
        comps["cond_stage"] = _split(full, "cond_stage.")
        comps["ema_cond_stage"] = _split(shadow, "cond_stage.")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.safetensors")
    meta = {"step": str(step), "latent_scale": job.latent_scale.to_json(), "precision": job.precision,
            "latent_shape": json.dumps(list(job.latent_shape)),
            "autoencoder": json.dumps(job.autoencoder_identity), "text_encoder": json.dumps(job.text_encoder_identity),
            "mlflow_run_id": job.run.mlflow_run_id or "",  # jobs/evaluate.py files its run under this one
            "buckets": json.dumps(sorted({tuple(b) for b in job.data.buckets}))}  # sample.py --size picks one
    save_components(path, comps, to_dict(job.cfg), meta)
    return path


def checkpoint(job: LDMJob, w: Worker, t: "Trainee", state: dict, metrics: dict, final: bool = False) -> None:
    with save_checkpoint(w, metrics, every_rank_writes=True) as d:
        t.engine.save_checkpoint(d, tag="ds", client_state={"step": state["step"]})
        for s, gen in t.gens.items():
            torch.save(gen.get_state(), os.path.join(d, f"rng_stream{s}.pt"))
        t.ema.save(d)  # ema.pt from rank 0, or (ZeRO-3) every rank's ema_rank{r}.pt
        for e in t.posthoc:
            e.save(d)
        snapshot = posthoc_snapshot(t, w.rank, state["step"], d) if t.posthoc else None
        if w.rank == 0:
            with open(os.path.join(d, "train_state.json"), "w") as f:
                json.dump(state, f)
        path = export(job, t.engine, t.ema, w.rank, state["step"], os.path.join(d, "export")) if final else None
        if path:
            w.tracker.artifact(path, "model")
        if snapshot:  # kept in MLflow too, where pruning old checkpoints does not reach it
            w.tracker.artifact(snapshot, "posthoc_ema")


def posthoc_snapshot(t: "Trainee", rank: int, step: int, d: str) -> str | None:
    """EDM2's snapshot: every post-hoc EMA profile, whole (gathered at ZeRO-3: every rank joins), in one safetensors
    file (keys `{sigma_rel}/{name}`, metadata: the step and each profile's number of updates); rank 0 -> its path."""
    from safetensors.torch import save_file
    wholes = [(e, e.full()) for e in t.posthoc]
    if rank != 0:
        return None
    tensors = {f"{e.ema.sigma_rel:g}/{k}": v.detach().cpu().contiguous() for e, sd in wholes for k, v in sd.items()}
    meta = {"step": str(step), "updates": json.dumps({f"{e.ema.sigma_rel:g}": e.num_updates for e, _ in wholes})}
    path = os.path.join(d, f"posthoc_ema_step{step:07d}.safetensors")
    save_file(tensors, path, meta)
    return path


class EMAImages:
    """Rank 0: images from the EMA weights (DDIM + CFG at the job's grid settings), decoded by the first stage
    (loaded on first use). Feeds the sample grids and the in-training evaluation."""

    def __init__(self, job: LDMJob, w: Worker, conditioner: Conditioner):
        self.job, self.w, self.conditioner, self.first_stage = job, w, conditioner, None

    def decoder(self):
        from pipeline.common.models import load_autoencoder
        if self.first_stage is None:
            self.first_stage = load_autoencoder(self.job.autoencoder, tracking_uri=self.job.opts.mlflow_uri)
            self.first_stage.model.to(self.w.device)
        return self.first_stage

    @torch.no_grad()
    def __call__(self, ema: dict, prompts: list, seeds: list[int] | None = None) -> torch.Tensor:
        from ldm.sampling import generate
        job, o, dev = self.job, self.job.opts, self.w.device
        net = LatentDiffusion(job.cfg).to(dev).eval()
        net.load_state_dict({k: v.to(net.state_dict()[k].dtype) for k, v in ema.items()}, strict=False)
        if self.conditioner.encode is None:  # a kind that encodes images (inpainting's held-out images and masks)
            from ldm.autoencoder import pixel_encoder
            self.conditioner.encode = pixel_encoder(self.decoder().model)
        return generate(net, self.conditioner, job.latent_scale, self.decoder().model.decode, prompts,
                        job.latent_shape, Schedule.from_config(job.cfg.diffusion).alphas_cumprod,
                        steps=o.sample_steps, cfg_scale=o.cfg_scale, seed=o.sample_seed,
                        parameterization=job.cfg.diffusion.prediction, device=dev, seeds=seeds).cpu()


def sample_grid(make: EMAImages, ema: dict, step: int) -> None:
    """A grid from the fixed prompts and seed, logged to MLflow with its prompts."""
    from pipeline.evaluate.grid import save_grid
    job, w = make.job, make.w
    images = make(ema, list(job.sample_prompts))
    d = tempfile.mkdtemp()
    path = save_grid(images, os.path.join(d, f"step_{step:07d}.png"), nrow=min(8, len(images)))
    with open(os.path.join(d, "prompts.txt"), "w") as f:
        f.write("\n".join(make.conditioner.kind.describe(p, i) for i, p in enumerate(job.sample_prompts)))
    w.tracker.artifact(path, "samples")
    w.tracker.artifact(os.path.join(d, "prompts.txt"), "samples")
    guidance = f"cfg {job.opts.cfg_scale}" if make.conditioner.guided else "no guidance"
    w.say(f"step {step}: sample grid {os.path.basename(path)} ({len(images)} prompts, {guidance})")


class SampleEval:
    """Rank 0, every --eval-every steps: FD and KID (EffNet-Lite0 features) of --eval-samples images generated
    from a fixed held-out subset's conditioning with fixed seeds, against that subset's real images."""

    def __init__(self, make: EMAImages):
        from pipeline.evaluate.held_out import read_held_out
        from pipeline.evaluate.scores import SampleScores, load_feature_net
        o = make.job.opts
        self.make = make
        # at the cache's resolution, latent size x f (a convolutional first stage may encode beyond its own)
        res = make.job.latent_shape[-1] * make.decoder().cfg.downsample_factor
        kind, cfg = make.conditioner.kind, make.job.cfg
        held = read_held_out(o.eval_input, res, o.eval_samples, **kind.held_out_reads(cfg))
        self.prompts = kind.held_out(cfg, held)
        self.scores = SampleScores(load_feature_net(), held.images)

    def __call__(self, ema: dict, step: int) -> dict:
        from pipeline.evaluate.scores import format_scores, from_uint8, to_uint8
        images = from_uint8(to_uint8(self.make(ema, self.prompts, seeds=list(range(len(self.prompts))))))
        r = self.scores.score(images, seed=0)
        for key in ("fd", "kid", "is"):
            self.make.w.tracker.metric(r["names"][key], r[key], step)
        for key in ("precision", "recall"):
            if key in r:
                self.make.w.tracker.metric(f"eval_{key}", r[key], step)
        self.make.w.say(f"step {step}: {format_scores(r)} ({len(images)} samples vs held-out images)")
        return r


class NanGuard:
    """One rule for non-finite values, counted in optimizer steps. A micro-batch whose loss is not finite is set
    aside before backward (on every rank) and the next batch takes its place; a step whose gradients DeepSpeed
    finds non-finite is not applied and its losses are dropped. Since the last applied step, --grad-accum set-aside
    micro-batches (or part of them) count as one skipped step, and each step not applied as one; `skipped_steps`
    and --nan-tolerance (skipped steps in a row) count those."""

    def __init__(self, tolerance: int, grad_accum: int, state: dict, w: Worker):
        self.tolerance, self.grad_accum, self.state, self.w = tolerance, grad_accum, state, w
        self.set_aside = self.not_applied = 0  # since the last applied step

    @property
    def in_a_row(self) -> int:
        return -(-self.set_aside // self.grad_accum) + self.not_applied

    def finite(self, loss: torch.Tensor) -> bool:
        """Every rank agrees before anyone calls backward (the flag lives on the loss's device: NCCL reduces
        CUDA tensors only)."""
        ok = torch.isfinite(loss.detach()).float().reshape(1)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() < 1:
            before = self.in_a_row
            self.set_aside += 1
            self._count(self.in_a_row - before, "non-finite loss, micro-batch set aside", "non-finite losses")
        return ok.item() >= 1

    def applied(self, applied: bool) -> bool:
        """After an optimizer step: False (and counted) when DeepSpeed skipped it for non-finite gradients."""
        if applied:
            self.set_aside = self.not_applied = 0
            return True
        self.not_applied += 1
        self._count(1, "non-finite gradient, step not applied", "non-finite gradient steps")
        return False

    def _count(self, new_steps: int, what: str, plural: str) -> None:
        self.state["skipped_steps"] += new_steps
        self.w.tracker.metric("skipped_steps", self.state["skipped_steps"], self.state["step"])
        self.w.say(f"after step {self.state['step']}: {what} ({self.in_a_row} skipped step(s) in a row, "
                   f"{self.state['skipped_steps']} in all)")
        if self.in_a_row >= self.tolerance:
            self.w.tracker.flush()
            raise NonFiniteLoss(f"{self.in_a_row} {plural} in a row at step {self.state['step']} (limit "
                                f"--nan-tolerance {self.tolerance}); stopping. The last good checkpoint is intact: "
                                f"lower the learning rate or check the latent cache for NaN/Inf, then --resume")


def flipped_posterior(batch: dict, p: float, gen, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' cached posterior (mean, std), each row mirrored left-right with probability p: the latent the
    encoder made of the mirrored image (--flip-latents), the caption left as is."""
    mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
    if p <= 0:
        return mean, std
    flip = (torch.rand(mean.shape[0], generator=gen, device=device) < p)[:, None]
    return (torch.where(flip, batch["latent_flip_mean"].to(device), mean),
            torch.where(flip, batch["latent_flip_std"].to(device), std))


def ldm_inputs(batch: dict, job: LDMJob, conditioner: Conditioner, schedule: Schedule, gen, device) -> tuple:
    """One data stream's share of a micro-step, every draw from that stream's generator (so a stream's noise does
    not depend on which worker hosts it): z ~ q(z|x) from the cached posterior rescaled to unit variance (§4.3.2),
    the condition with classifier-free-guidance drops, t and eps of eq. 2."""
    shape = job.latent_shape
    if "target_h" in batch:  # an aspect bucket's batch: its latents have the bucket's shape
        f = job.cfg.autoencoder.downsample_factor
        shape = (shape[0], int(batch["target_h"][0]) // f, int(batch["target_w"][0]) // f)
    if job.data.scale > 1 and "crop_top" in batch:  # micro-conditioning: crop offsets at this resolution
        k = job.data.scale
        batch = {**batch, "crop_top": batch["crop_top"] * k, "crop_left": batch["crop_left"] * k}
    mean, std = flipped_posterior(batch, job.opts.flip_prob, gen, device)
    posterior = DiagonalGaussian(mean=mean.float().view(-1, *shape), std=std.float().view(-1, *shape))
    z0 = job.latent_scale.to_diffusion(posterior.sample(gen))
    drop = drop_mask(z0.shape[0], job.cfg.conditioning.cond_drop_prob, gen, device)
    cond = conditioner.batch(batch, drop, gen)
    t = sample_timesteps(z0.shape[0], schedule, gen, device)
    return z0, t, sample_noise(z0, job.cfg.diffusion.offset_noise, gen), cond


def ldm_loss(engine, chunks: list[tuple[int, dict]], job: LDMJob, conditioner: Conditioner, schedule: Schedule,
             gens: dict, device):
    """L_LDM (eq. 2) over this worker's streams' batches, `chunks` = (stream, batch) pairs, in one forward."""
    parts = [ldm_inputs(batch, job, conditioner, schedule, gens[s], device) for s, batch in chunks]
    z0, t, noise = (torch.cat([p[i] for p in parts]) for i in range(3))
    conds = [p[3] for p in parts]
    cond = {k: torch.cat([c[k] for c in conds]) if isinstance(v, torch.Tensor) else v for k, v in conds[0].items()}
    return diffusion_loss(engine, z0, job.cfg.diffusion, schedule, t=t, noise=noise, **cond).mean(), z0.shape[0]


def log_step(w: Worker, progress: Progress, state: dict, loss: float, engine, lr: float, every: int) -> None:
    step = state["step"]
    for k, v in (("loss", loss), ("lr", lr), ("samples_per_s", progress.rate()),
                 ("images_seen", state["images_seen"]), ("skipped_steps", state["skipped_steps"])):
        w.tracker.metric(k, v, step)
    gn = engine.get_global_grad_norm()
    if gn is not None and math.isfinite(float(gn)):
        w.tracker.metric("grad_norm", float(gn), step)
    if progress.due(every):
        w.say(progress.line(f"images {state['images_seen']} | loss {loss:.4f} | lr {lr:.2e} | "
                            f"skipped {state['skipped_steps']}"))
        w.tracker.flush()


@dataclass
class Trainee:
    """What a worker trains with: DeepSpeed's engine and LR schedule, the conditioner, the EMA (ZeRO-3: this rank's
    partition of it; below: rank 0's whole one), the noise."""
    engine: object
    lr_sched: object
    conditioner: Conditioner
    ema: RankZeroEMA | ShardedEMA
    schedule: Schedule
    gens: dict[int, torch.Generator]      # the noise of each data stream this worker hosts
    posthoc: list                         # --posthoc-ema: EDM2's power-function EMA profiles, kept like the EMA

    @classmethod
    def build(cls, job: LDMJob, w: Worker) -> "Trainee":
        o = job.opts
        deepspeed = import_deepspeed(cpu=w.device.type == "cpu")
        deepspeed.init_distributed(dist_backend="nccl" if w.device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False)
        torch.manual_seed(o.seed)  # same initial weights on every rank
        model = LatentDiffusion(job.cfg)
        init = None
        if o.init_from:  # a new run's starting weights (a restored checkpoint replaces them)
            from pipeline.train.init_weights import load_init
            init = load_init(o.init_from, o.mlflow_uri)
            model.load_state_dict(init.weights, strict=True)
        conditioner = Conditioner.build(model, job.text_encoder, w.device, job.latent_scale)
        if o.compile:  # in place: the UNet's state_dict keys stay as they are for checkpoints and the export
            model.unet.compile()
        engine, _, _, lr_sched = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(o, job.precision, w.world, w.device.type == "cuda"),
            dist_init_required=False,
            lr_scheduler=partial(torch.optim.lr_scheduler.LambdaLR,
                                 lr_lambda=lr_lambda(o.lr_schedule, o.warmup_steps, o.max_steps, o.min_lr_ratio)))
        harden_deepspeed(engine)  # its checkpoint files are read weights-only, like every other file we load
        ema = build_ema(engine, o.zero_stage, w.rank, w.world, o.ema_decay, init.ema if init else None)
        from pipeline.train.epoch_plan import hosted_streams
        gens = {s: torch.Generator(device=w.device).manual_seed(o.seed * 1000 + s)
                for s in hosted_streams(o.data_streams, w.world, w.rank)}
        posthoc = [build_ema(engine, o.zero_stage, w.rank, w.world, o.ema_decay, None, s) for s in o.posthoc_ema]
        return cls(engine, lr_sched, conditioner, ema, Schedule.from_config(job.cfg.diffusion), gens, posthoc)


def restored(job: LDMJob, w: Worker, t: Trainee) -> dict:
    """The run's state (step, images seen, data position): fresh, or a checkpoint's (this run's latest, --resume, or
    another run's for a new phase), with the engine, EMA and noise restored alongside."""
    state = {"step": 0, "images_seen": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_steps": 0,
             "resolution": job.latent_shape[-1] * job.cfg.autoencoder.downsample_factor, "run": job.run_name,
             "world": w.world, "data_streams": job.opts.data_streams}  # the layout a restart reads back
    if restore_checkpoint(job.run, partial(load_checkpoint, t=t, state=state, job=job, w=w), w):
        w.say(f"resumed at step {state['step']} ({state['images_seen']} images seen, epoch {state['epoch']}, "
              f"batch {state['batch_in_epoch']} of it)")
    nodes = w.nodes()
    w.say(f"rank 0 of {w.world}: device {w.device}, {torch.get_num_threads()} torch threads, conditioning "
          f"{t.conditioner.mode}; ranks on {len(set(nodes))} Ray node(s): {' '.join(n[:12] for n in nodes)}")
    if state["step"] >= job.opts.max_steps:
        w.say(f"already at step {state['step']} >= --max-steps {job.opts.max_steps}; nothing to train")
    return state


def train_loop_per_worker(config: dict) -> None:
    job: LDMJob = config["job"]
    o = job.opts
    w = Worker.start(o, job.run, "train")

    # ---- set-up and restore
    t = Trainee.build(job, w)
    state = restored(job, w, t)

    # ---- the loop: micro-steps of L_LDM until an optimizer step is applied, then the periodic work
    progress, guard = Progress(state, o.max_steps), NanGuard(o.nan_tolerance, o.grad_accum, state, w)
    make = EMAImages(job, w, t.conditioner)
    evaluate = SampleEval(make) if w.rank == 0 and o.eval_every else None
    losses, last_loss = [], float("nan")
    data = job.data.batches(o, w)
    # the data position counts a batch as consumed once it is handed out: stop before asking for one more
    for batch in data(state) if state["step"] < o.max_steps else ():
        loss, n = ldm_loss(t.engine, batch, job, t.conditioner, t.schedule, t.gens, w.device)
        if not guard.finite(loss):  # set aside: the next batch takes its place
            continue
        t.engine.backward(loss)
        t.engine.step()
        losses.append(loss.item())
        if len(losses) < o.grad_accum:
            continue
        step_losses, losses = losses, []
        if not guard.applied(t.engine.was_step_applied()):  # non-finite gradients: DeepSpeed skipped the update
            continue
        state["step"] += 1
        state["images_seen"] += n * o.grad_accum * w.world
        last_loss = mean_over_ranks(step_losses, w)  # the mean of the applied step's micro-batches
        step = state["step"]

        # ---- periodic work: EMA, the step line, a sample grid, a checkpoint
        if step % o.ema_every == 0:
            for e in (t.ema, *t.posthoc):
                e.update()  # ZeRO-3: each rank its own partition, no collective
        progress.tick()
        log_step(w, progress, state, last_loss, t.engine, t.lr_sched.get_last_lr()[0], o.log_every)
        ema_images(job, t, make, evaluate, progress)
        if step >= o.max_steps:
            break
        if step % o.checkpoint_every == 0:
            checkpoint(job, w, t, state, metrics(state, last_loss))
    w.tracker.flush()
    w.say(f"data: {data.reader.parts_read} part file(s) read over {data.epochs} epoch(s) begun")
    checkpoint(job, w, t, state, {**metrics(state, last_loss), "steady_samples_per_s": progress.steady(),
                                  "parts_read": data.reader.parts_read, "epochs_begun": data.epochs}, final=True)
    w.tracker.flush()


def ema_images(job: LDMJob, t: Trainee, make: EMAImages, evaluate: SampleEval | None, progress: Progress) -> None:
    """The sample grid and the evaluation when due, from the whole EMA (at ZeRO-3 gathered: every rank joins)."""
    o, step, w = job.opts, progress.state["step"], make.w
    grid = bool(o.sample_every and step % o.sample_every == 0 and job.autoencoder)
    if not (grid or progress.due(o.eval_every)):
        return
    ema = t.ema.full()
    if ema is None:  # not rank 0
        return
    if grid:
        try:
            sample_grid(make, ema, step)
        except Exception as e:  # noqa: BLE001 - a sampling problem must not kill training
            w.say(f"WARNING: sampling at step {step} failed: {type(e).__name__}: {e}")
    if evaluate is not None and progress.due(o.eval_every):
        evaluate(ema, step)


def mean_over_ranks(losses: list[float], w: Worker) -> float:
    mean = torch.tensor([sum(losses) / len(losses)], device=w.device)
    dist.all_reduce(mean)
    return mean.item() / w.world


def metrics(state: dict, loss: float) -> dict:
    return {"step": state["step"], "loss": loss, "images_seen": state["images_seen"],
            "skipped_steps": state["skipped_steps"]}
