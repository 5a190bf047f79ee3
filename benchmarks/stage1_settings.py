"""Choose stage 1's learning settings on the DEV split (issue 17, item 2; the test split is never looked at here).

Each setting trains notebook 04's ``Stage1Recipe`` (cpu profile: cached EfficientNet-Lite0 features of the
Flickr8k subset, MiniLM-initialised Q-Former) with some of the options changed, then measures on the 78 dev photos:

- ``itm_random``, ``itm_hard``: P(own caption scores higher than a random / hard-negative one) over all pairs
  (``stage1.itm_score_groups``, as notebook 04 computes it); 0.5 is a blind head;
- ``i2t_r5``, ``t2i_r5``: Recall@5 with the ITC similarity (``stage1.retrieval``);
- query collapse (``stage1.query_diversity``) of the query outputs and of their ITC features;
- the last cross-attention layer: mean entropy of the maps (max ln 49 = 3.89) and the brightest cell of the
  head-averaged map as a multiple of uniform.

One JSON line per run (also appended to ``--out``). Nothing is cached. On a shared machine pin the threads so
runs do not fight (``OMP_NUM_THREADS=1``) and note the contention. Run by hand:

    python benchmarks/stage1_settings.py --only baseline "lr x10" --steps 80
    python benchmarks/stage1_settings.py --only baseline --cached      # measure the model notebook 04 cached
"""
from __future__ import annotations

import os
import time
from dataclasses import replace

import torch
from sweep import emit, sweep_parser

from vlmcourse import get_profile
from vlmcourse.features import captions_for, split_features
from vlmcourse.pipeline import load_or_train_stage1, train_stage1
from vlmcourse.recipes import Stage1Recipe, stage1_dir
from vlmcourse.stage1 import itm_score_groups, query_diversity, retrieval
from vlmcourse.viz import attention_entropy, cross_attention_maps

# name -> (Stage1Recipe changes, Stage1Config changes)
SWEEP = {
    "baseline": ({}, {}),
    "lr x10": ({"new_lr_scale": 10.0}, {}),
    "logits 2": ({}, {"cross_attention_logit_std": 2.0}),
    "itm random 0.5": ({}, {"itm_random_negatives": 0.5}),
    "lr x10, logits 2": ({"new_lr_scale": 10.0}, {"cross_attention_logit_std": 2.0}),
    "lr x10, itm random 0.5": ({"new_lr_scale": 10.0}, {"itm_random_negatives": 0.5}),
    "lr x10, logits 2, itm random 0.5": ({"new_lr_scale": 10.0},
                                         {"cross_attention_logit_std": 2.0, "itm_random_negatives": 0.5}),
    "lr x10, logits 2, itm random 1": ({"new_lr_scale": 10.0},
                                       {"cross_attention_logit_std": 2.0, "itm_random_negatives": 1.0}),
    "lr x30, logits 2, itm random 0.5": ({"new_lr_scale": 30.0},
                                         {"cross_attention_logit_std": 2.0, "itm_random_negatives": 0.5}),
    "lr x30, logits 2, itm random 1": ({"new_lr_scale": 30.0},
                                       {"cross_attention_logit_std": 2.0, "itm_random_negatives": 1.0}),
    # what worked on the shapes world (recipes.SHAPES_STAGE1): ITM on 16 with half its negatives random, adapter at 10x
    "shapes recipe: adapter x10, itm random 0.5, itm 16": ({"lr_scales": {"image_adapter.": 10.0}},
                                                          {"itm_random_negatives": 0.5, "itm_batch_size": 16}),
    "itm random 0.5, itm 16": ({}, {"itm_random_negatives": 0.5, "itm_batch_size": 16}),
    "lr x10, logits 2, itm random 0.5, itm 16": ({"new_lr_scale": 10.0},
                                                 {"cross_attention_logit_std": 2.0, "itm_random_negatives": 0.5,
                                                  "itm_batch_size": 16}),
    # the shapes recipe in full: its position embedding starts at 2-D sin-cos codes (Stage1Config.image_positions)
    "shapes recipe, sincos": ({"lr_scales": {"image_adapter.": 10.0}},
                              {"itm_random_negatives": 0.5, "itm_batch_size": 16, "image_positions": "sincos"}),
    "lr x10, sincos, itm random 0.5, itm 16": ({"new_lr_scale": 10.0},
                                               {"itm_random_negatives": 0.5, "itm_batch_size": 16,
                                                "image_positions": "sincos"}),
    "lr x10, sincos, itm random 0.5, itm 16, 16 queries": ({"new_lr_scale": 10.0},
                                                           {"itm_random_negatives": 0.5, "itm_batch_size": 16,
                                                            "image_positions": "sincos", "num_query_tokens": 16}),
    # BLIP-2 trains its Q-Former with dropout 0.1 (Stage1Recipe drops it for speed): does it keep the queries apart?
    "dropout 0.1": ({}, {"dropout": 0.1}),
    "dropout 0.1, lr x10, logits 2, itm random 0.5, itm 16": ({"new_lr_scale": 10.0},
                                                              {"dropout": 0.1, "cross_attention_logit_std": 2.0,
                                                               "itm_random_negatives": 0.5, "itm_batch_size": 16}),
    "dropout 0.1, itm random 0.5, itm 16": ({}, {"dropout": 0.1, "itm_random_negatives": 0.5, "itm_batch_size": 16}),
    "dropout 0.1, lr x3, itm random 0.5, itm 16": ({"new_lr_scale": 3.0},
                                                   {"dropout": 0.1, "itm_random_negatives": 0.5, "itm_batch_size": 16}),
}


