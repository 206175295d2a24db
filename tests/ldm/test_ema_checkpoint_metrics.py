import pytest
import torch

from images import real_images
from ldm.checkpoint import load_components, save_components, split_compvis_state_dict
from ldm.config import get_preset, to_dict
from ldm.ema import EMA, ema_decay
from ldm.features import LPIPS, VGG16Features, load_effnet_lite0
from ldm.metrics import codebook_usage, precision_recall, psnr, ssim
from ldm.unet import UNetModel


def test_ema_decay_warmup_and_update():
    assert ema_decay(0) == pytest.approx(0.1) and ema_decay(90) == pytest.approx(0.91)
    assert ema_decay(10 ** 7, 0.999) == 0.999
    ema = EMA({"w": torch.zeros(3), "n": torch.tensor(1)}, max_decay=0.5, warmup=False)
    assert "n" not in ema.shadow  # integer buffers are not averaged
    ema.update({"w": torch.ones(3)})
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 0.5))
    for _ in range(30):
        ema.update({"w": torch.ones(3)})
    assert torch.allclose(ema.shadow["w"], torch.ones(3), atol=1e-6)
    clone = EMA({"w": torch.zeros(3)})
    clone.load_state_dict(ema.state_dict())
    assert clone.num_updates == 31 and torch.equal(clone.shadow["w"], ema.shadow["w"])


def test_ema_copy_to_model():
    unet = UNetModel(get_preset("tiny").unet)
    ema = EMA(unet.state_dict())
    for p in unet.parameters():
        p.data.add_(1.0)
    ema.copy_to(unet)
    assert unet.out[-1].weight.abs().sum() == 0  # back to the (zero-init) shadow


def test_components_roundtrip_and_atomic(tmp_path):
    cfg = get_preset("tiny")
    unet = UNetModel(cfg.unet)
    path = tmp_path / "ckpt" / "model.safetensors"
    save_components(path, {"unet": unet.state_dict(), "ema_unet": unet.state_dict()}, to_dict(cfg), {"step": "7"})
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp file left behind
    comps, config, meta = load_components(path)
    assert set(comps) == {"unet", "ema_unet"} and config == to_dict(cfg) and meta["step"] == "7"
    UNetModel(cfg.unet).load_state_dict(comps["unet"], strict=True)
    with pytest.raises(ValueError, match="not an ldm-ray checkpoint"):
        from safetensors.torch import save_file
        save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        load_components(tmp_path / "other.safetensors")


def test_compvis_full_ckpt_split_with_flat_ema_names():
    unet = UNetModel(get_preset("tiny").unet)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd.update({"model_ema." + "".join(f"diffusion_model.{k}".split(".")): v + 1 for k, v in unet.state_dict().items()})
    sd["model_ema.num_updates"] = torch.tensor(5)
    parts = split_compvis_state_dict(sd)
    UNetModel(get_preset("tiny").unet).load_state_dict(parts["ema_unet"], strict=True)
    k = "out.2.bias"
    assert torch.equal(parts["ema_unet"][k], parts["unet"][k] + 1)


def test_real_effnet_lite0_recognises_a_cat():
    net = load_effnet_lite0()
    x = real_images(4, 224)  # sklearn china, flower; skimage astronaut, chelsea (a cat)
    top = net(x).argmax(-1).tolist()
    assert 281 <= top[3] <= 285, top  # ImageNet tabby/tiger/Persian/Siamese/Egyptian cat


def test_lpips_loads_user_weights(tmp_path):
    vgg = VGG16Features()
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))},
               tmp_path / "lin.pth")
    lp = LPIPS(str(tmp_path / "vgg16.pth"), str(tmp_path / "lin.pth"))
    x = real_images(2, 32)
    assert torch.allclose(lp(x, x), torch.zeros(2))
    assert (lp(x, x.flip(-1)) > 0).all()


def test_metrics():
    x = real_images(2, 32)
    assert torch.isinf(psnr(x, x)).logical_not().all() and (psnr(x, x) > 100).all()
    noisy = x + 0.1 * torch.randn_like(x)
    mse = ((noisy - x) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(psnr(noisy, x), 10 * torch.log10(4 / mse), atol=1e-4)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    assert (ssim(noisy, x) < 0.99).all()
    u = codebook_usage(torch.tensor([0, 1, 1, 3]), 8)
    assert u["usage"] == 3 / 8 and 1 < u["perplexity"] < 3


def test_precision_recall_sees_fidelity_and_diversity_apart():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=g)
    same = precision_recall(real, torch.randn(400, 8, generator=g))
    assert same["precision"] > 0.8 and same["recall"] > 0.8
    far = precision_recall(real, torch.randn(400, 8, generator=g) + 20)
    assert far == {"precision": 0.0, "recall": 0.0}
    # mode collapse: every fake near one real point -> faithful (precision) but not diverse (recall)
    collapsed = precision_recall(real, real[:1] + 0.01 * torch.randn(400, 8, generator=g))
    assert collapsed["precision"] == 1.0 and collapsed["recall"] < 0.1
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(real[:3], real)
