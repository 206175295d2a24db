"""Every conditioning kind through the jobs at tiny size (its entry in tests/kinds.py): shards with what the kind needs
-> encode -> jobs/train_ldm.py -> jobs/sample.py and the served model (pyfunc) on the export."""
import json
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from kinds import TINY
from ldm.checkpoint import load_components
from ldm.latent_scale import LatentScale
from pipeline.data.make_shards import fashion_records, photo_records, scene_records, write_shards
from pipeline.data.preprocess import PreprocessConfig
from pipeline.encode.flow import EncodeOptions, run_encode
from pipeline.cache.reader import read_manifest
from pipeline.presets import load_config
from pipeline.train.ldm_driver import CacheConfigMismatch, run_train
from pipeline.train.options import TrainOptions

ROOT = Path(__file__).resolve().parents[2]
CLASS, UNCOND, SR = TINY["class"].overrides, TINY["none"].overrides, TINY["lowres"].overrides
INPAINT, SEMANTIC, LAYOUT = TINY["inpaint"].overrides, TINY["semantic"].overrides, TINY["layout"].overrides


@pytest.fixture(scope="module")
def label_cache(ray_local, tmp_path_factory):
    """160 Fashion-MNIST images whose records carry their label and no caption: a latent cache with no text, with
    4x4 low-res copies (x4 super-resolution's condition) and 2 inpainting variants per image (the other tasks ignore
    those columns)."""
    root = tmp_path_factory.mktemp("task-cache")
    recs = (replace(r, caption="") for r in fashion_records("train", 160, 0, "png"))
    write_shards(recs, str(root / "shards"), "webdataset", 80, seed=0)
    lines = []
    run_encode(EncodeOptions(input=str(root / "shards"), output=str(root / "latents"), autoencoder="random:tiny",
                             text_encoder="none", preprocess=PreprocessConfig(resolution=16, min_caption_chars=0,
                                                                              lowres_factor=4, inpaint_variants=2),
                             batch_size=64), log=lines.append)
    return str(root / "latents"), "\n".join(lines)


def train_and_sample(cache: str, tmp_path, overrides: tuple, prompts: list[str],
                     sample_args: tuple = ()) -> tuple[dict, Path]:
    s = run_train(TrainOptions(latents=cache, preset="tiny", overrides=overrides, num_workers=1, zero_stage=2,
                               max_steps=4, batch_size=16, lr=1e-3, warmup_steps=1, checkpoint_every=4,
                               sample_every=4, sample_steps=3, log_every=2, storage_path=str(tmp_path / "runs"),
                               ema_decay=0.9, name="task"))
    assert s["step"] == 4 and Path(s["export"]).exists()
    out = tmp_path / "grid.png"
    args = [a for p in prompts for a in ("--prompt", p)] + list(sample_args)
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "sample.py"), "--model", s["export"], *args, "--n", "2",
                        "--steps", "3", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = max(1, len(prompts), *(sample_args.count(f) for f in ("--lowres", "--image", "--label-map", "--layout")))
    # the semantic and layout tests sample twice their training canvas
    side = 32 if "--label-map" in sample_args or "--layout" in sample_args else 16
    assert f"{2 * rows} images of {side}x{side}" in r.stdout and Image.open(out).size == (
        2 * side + 3 * 2, rows * side + (rows + 1) * 2)
    return s, out


def test_class_conditional_task_from_labels_to_samples(label_cache, tmp_path):
    cache, log = label_cache
    m = read_manifest(cache)
    labels = m["totals"]["labels"]
    assert sum(labels.values()) == m["counts"]["kept"] == 160 and set(labels) <= {str(c) for c in range(10)}
    assert m["text_encoder"]["kind"] == "none" and "class labels  10 distinct on 160 rows" in log
    s, _ = train_and_sample(cache, tmp_path, CLASS, ["3", "7"])
    comps, config, _ = load_components(s["export"])
    assert config["conditioning"]["kind"] == "class" and comps["ema_unet"]["label_emb.weight"].shape[0] == 11


def test_unconditional_task_from_caption_less_shards_to_samples(label_cache, tmp_path):
    cache, _ = label_cache
    s, _ = train_and_sample(cache, tmp_path, UNCOND, [])
    _, config, _ = load_components(s["export"])
    assert config["conditioning"]["kind"] == "none" and config["unet"]["context_dim"] is None


