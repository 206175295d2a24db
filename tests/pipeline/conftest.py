import pytest
import torch

from ldm.autoencoder import AutoencoderKL
from ldm.checkpoint import save_components
from ldm.config import get_preset, to_dict
from pipeline.data.make_shards import fashion_records, photo_records, write_shards


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory):
    """Small real shards in both img2dataset layouts: {layout: folder}, 3 shards of 40 + photos."""
    root = tmp_path_factory.mktemp("shards")
    out = {}
    for layout in ("webdataset", "parquet"):
        def recs():
            yield from fashion_records("train", 100, 0, "png")
            yield from photo_records("test", 0, "jpg")
        write_shards(recs(), str(root / layout), layout, 40, seed=0)
        out[layout] = str(root / layout)
    return out


@pytest.fixture(scope="session")
def tiny_ae_ckpt(tmp_path_factory):
    """A tiny KL autoencoder (f=2, 16px) trained for a few seconds on real Fashion-MNIST, saved as an
    ldm-ray safetensors checkpoint: a real first stage whose reconstructions mean something."""
    from pipeline.data.make_shards import load_fashion_mnist
    torch.manual_seed(0)
    cfg = get_preset("tiny").autoencoder
    imgs, _ = load_fashion_mnist("train")
    x = torch.tensor(imgs[:512], dtype=torch.float32)[:, None] / 127.5 - 1
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bicubic", antialias=True).clamp(-1, 1)
    x = x.repeat(1, 3, 1, 1)
    model = AutoencoderKL(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(150):
        b = x[torch.randint(0, len(x), (32,))]
        rec, post = model(b)
        loss = (rec - b).abs().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ae") / "tiny_ae.safetensors"
    save_components(path, {"autoencoder": model.state_dict()}, {"autoencoder": to_dict(cfg)})
    return str(path)


@pytest.fixture(scope="session")
def tiny_cache(ray_local, tmp_path_factory):
    """A real latent cache: 320 Fashion-MNIST images, random:tiny first stage, real MiniLM tokens."""
    from pipeline.data.preprocess import PreprocessConfig
    from pipeline.encode.flow import EncodeOptions, run_encode
    root = tmp_path_factory.mktemp("train-cache")
    write_shards(fashion_records("train", 320, 0, "png"), str(root / "shards"), "webdataset", 80, seed=0)
    run_encode(EncodeOptions(input=str(root / "shards"), output=str(root / "latents"), autoencoder="random:tiny",
                             preprocess=PreprocessConfig(resolution=16), max_length=16, batch_size=64))
    return str(root / "latents")
