"""Train the real models (cpu profile: EfficientNet-Lite0 features, MiniLM-initialised Q-Former, SmolLM2-135M) on the
shapes world (vlmcourse/shapes.py) and print the figures issue 16 asks of the notebook sections.

- stage 1 (notebook 02/04): image->text R@1 on the test split, a retrieved caption counting as right when it
  describes the photo's scene; ITM: share of photos whose own caption scores above a random one and above a hard
  negative (the same layout, one attribute changed);
- attention (notebook 07): per object, the share of attention that the query looking at it most puts on the
  object's cells, per cross-attention layer (heads averaged), against a uniform map (cells / 49);
- stage 2 (notebook 05): colour, shape and position named right per test object, from the stage-1 Q-Former and
  from a fresh one, with the dev accuracy every ``--eval-every`` steps (the learning curve: steps to 90%), and the
  composition split (colour-shape pairs no train photo shows).

Settings are chosen on dev (the curve); test and composition are measured once at the end. Stage 1 is cached
under the shapes profile's model folder (``stage1-cpu-shapes-KEY``), like the notebooks' models. Prints one
JSON object per part. Run by hand, on a quiet machine:

    python benchmarks/shapes_world.py                       # stage 1, attention, both stage-2 runs
    python benchmarks/shapes_world.py --parts stage1 --stage1-steps 100 --queries 8
    python benchmarks/shapes_world.py --parts stage1 --shapes-stage1 --image-positions sincos \
        --stage1-steps 800 --stage1-eval-every 100          # the notebooks' recipe, longer: its learning curve
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from sweep import save_record

from vlmcourse import get_profile
from vlmcourse.backbones import load_llm, load_vision_encoder
from vlmcourse.losses import itc_similarity
from vlmcourse.features import split_features
from vlmcourse.pipeline import load_or_train_stage1, train_stage2
from vlmcourse.recipes import CHAT_PROMPT, SHAPES_STAGE1, Stage1Recipe, Stage2Recipe
from vlmcourse.shapes import attention_on_objects, captioner_scores, itm_win_rates, scene_recall_at_1
from vlmcourse.stage1 import Stage1Config, itc_features
from vlmcourse.utils import peak_memory_mb
from vlmcourse.viz import cross_attention_maps

SPLITS = ("train", "dev", "test", "composition")


def show(part: str, **row) -> None:
    print(json.dumps({"part": part, **row}, default=lambda v: round(v, 4) if isinstance(v, float) else str(v)),
          flush=True)


def stage1_figures(model, feats, ds) -> dict:
    sim = itc_similarity(*itc_features(model, feats.features, ds.captions))
    return {"i2t R@1 (scene)": scene_recall_at_1(sim, ds.captions, ds.objects),
            **{f"ITM own {k}": v for k, v in itm_win_rates(model, feats.features, ds.captions, ds.objects).items()}}


def attention_figures(model, feats, ds, grid) -> list[dict]:
    with torch.no_grad():
        maps = cross_attention_maps(model.qformer, model.image_adapter(feats.features.float()), grid)
    uniform = sum(len(o["cells"]) for objs in ds.objects for o in objs) / sum(map(len, ds.objects)) / (grid[0] * grid[1])
    rows = []
    for layer, layer_maps in enumerate(maps):
        top = attention_on_objects(layer_maps.mean(1), ds.objects)
        rows.append({"cross-attention layer": layer, "top query's mass on the object (mean)": float(top.mean()),
                     "objects with >= half": float((top >= 0.5).float().mean()), "uniform": uniform})
    return rows


def curve_point(model, data, grid) -> dict:
    """Dev and test figures of a stage-1 model part-way through training (one point of the learning curve)."""
    point = {}
    for split in ("dev", "test"):
        point[split] = stage1_figures(model, *data[split])
        last = attention_figures(model, *data[split], grid)[-1]
        point[split]["attention on the object (last layer)"] = last["top query's mass on the object (mean)"]
        point[split]["objects with >= half"] = last["objects with >= half"]
    return point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="*", default=["stage1", "stage2"], choices=["stage1", "stage2"])
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--stage1-steps", type=int, default=None,
                        help="default 60, or SHAPES_STAGE1's with --shapes-stage1")
    parser.add_argument("--stage1-lr", type=float, default=3e-4)
    parser.add_argument("--new-lr-scale", type=float, default=1.0)
    parser.add_argument("--adapter-lr-scale", type=float, default=1.0, help="lr multiple of the image adapter")
    parser.add_argument("--cross-lr-scale", type=float, default=1.0, help="lr multiple of the cross-attention layers")
    parser.add_argument("--itm-random", type=float, default=0.0, help="Stage1Config.itm_random_negatives")
    parser.add_argument("--itm-batch", type=int, default=8)
    parser.add_argument("--logit-std", type=float, default=None, help="Stage1Config.cross_attention_logit_std")
    parser.add_argument("--stage2-steps", type=int, default=60)
    parser.add_argument("--stage2-lr", type=float, default=3e-4)
    parser.add_argument("--stage2-batch", type=int, default=8)
    parser.add_argument("--stage2-adapter-lr-scale", type=float, default=1.0,
                        help="lr multiple of the connector's image adapter in stage 2")
    parser.add_argument("--stage2-proj-lr-scale", type=float, default=10.0)
    parser.add_argument("--stage2-freeze-qformer", action="store_true",
                        help="Stage2Recipe.freeze_qformer: only the projection trains, on precomputed query outputs")
    parser.add_argument("--max-new", type=int, default=40, help="tokens generated per caption at evaluation")
    parser.add_argument("--image-positions", default="zeros", choices=["zeros", "sincos"],
                        help="the image adapter's position embedding at the start (stage 1 and a fresh stage 2)")
    parser.add_argument("--shapes-stage1", action="store_true",
                        help="stage 1 is recipes.SHAPES_STAGE1 (the notebooks'), not the flags above")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--stage1-eval-every", type=int, default=0,
                        help="a stage-1 learning curve: dev and test figures every N steps (saved in the model's history)")
    parser.add_argument("--fresh", action=argparse.BooleanOptionalAction, default=True,
                        help="also train stage 2 from a fresh Q-Former")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-curve", type=Path, default=None,
                        help="write the learning curves (stage 1 with --stage1-eval-every; stage 2) to this JSON "
                             "file, as vlmcourse/recorded/ keeps the curves notebooks 04 and 05 draw")
    args = parser.parse_args()

    profile = get_profile("cpu", data="shapes")
    vision = load_vision_encoder(profile)
    began = time.perf_counter()
    data = {s: split_features(profile, s, vision) for s in SPLITS}
    show("features", seconds=time.perf_counter() - began, images={s: len(f) for s, (f, _) in data.items()})
    stage1 = Stage1Recipe(steps=args.stage1_steps or 60, lr=args.stage1_lr, batch_size=32, warmup_steps=10, seed=args.seed,
                          eval_every=0, new_lr_scale=args.new_lr_scale,
                          lr_scales={**({} if args.adapter_lr_scale == 1 else {"image_adapter.": args.adapter_lr_scale}),
                                     **({} if args.cross_lr_scale == 1 else
                                        {f"qformer.layers.{i}.cross_attn.": args.cross_lr_scale for i in (0, 2, 4)})},
                          model=Stage1Config(num_query_tokens=args.queries, itm_batch_size=args.itm_batch,
                                             itm_random_negatives=args.itm_random,
                                             cross_attention_logit_std=args.logit_std,
                                             image_positions=args.image_positions))

    if args.shapes_stage1:
        stage1 = replace(SHAPES_STAGE1, seed=args.seed, steps=args.stage1_steps or SHAPES_STAGE1.steps,
                         model=replace(SHAPES_STAGE1.model, image_positions=args.image_positions))

    if args.stage1_eval_every:           # a learning curve: dev and test figures every N steps, kept in the history
        stage1 = replace(stage1, eval_every=args.stage1_eval_every)

    if "stage1" in args.parts:
        began = time.perf_counter()
        curve = (lambda m: curve_point(m, data, vision.grid_size)) if args.stage1_eval_every else None
        model, result = load_or_train_stage1(profile, stage1, metrics=curve)
        for point in result.evals:
            show("stage 1 curve", **point)
        if args.save_curve:
            save_record(args.save_curve, "stage 1 on the shapes world: dev and test figures as one run trains",
                        {f"stage 1, {stage1.steps} steps": (stage1, result, {})})
        show("stage 1", recipe=stage1, train_s=result.seconds, with_setup_s=time.perf_counter() - began,
             s_per_step=result.seconds / stage1.steps, last_eval=result.evals[-1] if result.evals else None,
             **{split: stage1_figures(model, *data[split]) for split in ("dev", "test", "composition")})
        for split in ("dev", "test"):
            for row in attention_figures(model, *data[split], vision.grid_size):
                show(f"attention ({split})", **row)

    if "stage2" in args.parts:
        llm = load_llm(profile)
        dev_feats, dev = data["dev"]
        max_new = args.max_new

        def dev_accuracy(m):
            scores = captioner_scores(m, dev_feats.features, dev.objects, max_new)
            return {"dev_attributes": scores["all"], **{f"dev_{k}": scores[k] for k in ("colour", "shape", "position")}}

        recorded = {}
        for name, source in (("from stage 1", stage1), ("fresh Q-Former", None)):
            if source is None and not args.fresh:
                continue
            recipe = Stage2Recipe(steps=args.stage2_steps, lr=args.stage2_lr, batch_size=args.stage2_batch,
                                  warmup_steps=5, prompt=CHAT_PROMPT, max_caption_tokens=32, seed=args.seed,
                                  stage1=source, num_query_tokens=args.queries, eval_every=args.eval_every,
                                  proj_lr_scale=args.stage2_proj_lr_scale, image_positions=args.image_positions,
                                  freeze_qformer=args.stage2_freeze_qformer,
                                  lr_scales={} if args.stage2_adapter_lr_scale == 1 else
                                  {"connector.image_norm.": args.stage2_adapter_lr_scale})
            began = time.perf_counter()
            model, result = train_stage2(profile, recipe, llm=llm, metrics=dev_accuracy)
            trained = time.perf_counter() - began
            curve = {e["step"] + 1: round(e["dev_attributes"], 3) for e in result.evals}
            reached = next((step for step, acc in curve.items() if acc >= 0.9), None)
            row = {"start": name, "recipe": recipe, "train_s": result.seconds, "with_setup_s": trained,
                   "dev curve (step: attributes right)": curve, "steps to 90% on dev": reached,
                   "dev curves per attribute": {k: [round(e[f"dev_{k}"], 3) for e in result.evals]
                                                for k in ("colour", "shape", "position")}}
            for split in ("test", "composition"):
                feats, ds = data[split]
                row[split] = {**captioner_scores(model, feats.features, ds.objects, max_new),
                              "examples": model.generate(feats.features[:3], max_new_tokens=max_new)}
            show("stage 2", **row)
            recorded[name] = (recipe, result, {split: {k: v for k, v in row[split].items() if k != "examples"}
                                               for split in ("test", "composition")})
            del model
        if args.save_curve:
            save_record(args.save_curve, "stage 2 on the shapes world: dev caption accuracy as each run trains, "
                        "test and composition at the end", recorded)
    show("done", peak_memory_mb=peak_memory_mb(), threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
