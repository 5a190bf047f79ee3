"""Stage 2 with one prefix pass per photo: training captions per second through SmolLM2, grouped against ungrouped.

A stage-2 step of 16 captions either reads 16 rows of [soft prompts; prompt; caption] (ungrouped, the
recipes' layout: one caption per photo), or 4 photos x 4 captions, each photo's [soft prompts; prompt]
read once and its captions continuing from the cached keys and values (``SoftPromptCaptioner.grouped_loss``;
``caption_batches(..., captions_per_image=4)``). Both are full training steps (forward, backward, AdamW)
on real train-split features and captions, cpu profile, float32. Also measured: 16 against 32 queries,
the prompt's length (the chat prompt against the plain one), and the LoRA captioner (frozen Q-Former,
its outputs precomputed, as notebook 06 and the CLI train it).

The settings' steps are interleaved and the median step time is reported, so a busy shared machine
hurts all alike. ``--dev`` also trains stage 2 (fresh Q-Former, the recipe's settings otherwise) with
each query count and with grouped batches, and reports the dev caption loss (all five captions) and
the dev CIDEr-D, to choose on the dev split. Run by hand:

    python benchmarks/stage2_grouping.py             # the table (13 min with --rounds 4 on a busy 2-core CPU)
    python benchmarks/stage2_grouping.py --dev --rounds 0   # the dev-split comparison alone
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from vlmcourse import get_profile
from vlmcourse.backbones import load_llm, load_vision_encoder
from vlmcourse.evaluate import evaluate_captions, mean_caption_loss
from vlmcourse.lora import LoRACaptioner
from vlmcourse.stage2 import BridgeConfig, PrecomputedConnector, SoftPromptCaptioner
from vlmcourse.features import captions_for, split_features
from vlmcourse.pipeline import stage2_connector, train_stage2
from vlmcourse.recipes import CHAT_PROMPT, LoraSettings, Stage2Recipe, bridge_config
from vlmcourse.train import TrainConfig, caption_batches, make_optimizer
from vlmcourse.utils import peak_memory_mb, show_table


def make_captioner(profile, llm, vision, queries: int, prompt: str, lora: bool):
    """Stage 2 as the recipe trains it (fresh Q-Former trained with the projection, frozen LLM), or with ``lora``
    the captioner of notebook 06 / the CLI (frozen Q-Former, outputs precomputed, LoRA on the LLM)."""
    recipe = replace(Stage2Recipe(stage1=None, num_query_tokens=queries, prompt=prompt), freeze_qformer=lora)
    connector, width = stage2_connector(profile, recipe, vision)
    if lora:
        return LoRACaptioner(connector, width, llm, bridge_config(recipe), lora=LoraSettings())
    return SoftPromptCaptioner(connector, width, llm, bridge_config(recipe))


MODELS = {  # name: (queries, prompt, LoRA captioner)
    "stage 2, 32 queries, chat prompt": (32, CHAT_PROMPT, False),
    "stage 2, 16 queries, chat prompt": (16, CHAT_PROMPT, False),
    "stage 2, 32 queries, plain prompt": (32, BridgeConfig().prompt, False),   # without the chat turn around it
    "LoRA captioner, 32 queries, chat prompt": (32, CHAT_PROMPT, True),
}


def throughput(args, profile, llm, vision) -> None:
    """The table of training captions per second, grouped against ungrouped, for each model in MODELS."""
    feats, ds = split_features(profile, "train", vision)
    captions, k = captions_for(feats, ds), args.per_image
    settings = []
    for name, (queries, prompt, lora) in MODELS.items():
        model = make_captioner(profile, llm, vision, queries, prompt, lora).train()
        x = feats.features
        if lora:         # the frozen Q-Former's outputs, once per photo, as fit_captioner does
            x = model.connector_outputs(x)
            model.connector = PrecomputedConnector(*x.shape[1:])
        optimizer = make_optimizer(model, TrainConfig(lr=1e-4))
        prefix = model.num_soft_tokens + len(model.prompt_ids)
        for layout, per_image in (("ungrouped", 1), (f"grouped {args.captions // k}x{k}", k)):
            batches = caption_batches(x, captions, feats.image_ids, args.captions, captions_per_image=per_image)
            settings.append({"model": name, "layout": layout, "prefix tokens": prefix, "captioner": model,
                             "batch_fn": batches, "optimizer": optimizer, "times": []})

    def step(s, i):
        batch = s["batch_fn"](i, torch.Generator().manual_seed(i))
        began = time.perf_counter()
        s["optimizer"].zero_grad(set_to_none=True)
        s["captioner"](batch["image_embeds"], batch["captions"]).backward()
        s["optimizer"].step()
        return time.perf_counter() - began

    for i in range(args.rounds + 1):          # round 0 warms up (allocations, thread pools) and is not timed
        for s in settings:
            t = step(s, i)
            if i:
                s["times"].append(t)
        print(f"round {i} of {args.rounds} done", flush=True)
    rows, base = [], {}
    for s in settings:
        median = statistics.median(s["times"])
        base.setdefault(s["model"], median)          # the ungrouped step comes first
        rows.append({"model": s["model"], "layout": s["layout"], "prefix tokens": s["prefix tokens"],
                     "s/step (median)": median, "min": min(s["times"]), "max": max(s["times"]),
                     "captions/s": args.captions / median, "speed-up": base[s["model"]] / median})
    print(show_table(rows, digits=2).to_string(index=False))
    print(f"{args.captions} captions a step, median of {args.rounds} interleaved steps, "
          f"{torch.get_num_threads()} threads, peak memory {peak_memory_mb():.0f} MB")


def dev_comparison(args, profile, llm, vision) -> None:
    """Stage 2 (fresh Q-Former, the recipe's settings otherwise) with 32 or 16 queries, ungrouped or grouped,
    trained the same number of steps of the same number of captions: dev loss over all five captions, CIDEr-D."""
    dev_feats, dev_ds = split_features(profile, "dev", vision)
    dev_refs = captions_for(dev_feats, dev_ds)
    k, rows = args.per_image, []
    grouped = f"grouped {args.dev_batch // k}x{k}"
    for name, change in {"32 queries": {}, f"32 queries, {grouped}": {"captions_per_image": k},
                         "16 queries": {"num_query_tokens": 16},
                         f"16 queries, {grouped}": {"num_query_tokens": 16, "captions_per_image": k}}.items():
        if args.queries and not name.startswith(f"{args.queries} "):
            continue
        recipe = replace(Stage2Recipe(stage1=None, steps=args.dev_steps, batch_size=args.dev_batch), **change)
        model, result = train_stage2(profile, recipe, llm=llm)
        report = evaluate_captions(model, dev_refs, dev_feats.features)
        rows.append({"setting": name, "steps": recipe.steps, "train s": result.seconds,
                     "dev loss (5 captions)": mean_caption_loss(model, dev_feats.features, dev_refs),
                     "dev CIDEr-D": report["CIDEr-D"], "distinct": report["distinct"]})
        print(rows[-1], flush=True)
    print(show_table(rows).to_string(index=False))
    print(f"seed 0, {args.dev_batch} captions a step, {torch.get_num_threads()} threads")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=16, help="captions per training step")
    parser.add_argument("--per-image", type=int, default=4, help="captions per photo in the grouped steps")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timed steps per setting (after one warm-up step); 0: no throughput table")
    parser.add_argument("--dev", action="store_true", help="also train on train, score on dev (slow)")
    parser.add_argument("--dev-steps", type=int, default=40)
    parser.add_argument("--dev-batch", type=int, default=8)
    parser.add_argument("--queries", type=int, choices=(16, 32), help="--dev with this query count only")
    args = parser.parse_args()

    profile = get_profile()
    llm, vision = load_llm(profile), load_vision_encoder(profile)
    if args.rounds:
        throughput(args, profile, llm, vision)
    if args.dev:
        dev_comparison(args, profile, llm, vision)


if __name__ == "__main__":
    main()
