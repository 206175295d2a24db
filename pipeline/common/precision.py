"""One precision vocabulary for every job (encode, train, sample, evaluate), resolved in one place.

  fp32      fp32 weights and arithmetic
  bf16      bf16 weights (training: an fp32 master copy in the optimizer; GroupNorm in fp32)
  autocast  fp32 weights, bf16 matmuls and convolutions under torch.autocast
  auto      bf16 on a GPU, fp32 on a CPU

A training run logs the resolved value to MLflow and writes it into its export; sampling and evaluation default to
the export's (a bf16-trained model samples under autocast from its fp32 export weights).
"""
from __future__ import annotations

PRECISIONS = ("auto", "fp32", "bf16", "autocast")
HELP = ("auto: bf16 on a GPU, fp32 on a CPU; fp32; bf16: bf16 weights; autocast: fp32 weights, bf16 matmuls and "
        "convolutions (faster than fp32 only where the CPU has native bf16 kernels: AVX512-BF16 or AMX)")


def resolve(precision: str, cuda: bool) -> str:
    """`precision` (one of PRECISIONS) on this device: fp32, bf16 or autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if cuda else "fp32"


def for_sampling(precision: str, cuda: bool) -> str:
    """What a sampler runs in for a requested (or recorded) precision: fp32 or autocast (exports hold fp32 weights,
    so a bf16-trained model samples under autocast)."""
    return "fp32" if resolve(precision or "auto", cuda) == "fp32" else "autocast"


def cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's AVX512-BF16 / AMX kernels): elsewhere autocast emulates it,
    slower than fp32."""
    import torch
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
