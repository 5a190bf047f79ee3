"""Where the image enters a frozen LLM, side by side on the shapes world's questions (issue 21; notebook 08).

Each design trains the same number of steps on the same instruction rows (``pipeline.question_rows``: the train
scenes' questions, one-word answers), with SmolLM2 frozen, and answers the dev (or test)
questions greedily. Printed per design: image tokens added to the LLM's input, trainable parameters, seconds a step,
VQA accuracy per question type, the same model shown a blank photo, and the text-only prior.

    python benchmarks/vqa_designs.py --designs mlp resampler flamingo --steps 60 --split dev
    python benchmarks/vqa_designs.py --designs qformer-tuned instructblip --lr 3e-4 --proj-lr-scale 10   # InstructBLIP

With ``--eval-every N`` each design's dev accuracy is recorded every N steps; Flamingo's gates (tanh) are logged at
every step and printed every 10 (``gate_curve``). ``--lr-for DESIGN=LR`` gives a design its own learning rate;
``--save-curve FILE`` adds each run (curve, final scores, Flamingo's gates at every step) to a recorded comparison
that notebook 08 draws (``vlmcourse/recorded/vqa_designs.json``, the notebook's own budget):

    python benchmarks/vqa_designs.py --designs flamingo mlp resampler qformer-tuned linear instructblip \
        --steps 50 --batch-size 32 --per-image 4 --lr 3e-3 --lr-for qformer-tuned=3e-4 instructblip=3e-4 \
        --proj-lr-scale-for qformer-tuned=10 instructblip=10 --questions 200 --eval-every 10 --save-curve vlmcourse/recorded/vqa_designs.json

``--data flickr`` runs the same designs as captioners on Flickr8k: every training caption is the answer to "Describe
the photo.", and the dev photos' answers are scored by CIDEr-D (the Q-Former designs start from notebook 04's
Flickr8k stage-1 model):

    python benchmarks/vqa_designs.py --data flickr --designs mlp qformer-tuned flamingo resampler linear \
        --steps 50 --batch-size 32 --per-image 4 --lr 3e-3 --lr-for qformer-tuned=3e-4 \
        --proj-lr-scale-for qformer-tuned=10 --eval-every 25 --save-curve vlmcourse/recorded/caption_designs.json

(the linear projector's run was added to that record by a second invocation with ``--append``). Both records hold a
second seed of every design, added by the same commands with ``--seeds 1 --append``; on a CPU with bf16, run them
with ``VLMCOURSE_BF16=0`` to train in float32 as the first seed did (each run keeps the machine it ran on).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch

from vlmcourse import get_profile
from vlmcourse.backbones import load_llm, load_text_encoder, load_vision_encoder
from vlmcourse.evaluate import blank_image_features
from vlmcourse.features import captions_for, split_features
from vlmcourse.metrics import caption_metrics
from vlmcourse.stage2 import clean_caption
from vlmcourse.flamingo import PerceiverResampler, ResamplerConfig
from vlmcourse.instruct import text_prior_answers, vqa_accuracy
from vlmcourse.llava import MLPConnector, llava_connector
from vlmcourse.connectors import MeanPoolConnector, PrecomputedConnector, QFormerConnector
from vlmcourse.pipeline import load_or_train_stage1, question_rows
from vlmcourse.recipes import SHAPES_STAGE1, Stage1Recipe, shapes_profile
from vlmcourse.utils import in_batches, peak_memory_mb, seed_everything
from vlmcourse.train import TrainConfig, train
from vlmcourse.instructblip import InstructQFormerConnector
from vlmcourse.vqa import FlamingoVQA, InstructBLIPVQA, SoftPromptVQA, answer_all, design_card, instruction_batches
from sweep import last_mean, save_record

# each design's name in the printed rows and in a recorded comparison's runs
DESIGNS = {"mlp": "LLaVA-1.5: MLP", "linear": "LLaVA: linear", "resampler": "resampler as soft prompts",
           "qformer-tuned": "BLIP-2: Q-Former, trained on", "qformer": "BLIP-2: Q-Former frozen",
           "flamingo": "Flamingo: gated cross-attention", "instructblip": "InstructBLIP: question in the Q-Former",
           "mlp-pooled": "LLaVA MLP, grid pooled 4x4", "mlp-adapter": "LLaVA MLP, image adapter first"}


@dataclass
class DesignRun:
    """What a recorded run was (``sweep.save_record`` keeps it beside the curve)."""
    design: str
    steps: int
    lr: float
    batch_size: int
    per_image: int
    seed: int
    lr_scales: dict


def build(design: str, llm, vision, seed: int, profile):
    """(model, inputs): ``inputs(features)`` is what the model reads for those photos' patch features."""
    seed_everything(seed)
    hidden = llm.model.config.hidden_size
    same = (lambda x: x)
    if design in ("linear", "mlp", "mlp-adapter"):      # mlp-adapter: LayerNorm and sin-cos positions first
        connector, width = llava_connector(design.split("-")[0], vision.num_patches, vision.hidden_size, hidden,
                                           image_adapter=design == "mlp-adapter")
        return SoftPromptVQA(connector, width, llm), same
    if design == "mlp-pooled":  # the patch grid average-pooled to 4x4 once (no weights), then LLaVA's MLP
        pool = MeanPoolConnector(vision.grid_size, 4)
        connector = MLPConnector(pool.num_tokens, vision.hidden_size, hidden)
        return SoftPromptVQA(connector, hidden, llm), (lambda x: pool(x.float()))
    if design == "resampler":
        resampler = PerceiverResampler(ResamplerConfig(vision.hidden_size, 256, 8, 2, 4, 4, vision.num_patches))
        return SoftPromptVQA(resampler, 256, llm), same
    if design == "flamingo":
        return FlamingoVQA(llm, vision.hidden_size, every=10, num_positions=vision.num_patches), same
    stage1_recipe = SHAPES_STAGE1 if profile.data == "shapes" else Stage1Recipe()     # notebook 04's, per world
    if design in ("qformer-tuned", "instructblip"):   # notebook 04's stage-1 Q-Former, trained on (BLIP-2)
        stage1, _ = load_or_train_stage1(profile, stage1_recipe)  # with the question in its self-attention or not
        seed_everything(seed)
        width = stage1.qformer.config.hidden_size
        if design == "qformer-tuned":
            return SoftPromptVQA(QFormerConnector(stage1.qformer, stage1.image_adapter), width, llm), same
        connector = InstructQFormerConnector(stage1.qformer, stage1.image_adapter)
        return InstructBLIPVQA(connector, width, llm, load_text_encoder(profile).tokenizer), same
    if design == "qformer":     # notebook 04's stage-1 Q-Former, frozen: its query outputs computed once
        stage1, _ = load_or_train_stage1(profile, stage1_recipe)
        connector = QFormerConnector(stage1.qformer, stage1.image_adapter).eval()
        seed_everything(seed)
        model = SoftPromptVQA(PrecomputedConnector(connector.num_tokens, stage1.qformer.config.hidden_size),
                              stage1.qformer.config.hidden_size, llm)

        @torch.no_grad()
        def query_outputs(x):
            return in_batches(lambda b: connector(b.float()), x, batch_size=64)
        return model, query_outputs
    raise ValueError(design)


