"""One training loop for every notebook and the CLI.

BLIP-2's recipe: AdamW (betas 0.9/0.98, weight decay 0.05), linear warm-up
then cosine decay, gradient clipping. Batches come from ``batch_fn(step, generator)``
with a generator seeded by (seed, step): a run resumed from a checkpoint sees
exactly the batches (and dropout masks) the uninterrupted run would have seen,
so it continues the same loss curve. It runs under ``accelerate``: the same
code on the CPU, one GPU, or ``accelerate launch`` on several, with accelerate's bf16 mixed precision where the
hardware has bf16 (float32 elsewhere, as on most laptops' CPUs). With several
processes every one draws the same global batch and keeps its own rows
(``distributed.shard``); only the main one shows progress and writes checkpoints.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from . import distributed as D
from .utils import progress_bar, release_memory


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message gives the step and the values."""


@dataclass
class TrainConfig:
    steps: int = 300
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1       # the cosine ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0
    seed: int = 0
    bf16: bool | None = None        # None: bf16 autocast where the hardware supports it
    lr_scales: dict[str, float] = field(default_factory=dict)   # parameter-name prefix -> lr multiplier
    eval_every: int = 0             # call eval_fn every N steps (and at the end)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    desc: str = "training"


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)   # one row per step: step, lr, and every loss
    evals: list[dict] = field(default_factory=list)     # one row per evaluation: step and eval_fn's values
    seconds: float = 0.0

    def column(self, name: str, rows: str = "history") -> list[float]:
        return [row[name] for row in getattr(self, rows) if name in row]


BF16_ENV = "VLMCOURSE_BF16"


def bf16_supported(device: torch.device | str) -> bool:
    """Whether training autocasts to bf16 on ``device``: where the hardware has it, unless $VLMCOURSE_BF16 is 0
    (float32 everywhere: the course's numbers come from CPUs without bf16, and a CPU with it trains otherwise)."""
    if os.environ.get(BF16_ENV, "").strip().lower() in {"0", "false", "no"}:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases, norms and embeddings of size 1-D.

    ``config.lr_scales`` gives some parameters (by name prefix) a multiple of the learning rate: a new
    layer can learn faster than the pretrained weights around it. Each group keeps its ``lr_scale``.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    unknown = [k for k in config.lr_scales if not any(n.startswith(k) for n, _ in named)]
    if unknown:
        raise ValueError(f"lr_scales names no trainable parameter: {unknown}")

    def scale(name: str) -> float:
        return next((v for k, v in config.lr_scales.items() if name.startswith(k)), 1.0)

    groups = {}
    for name, p in named:
        decay = config.weight_decay if p.ndim >= 2 else 0.0
        groups.setdefault((scale(name), decay), []).append(p)
    return torch.optim.AdamW([{"params": ps, "weight_decay": decay, "lr_scale": lr_scale}
                              for (lr_scale, decay), ps in sorted(groups.items(), key=lambda g: (g[0][1] == 0, g[0][0]))],
                             lr=config.lr, betas=config.betas)


def check_finite(losses: dict[str, torch.Tensor], step: int) -> None:
    bad = [k for k, v in losses.items() if not torch.isfinite(v).all()]
    if bad:
        values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items() if v.numel() == 1)
        raise NonFiniteLossError(f"non-finite loss at step {step}: {', '.join(bad)} went bad ({values}). "
                                 f"Try a lower learning rate, or check the inputs of this batch.")


