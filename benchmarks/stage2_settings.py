"""Choose notebook 05's stage-2 settings on the DEV split (the test split is never looked at here).

Each setting trains a ``Stage2Recipe`` (the early settings freeze the Q-Former:
its query outputs are computed once, only the projection trains) and captions
the 78 dev photos greedily. Printed per setting, one JSON line each: seconds of
training and per step, the dev caption loss, distinct and empty captions, the
mean P(EOS) at the first step, BLEU-4 and CIDEr-D, and CIDEr-D from a blank
grey photo. No stage-2 model is cached (``train_stage2``, not
``load_or_train_stage2``); the stage-1 model a setting starts from is trained
once and cached, as in the notebooks. On a shared machine pin the threads so runs do not
fight: ``OMP_NUM_THREADS=1``. Run by hand:

    python benchmarks/stage2_settings.py                      # the default sweep
    python benchmarks/stage2_settings.py --only lr=3e-3 --seeds 0 1
    python benchmarks/stage2_settings.py --only "Stage2Recipe()" "Stage2Recipe(), fresh Q-Former" --steps 200 \
        --eval-every 40 --save-curve curve.json    # learning curves: dev CIDEr-D (photo and blank) as each trains
"""
from __future__ import annotations

import time
from dataclasses import asdict, replace

import torch
from sweep import emit, last_mean, save_record, sweep_parser

from vlmcourse import get_profile
from vlmcourse.backbones import load_llm, load_vision_encoder
from vlmcourse.evaluate import blank_image_features, evaluate_captions
from vlmcourse.features import captions_for, split_features
from vlmcourse.pipeline import train_stage2
from vlmcourse.recipes import CHAT_PROMPT, Stage1Recipe, Stage2Recipe

CHAT = CHAT_PROMPT
# an instruction with one example caption: the instruct LLM answers in that format and ends its turn with EOS
EXAMPLE = "\nWrite a one-sentence caption for this photo, like: A dog runs on the grass.<|im_end|>\n<|im_start|>assistant\n"
SHORT_EXAMPLE = "\nOne short caption, like: A dog runs on the grass.<|im_end|>\n<|im_start|>assistant\n"
# notebook 04's stage-1 recipe with BLIP-2's Q-Former dropout (docs/recipes.md, "04": its queries may stay apart)
DROPOUT_STAGE1 = replace(Stage1Recipe(), model=replace(Stage1Recipe().model, dropout=0.1))
SWEEP = {
    "Stage2Recipe()": dict(),                                  # notebook 05's recipe, from notebook 04's stage 1
    "Stage2Recipe(), fresh Q-Former": dict(stage1=None),       # the same without stage 1
    "lr=3e-4": dict(lr=3e-4),
    "lr=1e-3": dict(lr=1e-3),
    "lr=3e-3": dict(lr=3e-3),
    "lr=1e-2": dict(lr=1e-2),
    "lr=3e-3, no prompt": dict(lr=3e-3, prompt=""),
    "lr=3e-3, chat prompt": dict(lr=3e-3, prompt=CHAT),
    "lr=1e-2, chat prompt": dict(lr=1e-2, prompt=CHAT),
    "lr=1e-3, chat prompt": dict(lr=1e-3, prompt=CHAT),
    "lr=3e-3, raw captions": dict(lr=3e-3, clean_captions=False),
    "lr=3e-3, chat prompt, raw captions": dict(lr=3e-3, prompt=CHAT, clean_captions=False),
    "lr=1e-2, chat prompt, batch 8 x 2 steps": dict(lr=1e-2, prompt=CHAT, batch_size=8, steps=None),
    "lr=3e-3, chat prompt, batch 8 x 2 steps": dict(lr=3e-3, prompt=CHAT, batch_size=8, steps=None),
    "lr=3e-3, example prompt": dict(lr=3e-3, prompt=EXAMPLE),
    "lr=3e-3, short example prompt": dict(lr=3e-3, prompt=SHORT_EXAMPLE),
    "lr=1e-3, example prompt": dict(lr=1e-3, prompt=EXAMPLE),
    "lr=3e-3, example prompt, batch 8 x 2 steps": dict(lr=3e-3, prompt=EXAMPLE, batch_size=8, steps=None),
    "lr=3e-3, batch 8 x 2 steps": dict(lr=3e-3, batch_size=8, steps=None),
    "lr=3e-3, no stage 1": dict(lr=3e-3, stage1=None),
    "lr=1e-3, chat prompt, Q-Former trained": dict(lr=1e-3, prompt=CHAT, freeze_qformer=False),
    "lr=3e-4, chat prompt, Q-Former trained": dict(lr=3e-4, prompt=CHAT, freeze_qformer=False),
    "lr=1e-3, chat prompt, Q-Former trained, batch 8 x 2 steps": dict(lr=1e-3, prompt=CHAT, freeze_qformer=False,
                                                                     batch_size=8, steps=None),
    # issue 17, item 3: the notebook's recipe (Q-Former trained) from a stage-1 model whose queries stay apart
    # (BLIP-2's dropout 0.1; docs/recipes.md, "04") against a fresh Q-Former with the same dropout
    "Stage2Recipe(), stage 1 with dropout 0.1": dict(stage1=DROPOUT_STAGE1),
    "Stage2Recipe(), stage 1 with dropout 0.1, stage-1 seed 2": dict(stage1=replace(DROPOUT_STAGE1, seed=2)),
    "Stage2Recipe(), fresh Q-Former, dropout 0.1": dict(stage1=None, qformer_dropout=0.1),
}


