"""What only a GPU shows of the hardened checkpoints: DeepSpeed's bf16 optimizer states on CUDA (ZeRO 1-3, NCCL)
restore through the weights-only loader (pipeline.train.checkpoints) bit for bit. Skipped without CUDA."""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def deepspeed():
    ds = pytest.importorskip("deepspeed")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29611", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    ds.init_distributed(dist_backend="nccl")
    return ds


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_zero_checkpoint_restores_weights_only(deepspeed, stage, tmp_path):
    from ldm.config import get_preset
    from ldm.model import LatentDiffusion
    from pipeline.train.checkpoints import harden_deepspeed, seal, verify
    cfg = get_preset("demo")
    ds = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
          "zero_optimization": {"stage": stage}, "bf16": {"enabled": True}}

    def engine(seed):
        torch.manual_seed(seed)
        m = LatentDiffusion(cfg)
        return deepspeed.initialize(model=m, model_parameters=list(m.parameters()), config=ds)[0]

    e = engine(0)
    dt = next(e.module.parameters()).dtype
    for _ in range(3):
        z = torch.randn(8, 4, 8, 8, device="cuda", dtype=dt)
        ctx = torch.randn(8, 16, 384, device="cuda", dtype=dt)
        loss = e(z, torch.randint(0, 1000, (8,), device="cuda"), context=ctx).float().pow(2).mean()
        e.backward(loss)
        e.step()
    e.save_checkpoint(str(tmp_path), tag="ds")
    seal(str(tmp_path), 0, 1)
    assert verify(str(tmp_path)) == []
    e2 = engine(1)
    harden_deepspeed(e2)  # every file through torch.load(weights_only=True) with DeepSpeed's plain-data types
    path, _ = e2.load_checkpoint(str(tmp_path), tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True)
    assert path is not None
    params = list(e.module.parameters()) + list(e2.module.parameters())
    with deepspeed.zero.GatheredParameters(params) if stage == 3 else torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(e.module.state_dict().values(), e2.module.state_dict().values()))
