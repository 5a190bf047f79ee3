"""Command line of the course (cpu profile by default, or --profile / $VLMCOURSE_PROFILE):

  python -m vlmcourse doctor [--profile P] [--data ROOT]
  python -m vlmcourse train captioner --out DIR [--data ROOT] [--profile P] [--seed N] [--steps N]
  python -m vlmcourse train stage1|stage2 --out DIR [--data ROOT] [--profile P] [--seed N] [--steps N] [--batch-size B]
  accelerate launch --multi_gpu --num_processes N -m vlmcourse train ...   (N processes, one global batch)
  python -m vlmcourse caption --model DIR IMAGE...
  python -m vlmcourse evaluate --model DIR [--data ROOT] [--split test]

Exit codes: 0: ok; 1: some images could not be read (caption, evaluate, doctor); 2: bad arguments or a bad model or
data folder (the message names it); 3: an unexpected error (a bug: please report the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

# How long ``python -m vlmcourse train captioner`` takes with CaptionerRecipe.cli_default() (shown in --help).
CLI_TRAINING_TIME = ("about 25 minutes on a quiet 2-core CPU with bf16 (AVX512-BF16 or AMX; measured before the latest "
                     "speed-ups), about 45 on one without (AVX2 only: float32; measured: 2707 and 2680 s for seeds 0 and 1)")
DATA_HELP = "the Flickr8k folder; default $VLMCOURSE_DATA, then ../shared/flickr8k-subset"
PROFILE_HELP = "cpu (default, offline), hub or tiny; default $VLMCOURSE_PROFILE"


def at_least(low: int):
    def check(text: str) -> int:
        if not text.isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {low}, got {text!r}")
        return int(text)
    return check


positive = at_least(1)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m vlmcourse", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True)
    doc = commands.add_parser("doctor", help="check the environment, the data and the pretrained parts")
    doc.add_argument("--profile", help=PROFILE_HELP)
    doc.add_argument("--data", help=DATA_HELP)

    train = commands.add_parser("train", help="train a model and save it")
    what = train.add_subparsers(dest="what", required=True)
    timing = f"{CLI_TRAINING_TIME} with the default settings (cpu profile)"
    cap = what.add_parser("captioner", help=f"stage 1, stage 2 and LoRA: {timing}",
                          description=f"Train the captioner (stage-1 Q-Former, stage 2 and LoRA on the LLM, with "
                                      f"CaptionerRecipe.cli_default()) and save it to --out. It takes {timing}. "
                                      f"A stage-1 model trained before with the same settings is reused.")
    cap.add_argument("--out", required=True, metavar="DIR", help="folder to save to (created or replaced)")
    cap.add_argument("--data", metavar="ROOT", help=DATA_HELP)
    cap.add_argument("--profile", metavar="P", help=PROFILE_HELP)
    cap.add_argument("--seed", type=at_least(0), metavar="N", help="seed of both stages (default 0)")
    cap.add_argument("--steps", type=positive, metavar="N", help="stage-2 + LoRA steps (default: the recipe's)")
    cap.add_argument("--stage1-steps", type=positive, metavar="N", help="stage-1 steps (default: the recipe's)")
    for stage, does in (("stage1", "stage 1 (ITC, ITM, ITG) on the Q-Former"),
                        ("stage2", "stage 2: the stage-1 Q-Former's queries as soft prompts for the frozen LLM")):
        sub = what.add_parser(stage, help=f"{does}, with the notebooks' recipe",
                              description=f"Train {does} (the notebooks' recipe) and save it to --out.")
        sub.add_argument("--out", required=True, metavar="DIR", help="folder to save to (created or replaced)")
        sub.add_argument("--data", metavar="ROOT", help=DATA_HELP)
        sub.add_argument("--profile", metavar="P", help=PROFILE_HELP)
        sub.add_argument("--seed", type=at_least(0), metavar="N", help="seed (default 0)")
        sub.add_argument("--steps", type=positive, metavar="N", help="steps (default: the recipe's)")
        sub.add_argument("--batch-size", type=positive, metavar="B",
                         help="global batch: split over the processes of accelerate launch (default: the recipe's)")
        if stage == "stage2":
            sub.add_argument("--stage1-steps", type=positive, metavar="N", help="stage-1 steps (default: the recipe's)")

    run = commands.add_parser("caption", help="print 'path<TAB>caption' for each image (a backslash, tab or "
                                              "newline in the path printed as \\\\, \\t, \\n)")
    run.add_argument("--model", required=True, metavar="DIR", help="a folder saved by 'train captioner'")
    run.add_argument("--profile", metavar="P", help="default: the profile the model was trained with")
    run.add_argument("images", nargs="+", metavar="IMAGE")

    ev = commands.add_parser("evaluate", help="BLEU-4, CIDEr-D, baselines and diagnostics as JSON")
    ev.add_argument("--model", required=True, metavar="DIR", help="a folder saved by 'train captioner'")
    ev.add_argument("--data", metavar="ROOT", help=DATA_HELP)
    ev.add_argument("--split", default="test", choices=["train", "dev", "test"])
    ev.add_argument("--profile", metavar="P", help="default: the profile the model was trained with")
    return top


@contextmanager
def data_root(root: str | None):
    """--data reaches every loader as $VLMCOURSE_DATA (data.find_data_root), checked first, restored after."""
    from .data import DATA_ENV, find_data_root

    if root is None:
        yield None
        return
    path, before = find_data_root(root), os.environ.get(DATA_ENV)
    os.environ[DATA_ENV] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop(DATA_ENV, None)
        else:
            os.environ[DATA_ENV] = before


def prepare_processes(profile: str | None, llm: bool = False):
    """Under ``accelerate launch`` (several processes): join them, and let the main process fill the caches (image
    features, the converted LLM) before the others read them. Returns the LLM when ``llm`` (else None)."""
    from . import distributed as D
    from .backbones import load_llm
    from .profiles import get_profile
    from .features import split_features

    D.init()
    if D.launched_processes() == 1:
        return None
    with D.main_process_first():
        for split in ("train", "dev"):
            split_features(get_profile(profile), split)
        return load_llm(get_profile(profile)) if llm else None


def train_captioner_command(args) -> int:
    from .pipeline import train_captioner
    from .distributed import is_main_process
    from .recipes import CaptionerRecipe, check_replaceable, save_trained

    out = Path(args.out)
    check_replaceable(out)      # before training: refuse at once a folder of the user's files
    recipe = CaptionerRecipe.cli_default().with_overrides(steps=args.steps, seed=args.seed,
                                                           stage1_steps=args.stage1_steps)
    with data_root(args.data):
        llm = prepare_processes(args.profile, llm=True)
        model, result = train_captioner(args.profile, recipe, llm=llm)
    save_trained(model, recipe, result, out)
    if is_main_process():
        print(f"saved the captioner to {out} ({recipe.stage2.steps} steps in {result.seconds / 60:.1f} min, "
              f"dev loss {result.evals[-1]['dev_loss']:.3f})")
    return 0


def train_stage_command(args) -> int:
    """``train stage1`` / ``train stage2``: the notebooks' recipe, with the given steps, seed and global batch."""
    from dataclasses import replace

    from .distributed import is_main_process
    from .pipeline import train_stage1, train_stage2
    from .recipes import Stage1Recipe, Stage2Recipe, check_replaceable, save_trained

    out = Path(args.out)
    check_replaceable(out)
    given = {k: v for k, v in (("steps", args.steps), ("seed", args.seed), ("batch_size", args.batch_size))
             if v is not None}
    with data_root(args.data):
        if args.what == "stage1":
            recipe = replace(Stage1Recipe(), **given)
            prepare_processes(args.profile)
            model, result = train_stage1(args.profile, recipe)
            score = f"dev R@5 image->text {result.evals[-1]['dev_i2t_r5']:.2f}"
        else:
            stage1 = replace(Stage1Recipe(), **{k: v for k, v in (("steps", args.stage1_steps), ("seed", args.seed))
                                                 if v is not None})
            recipe = replace(Stage2Recipe(), stage1=stage1, **given)
            llm = prepare_processes(args.profile, llm=True)
            model, result = train_stage2(args.profile, recipe, llm=llm)
            score = f"dev loss {result.evals[-1]['dev_loss']:.3f}"
    save_trained(model, recipe, result, out)
    if is_main_process():
        print(f"saved the {args.what} model to {out} ({recipe.steps} steps in {result.seconds / 60:.1f} min, {score})")
    return 0


