"""Command line of the course (cpu profile by default, or --profile / $VLMCOURSE_PROFILE):

  python -m vlmcourse doctor [--profile P] [--data ROOT]
  python -m vlmcourse train captioner --out DIR [--data ROOT] [--profile P] [--seed N] [--steps N]
  python -m vlmcourse caption --model DIR IMAGE...
  python -m vlmcourse evaluate --model DIR [--data ROOT] [--split test]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

DATA_HELP = "the Flickr8k folder; default $VLMCOURSE_DATA, then ../shared/flickr8k-subset"
PROFILE_HELP = "cpu (default, offline), hub or tiny; default $VLMCOURSE_PROFILE"


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def parser() -> argparse.ArgumentParser:
    from .captioner import CLI_TRAINING_TIME

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
    cap.add_argument("--seed", type=int, metavar="N", help="seed of both stages (default 0)")
    cap.add_argument("--steps", type=positive, metavar="N", help="stage-2 + LoRA steps (default: the recipe's)")
    cap.add_argument("--stage1-steps", type=positive, metavar="N", help="stage-1 steps (default: the recipe's)")

    run = commands.add_parser("caption", help="print 'path<TAB>caption' for each image")
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


def train_captioner_command(args) -> int:
    from .captioner import CaptionerRecipe, train_captioner
    from .recipes import save_trained

    out = Path(args.out)
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file()):
        raise FileExistsError(f"{out} exists and is not a saved captioner: choose a new or empty folder")
    recipe = CaptionerRecipe.cli_default().with_overrides(steps=args.steps, seed=args.seed,
                                                           stage1_steps=args.stage1_steps)
    with data_root(args.data):
        model, result = train_captioner(args.profile, recipe)
    save_trained(model, recipe, result, out)
    print(f"saved the captioner to {out} ({recipe.stage2.steps} steps in {result.seconds / 60:.1f} min, "
          f"dev loss {result.evals[-1]['dev_loss']:.3f})")
    return 0


def caption_command(args, batch_size: int = 16) -> int:
    from .captioner import load_captioner
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
                print(f"error: {error}", file=sys.stderr, flush=True)
                failed += 1
        for path, text in zip(paths, model.caption_images(images, vision) if images else []):
            print(f"{path}\t{' '.join(text.split())}", flush=True)    # one line, whatever the LLM wrote
    if failed:
        print(f"{failed} of {len(args.images)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


def evaluate_command(args) -> int:
    from .captioner import evaluate_captioner

    with data_root(args.data) as root:
        report = evaluate_captioner(args.model, args.profile, args.split, root)
    report.pop("predictions")
    print(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "doctor":
        from .doctor import doctor

        return doctor(args.profile, args.data)
    from transformers.utils import logging as hf_logging

    from .profiles import HubUnavailableError

    hf_logging.disable_progress_bar()       # no "Loading weights" bar between the command's own lines

    command = {"train": train_captioner_command, "caption": caption_command, "evaluate": evaluate_command}
    try:
        return command[args.command](args)
    except (OSError, ValueError, HubUnavailableError) as error:   # missing data or model, wrong profile, ...
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