def test_super_resolution_task_from_lowres_copies_to_samples(label_cache, tmp_path):
    """x4 SR (§4.4): the encode job caches each crop's bicubic 4x4 copy, the LDM trains on it concatenated to z_t,
    and jobs/sample.py upsamples low-res image files (16x16 out of 4x4)."""
    import numpy as np
    import pyarrow.parquet as pq

    from ldm.kinds.lowres import downscale
    cache, _ = label_cache
    m = read_manifest(cache)
    assert m["preprocess"]["lowres_factor"] == 4
    part = pq.read_table(sorted(Path(cache, "parts").glob("*.parquet"))[0], columns=["lowres"])
    low = np.asarray(part["lowres"].to_pylist(), np.uint8)
    assert low.shape[1] == 4 * 4 * 3 and low.std() > 0
    assert downscale(np.full((16, 16, 3), 200, np.uint8), 4).shape == (4, 4, 3)
    files = []
    for i, v in enumerate((40, 220)):
        files += ["--lowres", str(tmp_path / f"low{i}.png")]
        Image.fromarray(np.full((4, 4, 3), v, np.uint8)).save(files[-1])
    s, _ = train_and_sample(cache, tmp_path, SR, [], tuple(files) + ("--cfg-scale", "1", "--noise-level", "0"))
    comps, config, _ = load_components(s["export"])
    assert config["conditioning"]["kind"] == "lowres" and comps["ema_unet"]["input_blocks.0.0.weight"].shape[1] == 7
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "sample.py"), "--model", s["export"], "--lowres",
                        files[1], "--noise-level", "400", "--steps", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "noise level 400" in r.stderr
    # the pyfunc flavour of the registered model takes the low-res images as PNG bytes
    import io
    from types import SimpleNamespace

    import pandas as pd

    from pipeline.export.pyfunc import LDMPyfunc
    model = LDMPyfunc()
    model.load_context(SimpleNamespace(artifacts={"ldm": s["export"]}, model_config={}))
    png = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 90, np.uint8)).save(png, format="PNG")
    out = model.predict(None, pd.DataFrame({"image": [png.getvalue()] * 2, "seed": [0, 1]}),
                        {"steps": 2, "cfg_scale": 1.0})
    assert [Image.open(io.BytesIO(b)).size for b in out["image"]] == [(16, 16)] * 2
    with pytest.raises(ValueError, match="needs the column\\(s\\) 'image'"):
        model.predict(None, pd.DataFrame({"prompt": ["x"]}))


def test_inpainting_task_from_cached_mask_variants_to_samples(label_cache, tmp_path):
    """Inpainting (§4.5): the encode job caches 2 masked-image latents per crop with their holes at the latent's size,
    the LDM trains on one drawn per row and step, and jobs/sample.py fills the hole of an image file given a mask
    file, keeping every known pixel."""
    import io
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    from pipeline.data.preprocess import inpaint_masks
    from pipeline.export.pyfunc import LDMPyfunc
    cache, _ = label_cache
    m = read_manifest(cache)
    assert m["preprocess"]["inpaint_variants"] == 2
    t = pq.read_table(sorted(Path(cache, "parts").glob("*.parquet"))[0], columns=["key", "inpaint_latent",
                                                                               "inpaint_mask"])
    holes = np.asarray(t["inpaint_mask"].to_pylist(), np.uint8).reshape(-1, 2, 8, 8)
    latents = np.asarray(t["inpaint_latent"].to_pylist(), np.float32).reshape(-1, 2, 4, 8, 8)
    assert set(np.unique(holes)) == {0, 1} and 0.1 < holes.mean() < 0.8
    assert not np.allclose(latents[:, 0], latents[:, 1])  # two masks, two masked images
    # the cached hole is the key's seeded mask pooled to the latent's cells: a rerun draws the same
    want = inpaint_masks(t["key"][0].as_py(), PreprocessConfig(resolution=16, inpaint_variants=2))
    assert (holes[0] == want.reshape(2, 8, 2, 8, 2).max(axis=(2, 4))).all()
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, :, 0] = np.arange(16, dtype=np.uint8)[None] * 16
    hole = np.zeros((16, 16), np.uint8)
    hole[4:12, 4:12] = 255
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(hole).save(tmp_path / "mask.png")
    files = ("--image", str(tmp_path / "img.png"), "--mask", str(tmp_path / "mask.png"))
    s, grid = train_and_sample(cache, tmp_path, INPAINT, [], files + ("--cfg-scale", "1"))
    comps, config, _ = load_components(s["export"])
    assert config["conditioning"]["kind"] == "inpaint" and comps["ema_unet"]["input_blocks.0.0.weight"].shape[1] == 9
    cell = np.asarray(Image.open(grid).convert("RGB"))[2:18, 2:18]  # the grid's first image (2 px padding)
    known = hole == 0
    assert (cell[known] == image[known]).all() and not (cell[~known] == image[~known]).all()
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "sample.py"), "--model", s["export"], *files[:2]],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "1 image(s) but 0 mask(s): give one mask per image" in r.stderr
    model = LDMPyfunc()
    model.load_context(SimpleNamespace(artifacts={"ldm": s["export"]}, model_config={}))
    png = {k: io.BytesIO() for k in ("image", "mask")}
    Image.fromarray(image).save(png["image"], format="PNG")
    Image.fromarray(hole).save(png["mask"], format="PNG")
    out = model.predict(None, pd.DataFrame({"image": [png["image"].getvalue()], "mask": [png["mask"].getvalue()]}),
                        {"steps": 2, "cfg_scale": 1.0})
    got = np.asarray(Image.open(io.BytesIO(out["image"][0])).convert("RGB"))
    assert got.shape == (16, 16, 3) and (got[known] == image[known]).all()
    with pytest.raises(ValueError, match="needs the column\\(s\\) 'image' .*, 'mask'"):
        model.predict(None, pd.DataFrame({"image": [png["image"].getvalue()]}))


