"""The paper's §4.1 study in miniature (jobs/train_autoencoder.py --compare-f): for each downsampling factor f,
the same stage-1 recipe, then (with `ldm_steps`) the whole way on: encode the training shards with that first
stage, train an LDM with the same budget on its latents, and score its samples. One MLflow parent run holds a
child run per stage and a table and a plot of reconstruction PSNR, sample FD and LDM training throughput against
f (the shape of the paper's Fig. 6: small f trains slowly, large f loses detail).

Like demo.py, this module calls several rooms' entry points (train, encode, evaluate); no room calls it.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, replace

from pipeline.train.options import AETrainOptions


@dataclass(frozen=True)
class CompareFOptions:
    ldm_steps: int = 0              # LDM optimizer steps per f (0 = compare reconstructions only)
    ldm_batch_size: int = 32
    ldm_lr: float = 1e-3
    eval_samples: int = 200         # samples per f scored against the held-out images
    sample_steps: int = 25          # DDIM steps of those samples
    cfg_scale: float = 4.0


def ldm_overrides(ae: AETrainOptions, ae_cfg, latent_hw: int, text_dim: int | None) -> tuple[str, ...]:
    """The LDM config for a first stage: its autoencoder section as trained (the cache is checked against it),
    the frozen text encoder's width, and no more UNet downsamplings than the latent size allows (cross-attention
    kept on at least one level)."""
    a, u = ae_cfg.autoencoder, ae_cfg.unet
    out = list(ae.overrides) + [f"autoencoder.reg={a.reg}", f"autoencoder.ch_mult={list(a.ch_mult)}"]
    if text_dim is not None:
        out += ["conditioning.text_encoder=hf", f"unet.context_dim={text_dim}"]
    mult = list(u.channel_mult)
    while len(mult) > 1 and latent_hw % 2 ** (len(mult) - 1):
        mult.pop()
    if len(mult) != len(u.channel_mult):
        levels = {2 ** i for i in range(len(mult))}  # attention_resolutions are downsampling rates
        attn = [r for r in u.attention_resolutions if r in levels] or [max(levels)]
        out += [f"unet.channel_mult={mult}", f"unet.attention_resolutions={attn}"]
    return tuple(out)


def run_compare_f(opts: AETrainOptions, factors: list[int], study: CompareFOptions = CompareFOptions(),
                  log=print) -> dict:
    from pipeline.train.autoencoder_driver import run_train_autoencoder
    parent, client = "", None
    if opts.mlflow_uri:
        import mlflow

        from pipeline.common.tracking import ensure_experiment
        client = mlflow.MlflowClient(opts.mlflow_uri)
        run = client.create_run(ensure_experiment(opts.mlflow_uri, opts.experiment),
                                run_name=f"compare-f {','.join(map(str, factors))}", tags={"sweep": "compare-f"})
        parent = run.info.run_id
    rows = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for f in factors:
        name = f"{opts.name or 'compare'}-{stamp}-f{f}"
        s = run_train_autoencoder(replace(opts, f=f, name=name,
                                          register_model=opts.register_model and f"{opts.register_model}-f{f}"),
                                  log, parent_run_id=parent)
        c, h, w = s["latent_shape"]
        ev = s.get("eval", {})
        row = {"f": f, "latent": f"{c}x{h}x{w}", "latent_numbers": c * h * w, "psnr": ev.get("psnr"),
               "ssim": ev.get("ssim"), "fd_effnet_lite0": ev.get("fd_effnet_lite0"), "export": s["export"]}
        if study.ldm_steps:
            row.update(carry_through(opts, f, s, name, study, parent, log))
        rows.append(row)
        if parent:
            keys = ("psnr", "ssim", "latent_numbers", "sample_fd", "sample_kid", "ldm_samples_per_s")
            client.log_batch(parent, metrics=[mlflow.entities.Metric(k, float(row[k]), int(time.time() * 1000), f)
                                              for k in keys if row.get(k) is not None])
    table = format_table(rows)
    log("[compare-f] paper §4.1 trade-off on this data:\n" + table)
    if parent:
        client.log_text(parent, table, "compare_f.md")
        if study.ldm_steps:
            with tempfile.TemporaryDirectory() as d:
                client.log_artifact(parent, plot(rows, os.path.join(d, "compare_f.png")))
        client.set_terminated(parent)
    return {"rows": rows, "parent_run_id": parent, "table": table}


def carry_through(opts: AETrainOptions, f: int, stage1: dict, name: str, study: CompareFOptions, parent: str,
                  log) -> dict:
    """f's first stage -> its latent cache -> an LDM with the study's budget -> FD of its samples."""
    from pipeline.data.preprocess import PreprocessConfig
    from pipeline.encode.flow import EncodeOptions, run_encode
    from pipeline.cache.reader import read_manifest
    from pipeline.evaluate.model_eval import ModelEvalOptions, evaluate_model
    from pipeline.train.autoencoder_driver import default_eval_input, stage1_config
    from pipeline.train.ldm_driver import run_train
    from pipeline.train.options import TrainOptions
    ae_cfg = stage1_config(replace(opts, f=f))
    latents = os.path.join(opts.storage_path, f"{name}-latents")
    enc = run_encode(EncodeOptions(input=opts.input, output=latents, autoencoder=stage1["export"],
                                   preprocess=PreprocessConfig(resolution=ae_cfg.autoencoder.resolution),
                                   max_length=ae_cfg.conditioning.max_length, store_text_embeddings=True,
                                   batch_size=128), log)
    # a preset that cross-attends gets the width of the frozen text encoder the cache was encoded with
    text_dim = read_manifest(latents)["text_encoder"].get("dim") if ae_cfg.unet.context_dim is not None else None
    log(f"[compare-f] f={f}: {enc['kept']} images encoded to {latents}; an LDM with {study.ldm_steps} steps next")
    overrides = ldm_overrides(opts, ae_cfg, stage1["latent_shape"][1], text_dim)
    s = run_train(TrainOptions(
        latents=latents, preset=opts.preset, config_yaml=opts.config_yaml, overrides=overrides,
        num_workers=opts.num_workers, max_steps=study.ldm_steps, batch_size=study.ldm_batch_size, lr=study.ldm_lr,
        warmup_steps=min(100, study.ldm_steps // 10), lr_schedule="cosine", ema_decay=0.999,
        checkpoint_every=max(study.ldm_steps, 1), sample_every=0, log_every=max(1, study.ldm_steps // 5),
        storage_path=opts.storage_path, name=f"{name}-ldm", mlflow_uri=opts.mlflow_uri, experiment=opts.experiment,
        register_model=f"{opts.register_model or 'compare'}-ldm-f{f}" if opts.mlflow_uri else "",
        seed=opts.seed, num_cpus=opts.num_cpus, address=opts.address), log)
    held_out = opts.eval_input or default_eval_input(opts.input)
    r = evaluate_model(ModelEvalOptions(model=s["export"], input=held_out, num_samples=study.eval_samples,
                                        cfg_scales=(study.cfg_scale,), steps=(study.sample_steps,), workers=1,
                                        agreement=False, seed=opts.seed), log)["rows"][0]
    if parent and s.get("mlflow_run_id"):
        import mlflow
        mlflow.MlflowClient(opts.mlflow_uri).set_tag(s["mlflow_run_id"], "mlflow.parentRunId", parent)
    return {"sample_fd": r["fd"], "sample_kid": r["kid"], "fd_name": r["names"]["fd"],
            "ldm_samples_per_s": s.get("samples_per_s"), "ldm_export": s["export"]}


def _fmt(v, nd: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def format_table(rows: list[dict]) -> str:
    ldm = "sample_fd" in rows[0]
    head = "| f | latent | numbers | PSNR dB | SSIM | FD-EffNetLite0 (recon.) |"
    if ldm:
        head += f" {rows[0]['fd_name']} (samples) | KID (samples) | LDM samples/s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r['f']} | {r['latent']} | {r['latent_numbers']} | {_fmt(r['psnr'])} | {_fmt(r['ssim'], 4)} | "
                f"{_fmt(r['fd_effnet_lite0'])} |")
        if ldm:
            line += f" {_fmt(r['sample_fd'])} | {_fmt(r['sample_kid'], 4)} | {_fmt(r['ldm_samples_per_s'], 1)} |"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str:
    from pipeline.evaluate.grid import figure, save_figure
    fs = [r["f"] for r in rows]
    fig, ax = figure(3, (13, 3.6))
    ax[0].plot(fs, [r["sample_fd"] for r in rows], "o-")
    ax[0].set_ylabel(f"{rows[0]['fd_name']} of samples")
    ax[1].plot(fs, [r["ldm_samples_per_s"] or float("nan") for r in rows], "o-")
    ax[1].set_ylabel("LDM training samples/s")
    ax[2].plot(fs, [r["psnr"] if r["psnr"] is not None else float("nan") for r in rows], "o-")
    ax[2].set_ylabel("stage-1 PSNR (dB)")
    for a in ax:
        a.set_xscale("log", base=2)
        a.set_xlabel("downsampling factor f")
        a.grid(alpha=0.3)
    fig.suptitle("paper §4.1 in miniature: the same budget at every f", fontsize=9)
    return save_figure(fig, path)
