"""Notebook 04's ablation (sections 4-6): stage 1 with ITC alone against all three losses, recorded for the notebook.

Both runs train notebook 04's ``Stage1Recipe`` (the ablation keeps everything but the losses: same steps, batches
and initialisation for a seed), with the dev split's Recall@5 every 40 steps as the notebook trains it. Recorded per
run: the per-step losses, the dev evaluations, and on the 76 test photos the Recall@1/5/10 both ways and how the ITC
score uses the queries (``stage1.query_use``). A run already in the model cache is read back with the history and
training time saved with it. Notebook 04 trains the full recipe itself (seed 0) and reads the ITC-only runs and the
full recipe's second seed from here, so that the comparison rests on two seeds a side without training three more
models inside the notebook's budget:

    VLMCOURSE_BF16=0 python benchmarks/stage1_ablation.py --runs "ITC only" --seeds 0 1 \
        --save-curve vlmcourse/recorded/stage1_ablation.json
    VLMCOURSE_BF16=0 python benchmarks/stage1_ablation.py --runs "ITC + ITM + ITG" --seeds 1 \
        --save-curve vlmcourse/recorded/stage1_ablation.json --append
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from vlmcourse import get_profile
from vlmcourse.features import captions_for, split_features
from vlmcourse.losses import itc_similarity
from vlmcourse.metrics import caption_image_index, recall_at_k
from vlmcourse.pipeline import load_or_train_stage1
from vlmcourse.recipes import Stage1Recipe
from vlmcourse.stage1 import itc_features, query_use
from sweep import save_record

RUNS = {"ITC + ITM + ITG": Stage1Recipe(),
        "ITC only": replace(Stage1Recipe(), model=replace(Stage1Recipe().model, losses=("itc",)))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--save-curve", help="write the runs to this record (JSON, read by notebook 04)")
    ap.add_argument("--append", action="store_true", help="keep the runs already in --save-curve's file")
    args = ap.parse_args()

    profile = get_profile()
    feats, dataset = split_features(profile, "test")
    captions = captions_for(feats, dataset)
    owner = caption_image_index([len(c) for c in captions])
    runs = {}
    for name in args.runs:
        for seed in args.seeds:
            recipe = replace(RUNS[name], seed=seed)
            model, result = load_or_train_stage1(profile, recipe)   # a run notebook 04 trained is read back
            with torch.no_grad():       # the ITC features once: Recall@K (as stage1.retrieval) and query use
                image_q, text_f = itc_features(model, feats.features, captions)
                recall = recall_at_k(itc_similarity(image_q, text_f), owner)
                queries = query_use(image_q, text_f, owner)
            final = {"losses": list(recipe.model.losses), "seed": seed, "split": "test", "photos": len(captions),
                     "recall": {d: {str(k): v for k, v in r.items()} for d, r in recall.items()},
                     "queries": queries, "train_seconds": round(result.seconds, 1), "history": result.history}
            runs[f"{name}, seed {seed}"] = (recipe, result, final)
            print(json.dumps({f"{name}, seed {seed}": {k: v for k, v in final.items() if k != "history"}}), flush=True)
            if args.save_curve:     # after every run: an interrupted invocation keeps what it measured
                save_record(args.save_curve, "notebook 04's stage-1 ablation: ITC alone against ITC + ITM + ITG, "
                            "dev Recall@5 as each trains, test Recall@K and query use at the end", runs,
                            append=args.append)


if __name__ == "__main__":
    main()
