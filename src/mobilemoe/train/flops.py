"""Compute accounting: model FLOPs per token, device peaks, and a recipe's cost (`mobilemoe train --dry-run`).

FLOPs are counted as PaLM does (arXiv 2204.02311, appendix B; torchtitan counts the same way): a training token
costs 6 FLOPs per active matmul parameter (2 forward, 4 backward) plus 12 x n_layers x n_heads x head_dim x seq
for the attention scores and their weighted sum. MFU is achieved FLOP/s over the device's dense peak.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from mobilemoe.config import ModelConfig
from mobilemoe.errors import ConfigError
from mobilemoe.io import read_mapping
from mobilemoe.model import build_on_meta, count_parameters
from mobilemoe.train.recipe import Recipe

DEVICE_PEAKS = Path(__file__).parent / "device_peaks.yaml"


def matmul_parameters(cfg: ModelConfig) -> int:
    """Active parameters a token multiplies through: all but the input embedding lookup (which is no matmul).
    A tied output head reuses the embedding matrix but is a matmul, so it counts once either way."""
    active = count_parameters(build_on_meta(cfg)).active  # counts a tied matrix once
    return active if cfg.tie_embeddings else active - cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`."""
    return 6 * matmul_parameters(cfg) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


@dataclass
class DevicePeak:
    name: str
    bf16_tflops: float  # dense (no sparsity) peak
    fp32_tflops: float


def device_peak(name: str) -> DevicePeak:
    peaks = read_mapping(DEVICE_PEAKS)
    if name not in peaks:
        raise ConfigError(f"unknown device profile '{name}'; known: {', '.join(peaks)} (in {DEVICE_PEAKS.name})")
    entry = peaks[name]
    return DevicePeak(name=name, bf16_tflops=float(entry["bf16_tflops"]), fp32_tflops=float(entry["fp32_tflops"]))


# CUDA device names (torch.cuda.get_device_name) -> profile; the first listed substring that matches wins.
GPU_PROFILES = {"H200": "h200", "H100": "h100", "A100": "a100"}


def peak_flop_s(device: torch.device, precision: str) -> float | None:
    """The dense peak FLOP/s of `device` in `precision` (fp32 or bf16), or None for a GPU with no profile."""
    if device.type == "cpu":
        name = "this-cpu"
    else:
        gpu = torch.cuda.get_device_name(device)
        name = next((profile for key, profile in GPU_PROFILES.items() if key in gpu), None)
        if name is None:
            return None
    peak = device_peak(name)
    return (peak.bf16_tflops if precision == "bf16" else peak.fp32_tflops) * 1e12


def peak_memory_mb() -> float:
    """High-water mark of this process: GPU memory allocated by torch when CUDA is in use, else resident memory."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class StageCost:
    stage: str
    steps: int
    tokens: int
    flops: float
    gpu_hours: float


def recipe_cost(recipe: Recipe, peak: DevicePeak, mfu: float, world_size: int = 1) -> list[StageCost]:
    """Per stage: steps, tokens (batch_size x grad_accum x seq_len x world_size per step), training FLOPs and
    device-hours at `mfu` of the bf16 peak. The model is built on meta: nothing is allocated, no data is opened."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    cfg = recipe.model_config()
    flop_s = peak.bf16_tflops * 1e12 * mfu
    rows = []
    for s in recipe.stages:
        tokens = s.steps * s.batch_size * s.grad_accum * s.seq_len * world_size
        flops = float(tokens) * flops_per_token(cfg, s.seq_len)
        rows.append(StageCost(s.name, s.steps, tokens, flops, flops / flop_s / 3600))
    return rows
