"""Notebook 06's connector ablation (section 5), at two budgets and two seeds, recorded for the notebook.

Six rows: the stage-1 Q-Former (notebook 04's, frozen; 32 tokens), mean-pooled patches (16) and a linear projector
of every patch (49, LLaVA's), each with the frozen LLM and with LoRA (``recipes.ablation_recipe``: a fresh projection,
``NOTEBOOK_STAGE2``'s settings, 8 captions a step). Each budget is a run of its own (its own warm-up and decay), each
seed changes stage 2's seed only (the batches, the projection and LoRA's start). Every model is scored on the test
photos as the notebook scored its rows: greedy captions, BLEU-4 and CIDEr-D, distinct and empty captions, the same
model shown a blank photo, and seconds a training step. Nothing is cached: a row's model is dropped once scored.

    VLMCOURSE_BF16=0 python benchmarks/caption_ablation.py --steps 12 40 --seeds 0 1 \
        --save-curve vlmcourse/recorded/caption_ablation.json

The notebook trains one row itself (Q-Former + LoRA, 12 steps, seed 0: section 6's fix), and reads the rest here.
"""
from __future__ import annotations

import argparse
import json

import torch

from vlmcourse import get_profile
from vlmcourse.backbones import load_llm, load_vision_encoder
from vlmcourse.evaluate import blank_image_features, evaluate_captions
from vlmcourse.features import captions_for, split_features
from vlmcourse.pipeline import train_captioner
from vlmcourse.recipes import ABLATION_CONNECTORS, ablation_recipe
from vlmcourse.utils import peak_memory_mb
from sweep import save_record


def row_name(connector: str, lora: bool, steps: int, seed: int) -> str:
    """A run's name in the record (the notebook reads the rows back by it)."""
    return f"{connector}{' + LoRA' if lora else ''}, {steps} steps, seed {seed}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[12, 40], help="budgets (steps of 8 captions)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--connectors", nargs="+", default=list(ABLATION_CONNECTORS), choices=ABLATION_CONNECTORS)
    ap.add_argument("--split", default="test")
    ap.add_argument("--save-curve", help="write the rows to this record (JSON, read by notebook 06)")
    ap.add_argument("--append", action="store_true", help="keep the runs already in --save-curve's file")
    args = ap.parse_args()

    profile = get_profile()
    vision, llm = load_vision_encoder(profile), load_llm(profile)
    feats, dataset = split_features(profile, args.split, vision)
    refs = captions_for(feats, dataset)
    blank_x = blank_image_features(vision).to(feats.features.dtype)
    runs = {}
    for steps in args.steps:
        for seed in args.seeds:
            for connector in args.connectors:
                for lora in (False, True):
                    recipe = ablation_recipe(connector, lora, steps, seed)
                    model, result = train_captioner(profile, recipe, llm, eval_split=None)
                    report = evaluate_captions(model, refs, feats.features)
                    with torch.no_grad():
                        blank = evaluate_captions(model, refs, soft_prompts=model.soft_prompts(blank_x))
                    final = {"connector": connector, "LoRA": lora, "steps": steps, "seed": seed,
                             "soft tokens": model.num_soft_tokens, "BLEU-4": report["BLEU-4"],
                             "CIDEr-D": report["CIDEr-D"], "CIDEr-D, blank photo": blank["CIDEr-D"],
                             "distinct": report["distinct"], "empty": report["empty"],
                             "P(EOS) first": report["P(EOS) first"], "split": args.split,
                             "photos": len(refs), "peak_mb": round(peak_memory_mb())}
                    name = row_name(connector, lora, steps, seed)
                    runs[name] = (recipe.stage2, result, final)
                    print(json.dumps({name: {**final, "s_per_step": round(result.seconds / steps, 2)}}), flush=True)
                    del model
                    if args.save_curve:      # after every row: an interrupted run keeps what it measured
                        save_record(args.save_curve, "notebook 06's connector ablation: each row's test captions "
                                    "scored at the end of its own run (CIDEr-D, and the same model shown a blank photo)",
                                    runs, append=args.append)


if __name__ == "__main__":
    main()