def test_semantic_synthesis_task_from_label_maps_to_a_twice_larger_sample(ray_local, tiny_cache, tmp_path):
    """Semantic synthesis (§4.3.2): scene shards carry a KEY.seg.png label map per record, the encode job resizes and
    crops it as the image (nearest) into the cache, records without one are skipped and counted, the LDM trains on
    it one-hot, and jobs/sample.py draws a 32x32 image from a 32x32 label map: twice the 16x16 training canvas."""
    import io
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    from pipeline.export.pyfunc import LDMPyfunc

    def recs():
        yield from scene_records("train", 40, 0)
        yield from (replace(r, caption="") for r in fashion_records("train", 3, 0, "png"))  # no label map
    write_shards(recs(), str(tmp_path / "shards"), "webdataset", 43, seed=0)
    cache = str(tmp_path / "latents")
    run_encode(EncodeOptions(input=str(tmp_path / "shards"), output=cache, autoencoder="random:tiny",
                             text_encoder="none", preprocess=PreprocessConfig(resolution=16, min_caption_chars=0,
                                                                              label_maps=True), batch_size=64),
               log=lambda *a: None)
    m = read_manifest(cache)
    assert m["counts"]["kept"] == 40 and m["totals"]["skipped"] == {"missing_label_map": 3}
    maps = np.asarray(pq.read_table(sorted(Path(cache, "parts").glob("*.parquet"))[0],
                                    columns=["label_map"])["label_map"].to_pylist(), np.uint8)
    assert maps.shape == (40, 256) and maps.max() <= 10 and (maps > 0).mean() > 0.05  # items on a background
    big = np.zeros((32, 32), np.uint8)
    big[2:14, 2:14], big[18:30, 18:30] = 2, 9  # a trouser and a bag
    Image.fromarray(big).save(tmp_path / "map.png")
    s, _ = train_and_sample(cache, tmp_path, SEMANTIC, [], ("--label-map", str(tmp_path / "map.png"),
                                                            "--cfg-scale", "1"))
    comps, config, _ = load_components(s["export"])
    assert config["conditioning"]["kind"] == "semantic" and comps["ema_unet"]["input_blocks.0.0.weight"].shape[1] == 15
    bad = tmp_path / "bad.png"
    Image.fromarray(np.full((32, 32), 12, np.uint8)).save(bad)
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "sample.py"), "--model", s["export"], "--label-map",
                        str(bad), "--steps", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "holds id 12 but the model knows ids 0..10" in r.stderr
    model = LDMPyfunc()
    model.load_context(SimpleNamespace(artifacts={"ldm": s["export"]}, model_config={}))
    png = io.BytesIO()
    Image.fromarray(big[:16, :16]).save(png, format="PNG")
    out = model.predict(None, pd.DataFrame({"label_map": [png.getvalue()]}), {"steps": 2, "cfg_scale": 1.0})
    assert Image.open(io.BytesIO(out["image"][0])).size == (16, 16)
    with pytest.raises(CacheConfigMismatch, match="was encoded without them"):
        run_train(TrainOptions(latents=tiny_cache, preset="tiny", overrides=SEMANTIC,
                               storage_path=str(tmp_path / "r2"), batch_size=8))