def one_line(path: str) -> str:
    """A path as one field of a tab-separated line: backslash, tab, newline and carriage return escaped."""
    return path.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def caption_command(args, batch_size: int = 16) -> int:
    from .lora import load_captioner
    from .data import ImageLoadError, load_image

    model, vision = load_captioner(args.model, args.profile)
    failed = 0
    for start in range(0, len(args.images), batch_size):
        paths, images = [], []
        for path in args.images[start:start + batch_size]:
            try:
                images.append(load_image(path))
                paths.append(path)
            except ImageLoadError as error:
                print(f"error: {one_line(str(error))}", file=sys.stderr, flush=True)
                failed += 1
        for path, text in zip(paths, model.caption_images(images, vision) if images else []):
            print(f"{one_line(path)}\t{' '.join(text.split())}", flush=True)    # one line, whatever the LLM wrote
    if failed:
        print(f"{failed} of {len(args.images)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


def evaluate_command(args) -> int:
    from .evaluate import evaluate_captioner

    with data_root(args.data) as root:
        report = evaluate_captioner(args.model, args.profile, args.split, root)
    report.pop("predictions")
    print(json.dumps(report, indent=2))
    if report["unreadable_images"]:
        print(f"error: {len(report['unreadable_images'])} {args.split} photos could not be read and were left out "
              f"of the scores: {', '.join(report['unreadable_images'])}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code (0, 1, 2 or 3) is documented in the module docstring (``--help``)."""
    args = parser().parse_args(argv)
    try:
        return run_command(args)
    except Exception as error:      # not the user's input or folders (run_command answers those with 2): a bug
        import traceback

        traceback.print_exc()
        print(f"error: unexpected {type(error).__name__}: {error} (exit code 3; please report the traceback above)",
              file=sys.stderr)
        return 3


def run_command(args) -> int:
    from .doctor import doctor
    from .profiles import HubUnavailableError

    if args.command != "doctor":     # doctor imports transformers itself, to report a broken install
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()       # no "Loading weights" bar between the command's own lines

    train = {"captioner": train_captioner_command, "stage1": train_stage_command, "stage2": train_stage_command}
    command = {"train": lambda a: train[a.what](a), "caption": caption_command, "evaluate": evaluate_command,
               "doctor": lambda a: doctor(a.profile, a.data)}
    try:
        return command[args.command](args)
    except (OSError, ValueError, HubUnavailableError) as error:   # missing data or model, wrong profile, ...
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