def main():
    parser = sweep_parser(__doc__.splitlines()[0], steps=40)
    args = parser.parse_args()

    profile = get_profile()
    llm = load_llm(profile)
    feats, ds = split_features(profile, "dev")
    references = captions_for(feats, ds)
    blank_x = blank_image_features(load_vision_encoder(profile))     # a grey photo: what a model says without one

    def scores(m):                       # dev captions with the photo, and CIDEr-D with a grey one
        with torch.no_grad():
            blank = evaluate_captions(m, references, soft_prompts=m.soft_prompts(blank_x))
        return evaluate_captions(m, references, feats.features), blank

    latest = {}

    def curve_point(m):                  # part-way through training, and after the last step (train's last eval)
        latest["scores"] = scores(m)
        report, blank = latest["scores"]
        return {"CIDEr-D": report["CIDEr-D"], "CIDEr-D, blank photo": blank["CIDEr-D"]}

    recorded = {}
    for name, change in SWEEP.items():
        if args.only and name not in args.only:
            continue
        for seed in args.seeds:
            change = dict(change)
            if change.get("steps", args.steps) is None:       # same number of captions seen as the batch-16 runs
                change["steps"] = args.steps * 16 // change["batch_size"]
            recipe = replace(Stage2Recipe(steps=args.steps, seed=seed, eval_every=args.eval_every), **change)
            latest.clear()
            began = time.perf_counter()
            model, result = train_stage2(profile, recipe, llm=llm, metrics=curve_point if args.eval_every else None)
            trained = time.perf_counter() - began
            began = time.perf_counter()
            # with a curve, train's last evaluation came after the last step: the same greedy captions, not made twice
            reused = "scores" in latest
            report, blank = latest["scores"] if reused else scores(model)
            row = {"setting": name, "seed": seed, "steps": recipe.steps, "batch": recipe.batch_size,
                   "train s (loop)": round(result.seconds, 1), "train s (with setup)": round(trained, 1),
                   "s/step": round(result.seconds / recipe.steps, 2), "dev loss": round(result.evals[-1]["dev_loss"], 3),
                   "last train loss": round(last_mean(result.column("loss"), 5), 3),
                   **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.items() if k != "captions"},
                   "CIDEr-D, blank photo": round(blank["CIDEr-D"], 4),
                   "eval s": "in the curve's last point" if reused else round(time.perf_counter() - began, 1), "examples": report["captions"][:3],
                   "threads": torch.get_num_threads(), "recipe": asdict(recipe) | {"stage1": recipe.stage1 is not None}}
            emit(row, args.out)
            recorded[f"{name}, seed {seed}"] = (recipe, result, {k: row[k] for k in ("CIDEr-D", "CIDEr-D, blank photo")})
    if args.save_curve:
        save_record(args.save_curve, "stage 2 on Flickr8k: dev CIDEr-D with the photo and with a grey one as each "
                    "run trains", recorded)


if __name__ == "__main__":
    main()