def test_layout_to_image_task_from_scene_boxes_to_samples(ray_local, tiny_cache, tmp_path):
    """Layout-to-image (§4.3.1): the encode job moves each scene's boxes (metadata "layout") with the resize into the
    cache; records without a layout or with more boxes than the cache keeps are skipped and counted; the LDM trains
    its box transformer with the UNet; jobs/sample.py and the pyfunc draw from layout files, here on a canvas twice
    the training size."""
    import io
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    from pipeline.export.pyfunc import LDMPyfunc

    scenes = list(scene_records("train", 40, 0))

    def recs():
        yield from scenes
        yield from (replace(r, caption="") for r in fashion_records("train", 3, 0, "png"))  # no layout
    write_shards(recs(), str(tmp_path / "shards"), "webdataset", 43, seed=0)
    cache = str(tmp_path / "latents")
    run_encode(EncodeOptions(input=str(tmp_path / "shards"), output=cache, autoencoder="random:tiny",
                             text_encoder="none", preprocess=PreprocessConfig(resolution=16, min_caption_chars=0,
                                                                              layout_boxes=2), batch_size=64),
               log=lambda *a: None)
    m = read_manifest(cache)
    two = sum(len(r.layout) == 2 for r in scenes)
    assert m["counts"]["kept"] == two and m["totals"]["skipped"] == {"missing_layout": 3, "too_many_boxes": 40 - two}
    rows = pq.read_table(sorted(Path(cache, "parts").glob("*.parquet"))[0], columns=["meta", "layout"]).to_pylist()
    for row in rows:  # the 64x64 scene resized to 16x16: every corner a quarter of its place, rounded
        want = [[c, round(y / 4), round(x / 4), round((y + h) / 4) - round(y / 4), round((x + w) / 4) - round(x / 4)]
                for c, y, x, h, w in json.loads(row["meta"])["layout"]]
        assert np.asarray(row["layout"]).reshape(2, 5).tolist() == want
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"size": [32, 32], "boxes": [[1, 2, 2, 12, 12], [8, 18, 18, 12, 12]]}))
    s, _ = train_and_sample(cache, tmp_path, LAYOUT, [], ("--layout", str(layout), "--cfg-scale", "2"))
    comps, config, meta = load_components(s["export"])
    assert config["conditioning"]["kind"] == "layout" and "box_proj.weight" in comps["ema_cond_stage"]
    totals = read_manifest(cache)["totals"]  # latent_norm=channel: each channel's own 1/std and mean
    assert LatentScale.from_json(meta["latent_scale"]) == LatentScale(
        tuple(1 / s for s in totals["latent_channel_std"]), tuple(totals["latent_channel_mean"]))
    assert comps["ema_unet"]["input_blocks.0.0.weight"].shape[1] == 14
    layout.write_text(json.dumps({"size": [16, 16], "boxes": [[1, 0, 0, 4, 4]] * 3}))
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "sample.py"), "--model", s["export"], "--layout",
                        str(layout), "--steps", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "holds 3 boxes but the model takes at most 2" in r.stderr
    model = LDMPyfunc()
    model.load_context(SimpleNamespace(artifacts={"ldm": s["export"]}, model_config={}))
    out = model.predict(None, pd.DataFrame({"layout": [json.dumps({"size": [16, 16], "boxes": [[3, 4, 4, 8, 8]]})]}),
                        {"steps": 2, "cfg_scale": 2.0})
    assert Image.open(io.BytesIO(out["image"][0])).size == (16, 16)
    with pytest.raises(CacheConfigMismatch, match="was encoded without layouts"):
        run_train(TrainOptions(latents=tiny_cache, preset="tiny", overrides=LAYOUT,
                               storage_path=str(tmp_path / "r2"), batch_size=8))


def test_inpainting_refused_on_a_cache_without_mask_variants(tiny_cache, tmp_path):
    with pytest.raises(CacheConfigMismatch, match="was encoded without them: re-encode into a new --output with "
                                                  "--inpaint-variants K"):
        run_train(TrainOptions(latents=tiny_cache, preset="tiny", overrides=INPAINT, storage_path=str(tmp_path),
                               batch_size=8))


def test_super_resolution_refused_on_a_cache_without_lowres_copies(tiny_cache, tmp_path):
    with pytest.raises(CacheConfigMismatch, match="was encoded without low-res copies: re-encode into a new "
                                                  "--output with --lowres-factor 4"):
        run_train(TrainOptions(latents=tiny_cache, preset="tiny", overrides=SR, storage_path=str(tmp_path),
                               batch_size=8))