def pairs_ordered_right(groups: dict, kind: str) -> float:
    """P(a matched pair scores higher than a ``kind`` pair), over all pairs of the two groups."""
    return (groups["matched"][:, None] > groups[kind][None, :]).float().mean().item()


@torch.no_grad()
def measure(model, features: torch.Tensor, captions: list[list[str]]) -> dict:
    model.eval()
    groups = itm_score_groups(model, features, captions, torch.Generator().manual_seed(0))
    recall = retrieval(model, features, captions, ks=(1, 5, 10))
    image_embeds = model.image_adapter(features.float())
    queries = model.qformer(image_embeds=image_embeds).query_output
    side = int(features.shape[1] ** 0.5)
    last = cross_attention_maps(model.qformer, image_embeds, (side, side))[-1]        # (B, heads, Q, h, w)
    brightest = last.mean(1).flatten(-2).max(-1).values * last[0, 0, 0].numel()     # head-averaged, x uniform
    row = {"itm_random": pairs_ordered_right(groups, "random"), "itm_hard": pairs_ordered_right(groups, "hard negative"),
           "itm_p_matched": groups["matched"].mean().item(),
           "i2t_r1": recall["image->text"][1], "i2t_r5": recall["image->text"][5], "i2t_r10": recall["image->text"][10],
           "t2i_r5": recall["text->image"][5], "temp": model.temperature,
           "last_cross_entropy": attention_entropy(last).mean().item(), "last_cross_brightest_x": brightest.mean().item()}
    for name, x in {"query": queries, "itc": model.vision_proj(queries)}.items():
        row.update({f"{name} {k}": v for k, v in query_diversity(x).items()})
    return row


def main():
    parser = sweep_parser(__doc__.splitlines()[0], steps=80)
    parser.add_argument("--cached", action="store_true",
                        help="measure the models already in the cache (a notebook trained them), never train")
    args = parser.parse_args()

    profile = get_profile()
    feats, ds = split_features(profile, "dev")
    captions = captions_for(feats, ds)
    for name, (recipe_change, model_change) in SWEEP.items():
        if args.only and name not in args.only:
            continue
        for seed in args.seeds:
            # --cached: notebook 04's recipe exactly (its eval_every is part of the cache key)
            base = Stage1Recipe(steps=args.steps, seed=seed, **({} if args.cached else {"eval_every": args.steps}))
            recipe = replace(base, **recipe_change, model=replace(base.model, **model_change))
            began = time.perf_counter()
            if args.cached:
                if not (stage1_dir(profile, recipe) / "model.safetensors").is_file():
                    print(f"{name}, seed {seed}: not in the cache ({stage1_dir(profile, recipe)})")
                    continue
                model, result = load_or_train_stage1(profile, recipe)
            else:
                model, result = train_stage1(profile, recipe)
            trained = time.perf_counter() - began
            last = result.history[-10:]
            row = {"setting": name, "seed": seed, "steps": recipe.steps, "train_s": round(trained, 1),
                   "s_per_step": round(result.seconds / recipe.steps, 2),
                   "threads": torch.get_num_threads(), "load": os.getloadavg()[0],
                   **{f"last10_{k}": sum(r[k] for r in last) / len(last) for k in ("itc", "itm", "itg") if k in last[0]},
                   **measure(model, feats.features, captions)}
            emit({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, args.out)


if __name__ == "__main__":
    main()
