"""Model checkpoints on disk: a directory with config.json, model.safetensors and tokenizer.json.

Float checkpoints hold every tensor of `Transformer.state_dict()`. INT4 checkpoints (the QAT stage's
output) hold the INT4 format (`quantize.py`: symmetric int4 g32, fp16 scales; in memory `<name>.qweight` /
`<name>.scales`), stored in the inference engine's kernel layout (`infer.engine.stored_layout`) so the
engine maps it with no repack — except an embedding/head kept at 8 bits (`quantize.Int4Scheme`), stored as
int8 `qweight` with one fp16 scale per row; everything else as float; safetensors metadata
`quantization = int4-g32-sym` tells them apart, and `int4_scheme` (JSON of `quantize.Int4Scheme`) records how
INT4 weights were quantized or, on a QAT stage's float checkpoints, what the weights were trained against, so
`--int4`, the engine and every export apply the same scheme without flags. Directories are written to a
temporary sibling and renamed, so a crash never leaves half a checkpoint. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mobilemoe.config import ModelConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.io import atomic_dir
from mobilemoe.model import Transformer
from mobilemoe.quantize import PAPER_SCHEME, Int4Scheme, dequantize_tensors, is_quantized_weight, quantize_weight
from mobilemoe.tokenizer import Tokenizer

INT4_FORMAT = "int4-g32-sym"


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer | None
    int4: bool  # weights came from an INT4 checkpoint (dequantized into `model`)
    path: Path
    scheme: Int4Scheme = PAPER_SCHEME  # the checkpoint's INT4 scheme (`checkpoint_scheme`)


def model_tensors(model: Transformer, int4: bool, scheme: Int4Scheme = PAPER_SCHEME) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores for `model`, in float or in the INT4 format (quantized as `scheme` says)."""
    params = dict(model.named_parameters())
    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().float().contiguous()
        if int4 and name in params and is_quantized_weight(name, params[name]):
            tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = quantize_weight(name, t, scheme)
        else:
            tensors[name] = t
    return tensors


def write_model_files(directory: Path, model: Transformer, tokenizer: Tokenizer | None = None, int4: bool = False,
                      tensors: dict[str, torch.Tensor] | None = None, scheme: Int4Scheme | None = None) -> None:
    """config.json, model.safetensors and tokenizer.json into an existing directory. `tensors` overrides
    `model_tensors(model, int4, scheme)` (e.g. a full state dict gathered from sharded training). `scheme`:
    with `int4`, how the weights are quantized (default the paper's); with float weights, the scheme they were
    trained against (a QAT stage's), recorded so that `--int4` quantizes them the same way."""
    if tensors is None:
        tensors = model_tensors(model, int4, scheme or PAPER_SCHEME)
    if int4:
        from mobilemoe.infer.engine import stored_layout

        tensors = stored_layout(model.cfg, tensors)
    metadata = {"format": "mobilemoe", "quantization": INT4_FORMAT if int4 else "none"}
    if int4 or scheme is not None:
        metadata["int4_scheme"] = json.dumps(dataclasses.asdict(scheme or PAPER_SCHEME))
    save_file(tensors, directory / "model.safetensors", metadata=metadata)
    (directory / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2))
    if tokenizer is not None:
        tokenizer.save(directory / "tokenizer.json")


def save_model(directory: str | Path, model: Transformer, tokenizer: Tokenizer | None = None, int4: bool = False,
               tensors: dict[str, torch.Tensor] | None = None, force: bool = False,
               scheme: Int4Scheme | None = None) -> Path:
    """Write a checkpoint directory atomically (`int4`: PTQ as `scheme` says; `scheme` with float weights: see
    `write_model_files`). An existing directory is replaced
    only if it is a checkpoint we wrote (or `force`): see `io.claim_dir`."""
    with atomic_dir(directory, "checkpoint", force) as tmp:
        write_model_files(tmp, model, tokenizer, int4, tensors, scheme)
    return Path(directory)


def load_config(directory: str | Path) -> ModelConfig:
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        problem = "config.json is missing" if directory.is_dir() else "no such directory"
        raise MobileMoEError(f"{directory} is not a MobileMoE checkpoint: {problem}. Pass a checkpoint directory "
                             "written by `mobilemoe train` (e.g. runs/<name>/<stage>/final) or `mobilemoe import`.")
    return ModelConfig.load(directory / "config.json")


def _current_name(name: str) -> str:
    """Checkpoints written before `moe.Router` owned the selection bias stored it as `<layer>.ffn.expert_bias`."""
    return name.replace(".ffn.expert_bias", ".ffn.router.expert_bias")


def read_tensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return {_current_name(k): f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise MobileMoEError(f"{file} is missing or corrupt ({err}); re-export or re-train it") from None


def read_metadata(file: Path) -> dict[str, str]:
    """The safetensors metadata of `file`, without reading its tensors."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise MobileMoEError(f"{file} is missing or corrupt ({err}); re-export or re-train it") from None


def checkpoint_scheme(directory: str | Path) -> Int4Scheme:
    """The INT4 scheme a checkpoint records (see module docstring); the paper's where it records none (float
    weights, or a missing file: the loader reports those)."""
    try:
        with safe_open(str(Path(directory) / "model.safetensors"), framework="pt") as f:
            int8_embedding = "embed.weight.qweight" in f.keys() and (  # noqa: SIM118
                f.get_slice("embed.weight.qweight").get_dtype() == "I8")
            return _recorded_scheme(f.metadata() or {}, Path(directory), int8_embedding)
    except (SafetensorError, OSError):
        return PAPER_SCHEME


def _recorded_scheme(meta: dict[str, str], directory: Path, int8_embedding: bool) -> Int4Scheme:
    if "int4_scheme" not in meta:  # written before schemes were recorded: the embedding's stored type says it
        return Int4Scheme(embedding_bits=8) if int8_embedding else PAPER_SCHEME
    try:
        return Int4Scheme(**json.loads(meta["int4_scheme"]))
    except (ValueError, TypeError, MobileMoEError):
        raise MobileMoEError(f"{directory}/model.safetensors records an unreadable INT4 scheme "
                             f"({meta['int4_scheme']!r}); re-export or re-train it") from None


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a checkpoint directory into a `Transformer` (INT4 weights are dequantized)."""
    directory = Path(directory)
    cfg = load_config(directory)
    tensors, meta = read_tensors(directory / "model.safetensors")
    int4 = meta.get("quantization") == INT4_FORMAT
    stored_embedding = tensors.get("embed.weight.qweight")
    scheme = _recorded_scheme(meta, directory, stored_embedding is not None and stored_embedding.dtype == torch.int8)
    if int4:
        from mobilemoe.infer.engine import int4_format

        tensors = dequantize_tensors(int4_format(cfg, tensors))
    model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    got = {k: v.shape for k, v in tensors.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        detail = "; ".join(f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                           for label, names in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
                           if names)
        raise MobileMoEError(f"{directory}/model.safetensors does not match its config.json ({detail}); "
                             "the weights come from another model")
    model.load_state_dict(tensors)
    return LoadedModel(model.to(dtype).eval(), read_tokenizer(directory), int4, directory, scheme)


def read_tokenizer(directory: str | Path) -> Tokenizer | None:
    """A checkpoint directory's tokenizer.json, or None where it has none."""
    file = Path(directory) / "tokenizer.json"
    return Tokenizer.load(file) if file.is_file() else None