def test_text_to_image_with_the_papers_trainable_transformer(tiny_cache, tmp_path):
    """The LDM-KL-8 recipe's tau_theta (a transformer over BERT WordPiece tokens, trained with the UNet, §3.3):
    the tiny preset's conditioning as it is, on a cache of MiniLM's (BERT-uncased) tokens; exported and sampled."""
    s, _ = train_and_sample(tiny_cache, tmp_path, (), ["a photo of a bag", "a photo of a dress"])
    comps, config, _ = load_components(s["export"])
    assert config["conditioning"]["text_encoder"] == "transformer"
    k = "token_emb.weight"
    assert comps["cond_stage"][k].shape[1] == config["conditioning"]["n_embed"]
    assert not torch.equal(comps["cond_stage"][k], comps["ema_cond_stage"][k])  # trained: the raw weights moved


def test_ldm_on_a_vq_first_stage(label_cache, tmp_path):
    """The paper's VQ variants (LDM-VQ-f, §3.1): the cache holds the pre-quantisation latents (std 0), the LDM
    trains on them and the decoder quantises what the sampler returns."""
    from dataclasses import replace as dc_replace

    from ldm.autoencoder import build_autoencoder
    from ldm.checkpoint import save_components
    from ldm.config import get_preset, to_dict
    torch.manual_seed(0)
    cfg = dc_replace(get_preset("tiny").autoencoder, reg="vq")
    ae = tmp_path / "vq.safetensors"
    save_components(ae, {"autoencoder": build_autoencoder(cfg).state_dict()}, {"autoencoder": to_dict(cfg)})
    shards = str(Path(label_cache[0]).parent / "shards")
    run_encode(EncodeOptions(input=shards, output=str(tmp_path / "latents"), autoencoder=str(ae), text_encoder="none",
                             preprocess=PreprocessConfig(resolution=16, min_caption_chars=0), batch_size=64),
               log=lambda *a: None)
    m = read_manifest(str(tmp_path / "latents"))
    assert m["autoencoder"]["config"]["reg"] == "vq" and m["counts"]["kept"] == 160
    s, _ = train_and_sample(str(tmp_path / "latents"), tmp_path, CLASS + ("autoencoder.reg=vq",), ["1"])
    _, config, _ = load_components(s["export"])
    assert config["autoencoder"]["reg"] == "vq"


def test_text_model_refused_on_a_cache_without_captions(label_cache, tmp_path):
    cache, _ = label_cache
    with pytest.raises(CacheConfigMismatch, match="holds no caption tokens"):
        run_train(TrainOptions(latents=cache, preset="tiny", storage_path=str(tmp_path), batch_size=8))


def test_class_run_refused_when_rows_lack_labels(ray_local, tmp_path):
    """Photos carry no label: a class-conditional run names the cache, the count and the fix before any worker."""
    def recs():
        yield from fashion_records("train", 40, 0, "png")
        yield from photo_records("test", 0, "jpg")
    write_shards(recs(), str(tmp_path / "shards"), "webdataset", 40, seed=0)
    run_encode(EncodeOptions(input=str(tmp_path / "shards"), output=str(tmp_path / "latents"),
                             autoencoder="random:tiny", text_encoder="none", preprocess=PreprocessConfig(resolution=16),
                             batch_size=64), log=lambda *a: None)
    labels = read_manifest(str(tmp_path / "latents"))["totals"]["labels"]
    assert labels["none"] > 0 and sum(v for k, v in labels.items() if k != "none") == 40
    with pytest.raises(CacheConfigMismatch, match=rf"has {labels['none']} row\(s\) without a label\. Encode shards "
                                                  r"whose records carry an integer 'label'"):
        run_train(TrainOptions(latents=str(tmp_path / "latents"), preset="tiny", overrides=CLASS,
                               storage_path=str(tmp_path / "runs"), batch_size=8))
    from ldm.kinds import CacheMismatch, kind_of
    cfg = load_config("tiny", overrides=CLASS)
    with pytest.raises(CacheMismatch, match=r"1 row\(s\) labelled 12"):
        kind_of("class").check_cache(cfg, {"totals": {"labels": {"3": 5, "12": 1}}}, "c")
    kind_of("class").check_cache(cfg, {"totals": {}}, "an old cache")  # counts not kept: not checked
    assert json.dumps(labels)