CAPTION_REQUEST = "Describe the photo."


def world(data: str, split: str, questions: int, vision):
    """(profile, train features, train rows, eval features, eval rows, score(answers) -> dict, max new tokens).
    shapes: the scenes' questions, scored by VQA accuracy per type ("overall"); flickr: every training caption as the
    answer to one request, scored by CIDEr-D and BLEU-4 against the photo's five captions."""
    if data == "shapes":
        profile = shapes_profile(get_profile("cpu"))
        (train_feats, train_ds), (eval_feats, eval_ds) = (split_features(profile, s, vision) for s in ("train", split))
        train_rows, eval_rows = question_rows(train_ds), question_rows(eval_ds, seed=1)[:questions]
        answers, types = [r["answer"] for r in eval_rows], [r["type"] for r in eval_rows]
        prior = text_prior_answers(train_rows)
        print("text prior:", json.dumps({k: round(v, 3) for k, v in
                                         vqa_accuracy([prior[t] for t in types], answers, types).items()}))
        return (profile, train_feats, train_rows, eval_feats, eval_rows,
                lambda said: vqa_accuracy(said, answers, types), 6)
    profile = get_profile("cpu")
    (train_feats, train_ds), (eval_feats, eval_ds) = (split_features(profile, s, vision) for s in ("train", split))
    train_rows = [{"image": i, "type": "caption", "instruction": CAPTION_REQUEST, "answer": clean_caption(c)}
                  for i, caps in enumerate(captions_for(train_feats, train_ds)) for c in caps]
    refs = captions_for(eval_feats, eval_ds)[:questions]
    eval_rows = [{"image": i, "type": "caption", "instruction": CAPTION_REQUEST, "answer": caps[0]}
                 for i, caps in enumerate(refs)]

    def score(said):
        return {**caption_metrics(said, refs), "distinct": len(set(said))}
    return profile, train_feats, train_rows, eval_feats, eval_rows, score, 24


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--designs", nargs="+", default=["mlp", "resampler", "flamingo"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16, help="question rows a step")
    ap.add_argument("--per-image", type=int, default=0,
                    help="k: batch-size / k photos a step, k questions each, sharing the photo's prefix pass")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-for", nargs="*", default=[], metavar="DESIGN=LR", help="a design's own learning rate")
    ap.add_argument("--proj-lr-scale-for", nargs="*", default=[], metavar="DESIGN=SCALE",
                    help="a design's own --proj-lr-scale")
    ap.add_argument("--gate-lr-scale", type=float, default=1.0, help="Flamingo's tanh gates learn at this multiple")
    ap.add_argument("--proj-lr-scale", type=float, default=1.0, help="a soft-prompt model's projection learns at this "
                    "multiple (stage 2's new projection: 10, Stage2Recipe.proj_lr_scale)")
    ap.add_argument("--data", choices=("shapes", "flickr"), default="shapes",
                    help="the shapes world's questions (VQA accuracy) or Flickr8k's captions, asked for with "
                         "'Describe the photo.' (CIDEr-D)")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--questions", type=int, default=240, help="how many of the split's questions to answer")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--eval-every", type=int, default=0, help="the split's accuracy every N steps (a curve)")
    ap.add_argument("--out")
    ap.add_argument("--save-curve", help="add each run to this recorded comparison (JSON, read by notebook 08)")
    ap.add_argument("--append", action="store_true", help="keep the runs already in --save-curve's file")
    args = ap.parse_args()
    lr_for, proj_scale_for = ({d: float(v) for d, v in (item.split("=") for item in items)}
                              for items in (args.lr_for, args.proj_lr_scale_for))
    recorded = {}

    vision = load_vision_encoder(get_profile("cpu"))
    profile, train_feats, train_rows, eval_feats, eval_rows, score, max_new = world(args.data, args.split,
                                                                                   args.questions, vision)
    headline, point_key = ("overall", "accuracy") if args.data == "shapes" else ("CIDEr-D", "CIDEr-D")
    blank = blank_image_features(vision)       # one grey photo stands in for every image: each question asked once
    llm = load_llm(get_profile("cpu"))
    for design in args.designs:
        for seed in args.seeds:
            model, inputs = build(design, llm, vision, seed, profile)
            per_image = args.per_image if getattr(model, "shares_image_prefix", False) else 0   # Flamingo, InstructBLIP
            train_x, eval_x, blank_x = inputs(train_feats.features), inputs(eval_feats.features), inputs(blank)
            card = design_card(DESIGNS[design], model)       # image tokens in the LLM's input, trainable weights
            trainable = card["trainable parameters"]
            scales = {n: args.gate_lr_scale for n, _ in model.named_parameters() if n.endswith("_gate")}
            if isinstance(model, SoftPromptVQA):
                scales["proj."] = proj_scale_for.get(design, args.proj_lr_scale)
            lr = lr_for.get(design, args.lr)
            config = TrainConfig(steps=args.steps, lr=lr, warmup_steps=5, seed=seed, desc=design, lr_scales=scales,
                                 eval_every=args.eval_every)

            eval_seconds = [0.0]

            def curve(m):
                start = time.perf_counter()
                value = score(answer_all(m, eval_x, eval_rows, max_new_tokens=max_new))[headline]
                eval_seconds[0] += time.perf_counter() - start
                return {point_key: value}

            def loss_with_gates(m, b):      # Flamingo's gates (tanh) logged at every step beside the loss
                out = {"loss": m(b["image_embeds"], b["instructions"], b["answers"])}
                if isinstance(m, FlamingoVQA):
                    out.update({f"{kind} {layer}": torch.tensor(value) for layer, gate in m.lm.gates().items()
                                for kind, value in gate.items()})
                return out
            start = time.perf_counter()
            result = train(model, instruction_batches(train_x, train_rows, args.batch_size, per_image),
                           loss_with_gates, config, eval_fn=curve if args.eval_every else None)
            seconds = time.perf_counter() - start
            seen = score(answer_all(model, eval_x, eval_rows, max_new_tokens=max_new))
            blind = score(answer_all(model, blank_x, [{**r, "image": 0} for r in eval_rows], max_new_tokens=max_new))
            row = {"design": design, "seed": seed, "steps": args.steps, "trainable": trainable, "lr": lr,
                   "batch": args.batch_size, "per_image": per_image, "gate_lr_scale": args.gate_lr_scale,
                   "proj_lr_scale": scales.get("proj."),
                   "s_per_step": round(seconds / args.steps, 2),
                   "last10_loss": round(last_mean(result.column("loss"), 10), 3),
                   "accuracy": {k: round(v, 3) for k, v in seen.items()},
                   "blank": {k: round(v, 3) for k, v in blind.items()},
                   "curve": [(e["step"], round(e[point_key], 3)) for e in result.evals],
                   "peak_mb_so_far": round(peak_memory_mb()), "threads": torch.get_num_threads()}
            if design == "flamingo":
                gates = [k for k in result.history[0] if k.startswith(("attn ", "ff "))]
                row["gate_curve"] = [{"step": h["step"] + 1, **{k: round(h[k], 3) for k in gates}}
                                     for h in result.history if (h["step"] + 1) % 10 == 0 or h["step"] == 0]
                model.lm.remove_hooks()
            print(json.dumps(row), flush=True)
            if args.save_curve:
                final = {args.split: row["accuracy"], "blank": row["blank"],
                         "trainable": trainable, "questions": len(eval_rows), "image_tokens": card["image tokens in the input"],
                         "last10_loss": row["last10_loss"],
                         "train_seconds_per_step": round((seconds - eval_seconds[0]) / args.steps, 2)}
                if design == "flamingo":
                    final["gates"] = [{"step": h["step"] + 1, **{k: round(h[k], 4) for k in gates}}
                                      for h in result.history]
                run = DesignRun(design, args.steps, lr, args.batch_size, per_image, seed, scales)
                recorded[f"{DESIGNS[design]}, seed {seed}"] = (run, result, final)
                what = ("VQA on the shapes world's {} questions" if args.data == "shapes" else
                        "captions of Flickr8k's {} photos (answers to 'Describe the photo.')").format(args.split)
                save_record(args.save_curve, f"{what}, designs side by side at one budget: {point_key} as each "
                            f"trains, with a blank photo at the end", recorded, append=args.append)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