def train(model: torch.nn.Module, batch_fn: Callable[[int, torch.Generator], dict],
          loss_fn: Callable[[torch.nn.Module, dict], dict[str, torch.Tensor]], config: TrainConfig,
          eval_fn: Callable[[torch.nn.Module], dict] | None = None, resume: bool = True) -> TrainResult:
    """Train ``model`` for ``config.steps`` steps; ``loss_fn`` returns named losses, "loss" is optimised.

    With ``checkpoint_dir`` set, it saves there every ``checkpoint_every`` steps
    and at the end, and (``resume=True``) picks up from the last checkpoint.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import send_to_device    # a batch's tensors to the model's device, the rest as is

    D.check_launch()
    kwargs = D.accelerator_kwargs()
    # accelerate accepts bf16 on any CPU (and emulates it slowly): ask the hardware first
    device = PartialState(cpu=kwargs.get("cpu", False)).device
    use_bf16 = bf16_supported(device) if config.bf16 is None else config.bf16
    precision = "bf16" if use_bf16 else "no"
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        # accelerate fixes the precision once per process, but one notebook (or test run) may train under both
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=precision, **kwargs)
    model = model.to(accelerator.device)
    optimizer = make_optimizer(model, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    autocast = accelerator.autocast     # bf16 autocast for loss_fn and eval_fn, which may call more than forward

    result, start_step = TrainResult(), 0
    ckpt = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if ckpt and resume and (ckpt / "trainer.json").is_file():
        start_step, result = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer)

    began = time.perf_counter() - result.seconds
    bar = progress_bar(range(start_step, config.steps), desc=config.desc, initial=start_step, total=config.steps,
               disable=not accelerator.is_main_process)
    for step in bar:
        model.train()
        seed = config.seed * 1_000_003 + step * 101      # the same global batch in every process
        torch.manual_seed(seed + accelerator.process_index)   # dropout masks depend on the step (and the process)
        batch = send_to_device(D.shard(batch_fn(step, torch.Generator().manual_seed(seed))), accelerator.device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config) * group["lr_scale"]
        with autocast():
            losses = loss_fn(model, batch)
        reported = D.mean_over_processes(losses)          # the global batch's losses (one process: its own)
        check_finite(reported, step)                      # so every process stops at the same step
        if step % 10 == 0:
            release_memory(collect=False)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(losses["loss"])
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        row = {"step": step, "lr": lr_at(step, config), **{k: float(v.detach()) for k, v in reported.items()}}
        result.history.append(row)
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k not in ("step", "lr")}, refresh=False)
        last = step == config.steps - 1
        if eval_fn and ((config.eval_every and (step + 1) % config.eval_every == 0) or last):
            model.eval()
            with torch.no_grad(), autocast():
                result.evals.append({"step": step, **eval_fn(accelerator.unwrap_model(model))})
            model.train()
        result.seconds = time.perf_counter() - began
        if ckpt and accelerator.is_main_process and (
                (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0) or last):
            save_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, step + 1, result, config)
    model.eval()
    accelerator.free_memory()       # drop the optimizer's state now: a notebook trains several models in a row
    release_memory()
    return result


def caption_batches(features: torch.Tensor, captions: list[list[str]], image_ids: list[str], batch_size: int,
                    captions_per_image: int = 1, fits: Callable[[str, str], bool] | None = None):
    """A ``batch_fn`` over cached image features: ``batch_size`` different photos, one random caption each.

    Returns dicts with the names the stage-1 and stage-2 models take:
    image_embeds, captions, image_ids (and the step's generator, for ITM's negative sampling).
    With ``captions_per_image`` k > 1 (stage 2): ``batch_size // k`` photos and k different captions of each
    (all of them if it has fewer), as a list per photo, which the stage-2 captioner reads with one prefix pass
    per photo (``SoftPromptCaptioner.grouped_loss``).
    ``fits(image_id, caption)``: whether a caption describes a photo, where other photos' captions can (the shapes
    world's templates repeat); the batch then says, per photo, which of its captions fit it
    (``positive_captions``, which ``Stage1Model.forward`` takes).
    """
    if not (len(features) == len(captions) == len(image_ids)):
        raise ValueError(f"{len(features)} feature rows, {len(captions)} caption lists, {len(image_ids)} ids")
    if not 1 <= captions_per_image <= batch_size:
        raise ValueError(f"captions_per_image must be between 1 and batch_size ({batch_size}), "
                         f"got {captions_per_image}")
    photos = min(batch_size // captions_per_image, len(features))

    def batch_fn(step: int, generator: torch.Generator) -> dict:
        idx = torch.randperm(len(features), generator=generator)[:photos].tolist()
        if captions_per_image == 1:
            picks = [int(torch.randint(len(captions[i]), (1,), generator=generator)) for i in idx]
            chosen = [captions[i][k] for i, k in zip(idx, picks)]
        else:
            chosen = [[captions[i][k] for k in torch.randperm(len(captions[i]), generator=generator)
                       [:captions_per_image].tolist()] for i in idx]
        batch = {"image_embeds": features[idx].float(), "captions": chosen,
                 "image_ids": [image_ids[i] for i in idx], "generator": generator}
        if fits is not None:
            if captions_per_image != 1:
                raise ValueError("fits is for one caption per photo (stage 1)")
            batch["positive_captions"] = [[b for b, caption in enumerate(chosen)
                                           if b == a or fits(image_ids[i], caption)] for a, i in enumerate(idx)]
        return batch

    return batch_fn


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model, optimizer, step: int, result: TrainResult, config: TrainConfig) -> None:
    """Trainable weights and optimizer moments as safetensors; step, history and config as JSON."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state_dict(model), path / "model.safetensors")
    moments = {}
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        for name, value in optimizer.state.get(p, {}).items():
            moments[f"{i}.{name}"] = value.detach().reshape(value.shape).contiguous().cpu()
    save_file(moments, path / "optimizer.safetensors")
    (path / "trainer.json").write_text(json.dumps(
        {"step": step, "history": result.history, "evals": result.evals, "seconds": result.seconds,
         "config": asdict(config)}))


def load_checkpoint(path: Path, model, optimizer) -> tuple[int, TrainResult]:
    state = load_file(path / "model.safetensors")
    missing = set(trainable_state_dict(model)) - set(state)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} trainable tensors (first: {sorted(missing)[:3]})")
    model.load_state_dict(state, strict=False)
    moments = load_file(path / "optimizer.safetensors")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for key, value in moments.items():
        index, name = key.split(".", 1)
        p = params[int(index)]
        optimizer.state[p][name] = value.to(p.device) if name != "step" else value
    meta = json.loads((path / "trainer.json").read_text())
    return meta["step"], TrainResult(meta["history"], meta["evals"], meta["seconds"])
