"""Where the image enters a frozen LLM, side by side on the shapes world's questions (issue 21; notebook 08).

Each design trains the same number of steps on the same instruction rows (``pipeline.question_rows``: the train
scenes' questions, one-word answers), with SmolLM2 frozen, and answers the dev (or test)
questions greedily. Printed per design: image tokens added to the LLM's input, trainable parameters, seconds a step,
VQA accuracy per question type, the same model shown a blank photo, and the text-only prior.

    python benchmarks/vqa_designs.py --designs mlp resampler flamingo --steps 60 --split dev
    python benchmarks/vqa_designs.py --designs qformer-tuned instructblip --lr 3e-4 --proj-lr-scale 10   # InstructBLIP

With ``--eval-every N`` each design's dev accuracy is recorded every N steps; Flamingo's gates (tanh) are logged at
every step and printed every 10 (``gate_curve``).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from vlmcourse import get_profile
from vlmcourse.backbones import load_llm, load_text_encoder, load_vision_encoder
from vlmcourse.evaluate import blank_image_features
from vlmcourse.features import split_features
from vlmcourse.flamingo import PerceiverResampler, ResamplerConfig
from vlmcourse.instruct import text_prior_answers, vqa_accuracy
from vlmcourse.llava import MLPConnector, llava_connector
from vlmcourse.connectors import MeanPoolConnector, PrecomputedConnector, QFormerConnector
from vlmcourse.pipeline import load_or_train_stage1, question_rows
from vlmcourse.recipes import SHAPES_STAGE1, shapes_profile
from vlmcourse.utils import in_batches, peak_memory_mb, seed_everything
from vlmcourse.train import TrainConfig, train
from vlmcourse.instructblip import InstructQFormerConnector
from vlmcourse.vqa import FlamingoVQA, InstructBLIPVQA, SoftPromptVQA, answer_all, instruction_batches


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
    if design in ("qformer-tuned", "instructblip"):   # notebook 04's shapes stage-1 Q-Former, trained on (BLIP-2)
        stage1, _ = load_or_train_stage1(profile, SHAPES_STAGE1)  # with the question in its self-attention or not
        seed_everything(seed)
        width = stage1.qformer.config.hidden_size
        if design == "qformer-tuned":
            return SoftPromptVQA(QFormerConnector(stage1.qformer, stage1.image_adapter), width, llm), same
        connector = InstructQFormerConnector(stage1.qformer, stage1.image_adapter)
        return InstructBLIPVQA(connector, width, llm, load_text_encoder(profile).tokenizer), same
    if design == "qformer":     # notebook 04's shapes stage-1 Q-Former, frozen: its query outputs computed once
        stage1, _ = load_or_train_stage1(profile, SHAPES_STAGE1)
        connector = QFormerConnector(stage1.qformer, stage1.image_adapter).eval()
        seed_everything(seed)
        model = SoftPromptVQA(PrecomputedConnector(connector.num_tokens, stage1.qformer.config.hidden_size),
                              stage1.qformer.config.hidden_size, llm)

        @torch.no_grad()
        def query_outputs(x):
            return in_batches(lambda b: connector(b.float()), x, batch_size=64)
        return model, query_outputs
    raise ValueError(design)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--designs", nargs="+", default=["mlp", "resampler", "flamingo"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16, help="question rows a step")
    ap.add_argument("--per-image", type=int, default=0,
                    help="k: batch-size / k photos a step, k questions each, sharing the photo's prefix pass")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--gate-lr-scale", type=float, default=1.0, help="Flamingo's tanh gates learn at this multiple")
    ap.add_argument("--proj-lr-scale", type=float, default=1.0, help="a soft-prompt model's projection learns at this "
                    "multiple (stage 2's new projection: 10, Stage2Recipe.proj_lr_scale)")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--questions", type=int, default=240, help="how many of the split's questions to answer")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--eval-every", type=int, default=0, help="the split's accuracy every N steps (a curve)")
    ap.add_argument("--out")
    args = ap.parse_args()

    profile = shapes_profile(get_profile("cpu"))
    vision = load_vision_encoder(profile)
    (train_feats, train_ds), (eval_feats, eval_ds) = (split_features(profile, s, vision) for s in ("train", args.split))
    train_rows, eval_rows = question_rows(train_ds), question_rows(eval_ds, seed=1)[:args.questions]
    answers, types = [r["answer"] for r in eval_rows], [r["type"] for r in eval_rows]
    prior = text_prior_answers(train_rows)
    print("text prior:", json.dumps({k: round(v, 3) for k, v in
                                     vqa_accuracy([prior[t] for t in types], answers, types).items()}))
    blank = blank_image_features(vision)       # one grey photo stands in for every image: each question asked once
    llm = load_llm(get_profile("cpu"))
    for design in args.designs:
        for seed in args.seeds:
            model, inputs = build(design, llm, vision, seed, profile)
            per_image = args.per_image if getattr(model, "shares_image_prefix", False) else 0   # Flamingo, InstructBLIP
            train_x, eval_x, blank_x = inputs(train_feats.features), inputs(eval_feats.features), inputs(blank)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            scales = {n: args.gate_lr_scale for n, _ in model.named_parameters() if n.endswith("_gate")}
            if isinstance(model, SoftPromptVQA):
                scales["proj."] = args.proj_lr_scale
            config = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=5, seed=seed, desc=design, lr_scales=scales,
                                 eval_every=args.eval_every)

            def curve(m):
                return {"accuracy": vqa_accuracy(answer_all(m, eval_x, eval_rows), answers, types)["overall"]}
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
            seen = vqa_accuracy(answer_all(model, eval_x, eval_rows), answers, types)
            blind = vqa_accuracy(answer_all(model, blank_x, [{**r, "image": 0} for r in eval_rows]), answers, types)
            row = {"design": design, "seed": seed, "steps": args.steps, "trainable": trainable, "lr": args.lr,
                   "batch": args.batch_size, "per_image": per_image, "gate_lr_scale": args.gate_lr_scale,
                   "proj_lr_scale": args.proj_lr_scale,
                   "s_per_step": round(seconds / args.steps, 2),
                   "last10_loss": round(sum(result.column("loss")[-10:]) / len(result.column("loss")[-10:]), 3),
                   "accuracy": {k: round(v, 3) for k, v in seen.items()},
                   "blank": {k: round(v, 3) for k, v in blind.items()},
                   "curve": [(e["step"], round(e["accuracy"], 3)) for e in result.evals],
                   "peak_mb_so_far": round(peak_memory_mb()), "threads": torch.get_num_threads()}
            if design == "flamingo":
                gates = [k for k in result.history[0] if k.startswith(("attn ", "ff "))]
                row["gate_curve"] = [{"step": h["step"] + 1, **{k: round(h[k], 3) for k in gates}}
                                     for h in result.history if (h["step"] + 1) % 10 == 0 or h["step"] == 0]
                model.lm.remove_hooks()
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
