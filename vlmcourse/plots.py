"""The notebooks' figures (01-06, 08), kept apart from the models: only notebooks import this file.

Each function draws on a matplotlib axis or figure and returns it; none trains or changes a model.
Sections follow the course: patches and position embeddings (01), attention masks (03, 04),
contrastive learning and retrieval (02, 04), stage 1 (04), stage 2 and captions (05, 06), where the image enters
the LLM (08), and the recorded longer runs (04, 05, 07, 08). The attention-map figures and the explorer of notebook 07
live in ``viz.py``.
"""
from __future__ import annotations

import math
import textwrap
from typing import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch, Rectangle
from PIL import ImageOps

from .clip import MAX_LOGIT_SCALE
from .metrics import chance_recall
from .stage2 import IGNORE_INDEX, SoftPromptCaptioner
from .train import TrainResult


# ---------------------------------------------------------------------------- patches and position embeddings (notebook 01)
def tensor_to_image(pixel_values: torch.Tensor):
    """(3, H, W) or (1, 3, H, W) tensor in [0, 1] -> (H, W, 3) numpy array for `imshow`."""
    x = pixel_values.detach().float().cpu()
    if x.dim() == 4:
        x = x[0]
    return x.permute(1, 2, 0).clamp(0, 1).numpy()


def as_image_array(image) -> np.ndarray:
    """A (3, H, W) tensor in [0, 1], a PIL image or an (H, W, 3) array -> an array for `imshow`."""
    return tensor_to_image(image) if isinstance(image, torch.Tensor) else np.asarray(image)


def show_patch_grid(image, patch_size: int, ax=None, numbers: bool = True, color: str = "white", fontsize: int = 7):
    """Draw the photo with its patch grid, each patch labelled with its index in the sequence."""
    array = as_image_array(image)
    H, W = array.shape[:2]
    ax = ax or plt.gca()
    ax.imshow(array, extent=(0, W, H, 0))
    for x in range(0, W + 1, patch_size):
        ax.axvline(x, color=color, lw=0.8)
    for y in range(0, H + 1, patch_size):
        ax.axhline(y, color=color, lw=0.8)
    if numbers:
        cols = W // patch_size
        for r in range(H // patch_size):
            for c in range(cols):
                ax.text(
                    (c + 0.5) * patch_size, (r + 0.5) * patch_size, str(r * cols + c),
                    ha="center", va="center", color=color, fontsize=fontsize,
                    bbox=dict(boxstyle="square,pad=0.1", fc="black", alpha=0.35, lw=0),
                )
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def show_patch_strip(patches: torch.Tensor, patch_size: int, indices, ax=None, fontsize: int = 9):
    """Draw chosen patches (rows of a (N, P*P*C) patch tensor) side by side, as the transformer sees them."""
    if patches.dim() == 3:
        patches = patches[0]
    P = patch_size
    gap = max(1, P // 8)
    tiles = []
    for i in indices:
        tiles.append(patches[i].reshape(P, P, -1).clamp(0, 1).cpu().numpy())
        tiles.append(np.ones((P, gap, tiles[-1].shape[-1]), dtype=tiles[-1].dtype))
    strip = np.concatenate(tiles[:-1], axis=1)
    ax = ax or plt.gca()
    ax.imshow(strip)
    for k, i in enumerate(indices):
        ax.text(k * (P + gap) + P / 2, -P * 0.15, str(i), ha="center", va="bottom", fontsize=fontsize)
    ax.axis("off")
    return ax


def show_similarity_maps(sim: torch.Tensor, positions, axes, title: str = "", vmin=None, vmax=None):
    """One heatmap per (row, col) position: cosine similarity of its embedding to every other position.

    `sim` is the (h*w, h, w) output of `position_similarity(..., grid_size=(h, w))`.
    Returns the last image (for a colorbar).
    """
    h, w = sim.shape[-2:]
    im = None
    for ax, (r, c) in zip(axes, positions):
        im = ax.imshow(sim[r * w + c].numpy(), cmap="viridis", vmin=vmin, vmax=vmax)
        ax.plot(c, r, marker="s", ms=7, mfc="none", mec="red", mew=2)
        ax.set_title(f"{title}({r}, {c})", fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
    return im


def pca_rgb(tokens: torch.Tensor, grid_size: tuple[int, int]):
    """Project tokens (N, D) onto their top 3 principal components, scaled to [0, 1]: an (h, w, 3) image.

    Tokens with similar features get similar colours. The sign of each component
    is fixed so that its largest loading is positive (so colours are repeatable).
    """
    if tokens.dim() == 3:
        if tokens.shape[0] != 1:
            raise ValueError(f"Expected the tokens of one image, (N, D) or (1, N, D), got {tuple(tokens.shape)}.")
        tokens = tokens[0]
    h, w = grid_size
    if tokens.shape[0] != h * w:
        raise ValueError(f"{tokens.shape[0]} tokens do not fill a {h}x{w} grid.")
    x = tokens.detach().float().cpu()
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    v = v[:3]
    v = v * torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True)))
    proj = x @ v.T  # (N, 3)
    proj = (proj - proj.min(0).values) / (proj.max(0).values - proj.min(0).values).clamp_min(1e-8)
    return proj.reshape(h, w, 3).numpy()


# ---------------------------------------------------------------------------- attention masks (notebooks 03, 04)
def show_attention_mask(mask, labels, num_query_tokens: int, ax=None, title: str | None = None, query_every: int = 4,
                        fontsize: int = 11):
    """Draw one (L, L) self-attention mask: rows attend to columns, white = allowed.

    ``labels`` names the L positions (queries first, then the text tokens);
    only every ``query_every``-th query is labelled to keep the axes readable.
    """
    ax = ax or plt.gca()
    mask = torch.as_tensor(mask).bool().cpu()
    Q, L = num_query_tokens, mask.shape[-1]
    ax.imshow(mask.numpy(), cmap=ListedColormap(["#2b2d42", "#f8f9fa"]), vmin=0, vmax=1, interpolation="nearest")
    for edge in (Q - 0.5,):  # the query | text boundary
        ax.axhline(edge, color="#ef8354", lw=2)
        ax.axvline(edge, color="#ef8354", lw=2)
    ticks = [i for i in range(L) if i >= Q or i % query_every == 0]
    ax.set_xticks(ticks)
    ax.set_xticklabels([labels[i] for i in ticks], rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks)
    ax.set_yticklabels([labels[i] for i in ticks], fontsize=fontsize)
    ax.set_xlabel("is looked at (column)")
    ax.set_ylabel("looks (row)")
    if title:
        ax.set_title(title)
    return ax


# ---------------------------------------------------------------------------- contrastive learning and retrieval (notebooks 02, 04)
def plot_similarity(ax, matrix: torch.Tensor, title: str = "", fmt: str = "{:.2f}", cmap: str = "viridis",
                    row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
                    vmin=None, vmax=None):
    """Heatmap of a small matrix with its numbers written in, rows = images, columns = captions."""
    m = matrix.detach().float().cpu()
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax)
    lo, hi = (m.min().item(), m.max().item()) if vmin is None else (vmin, vmax)
    for (i, j), v in zip(((i, j) for i in range(m.shape[0]) for j in range(m.shape[1])), m.flatten().tolist()):
        light = (v - lo) / (hi - lo + 1e-9) < 0.6
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=13, color="white" if light else "black")
    ax.set_xticks(range(m.shape[1]), col_labels or [f"caption {j}" for j in range(m.shape[1])])
    ax.set_yticks(range(m.shape[0]), row_labels or [f"image {i}" for i in range(m.shape[0])])
    ax.set_title(title)
    return im


def plot_recall_bars(table, ax_per_direction=None, errors=None, title: str = ""):
    """Grouped bar chart of a `recall_table`: one panel per direction, one bar per model and K."""
    directions = list(dict.fromkeys(table.columns.get_level_values(0)))
    if ax_per_direction is None:
        fig, ax_per_direction = plt.subplots(1, len(directions), figsize=(6.5 * len(directions), 4.8), sharey=True)
    ks = list(dict.fromkeys(table.columns.get_level_values(1)))
    width = 0.8 / len(table)
    x = np.arange(len(ks))
    for ax, direction in zip(np.atleast_1d(ax_per_direction), directions):
        for i, name in enumerate(table.index):
            values = table.loc[name, direction].values.astype(float)
            err = None if errors is None or name not in errors.index else errors.loc[name, direction].values
            bars = ax.bar(x + (i - (len(table) - 1) / 2) * width, values, width, yerr=err, capsize=3, label=name)
            ax.bar_label(bars, fmt="%.0f", fontsize=10, padding=2)
        ax.set_xticks(x, ks)
        ax.set_title(direction.replace("->", " → "))
        ax.set_ylabel("recall (%)")
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    fig = np.atleast_1d(ax_per_direction)[0].figure
    handles, labels = np.atleast_1d(ax_per_direction)[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    return ax_per_direction


def plot_history(runs: Sequence[TrainResult], steps_per_epoch: int, batch_size: int, n_dev: int | None = None):
    """Loss curves (train: mean per epoch; dev: at the evaluated steps) and the learned 1/temperature.

    `runs` are `train_lit`'s results, one per seed: one thin line per run, the mean
    of the runs bold. Dashed lines mark log N, the loss of a uniform guess over the
    N candidates of a batch.
    """
    fig, (ax_loss, ax_scale) = plt.subplots(1, 2, figsize=(13, 4.3), gridspec_kw={"width_ratios": [1.6, 1]})
    epoch_losses, dev_losses = [], []
    for run in runs:
        loss = np.asarray(run.column("loss"))
        epochs = len(loss) // steps_per_epoch
        epoch_losses.append(loss[: epochs * steps_per_epoch].reshape(epochs, steps_per_epoch).mean(1))
        if run.column("dev_loss", "evals"):
            dev_losses.append(np.asarray(run.column("dev_loss", "evals")))
    x_train = np.arange(1, epochs + 1) - 0.5  # an epoch's mean sits at its middle
    for curve in epoch_losses:
        ax_loss.plot(x_train, curve, color="tab:blue", alpha=0.3, lw=1)
    ax_loss.plot(x_train, np.mean(epoch_losses, 0), color="tab:blue", lw=2.5, label="train (batch of %d)" % batch_size)
    if dev_losses:
        # an evaluation at (0-based) step s comes after s + 1 steps
        x_dev = (np.asarray(runs[0].column("step", "evals")) + 1) / steps_per_epoch
        for curve in dev_losses:
            ax_loss.plot(x_dev, curve, color="tab:orange", alpha=0.3, lw=1)
        ax_loss.plot(x_dev, np.mean(dev_losses, 0), color="tab:orange", lw=2.5, marker="o", ms=4,
                     label=f"dev (all {n_dev} images)" if n_dev else "dev")
    right = len(runs[0].history) / steps_per_epoch
    ax_loss.axhline(math.log(batch_size), color="tab:blue", ls="--", lw=1)
    ax_loss.text(right, math.log(batch_size), f"guess: log {batch_size} ", va="top", ha="right", color="tab:blue")
    if n_dev:
        ax_loss.axhline(math.log(n_dev), color="tab:orange", ls=":", lw=1)
        ax_loss.text(right, math.log(n_dev), f"guess: log {n_dev} ", va="bottom", ha="right", color="tab:orange")
    ax_loss.set_xlim(0, right)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("symmetric InfoNCE loss")
    ax_loss.set_ylim(0, math.log(max(batch_size, n_dev or 0)) + 0.9)
    ax_loss.legend(loc="upper right", bbox_to_anchor=(1, 0.74))
    ax_loss.grid(alpha=0.3)
    ax_loss.set_title(f"loss ({len(runs)} seeds: thin = each, bold = mean)")

    for run in runs:
        steps = np.asarray(run.column("step")) / steps_per_epoch
        ax_scale.plot(steps, run.column("inverse_temperature"), color="tab:green", alpha=0.7)
    # The full range up to CLIP's cap, so a small change looks small.
    ax_scale.axhline(MAX_LOGIT_SCALE, color="gray", ls="--", lw=1)
    ax_scale.text(0, MAX_LOGIT_SCALE, f"CLIP's cap: {MAX_LOGIT_SCALE:g}", va="top", color="gray")
    ax_scale.text(0, 1 / 0.07, "start: 1/0.07 ≈ 14.3", va="bottom", color="tab:green")
    ax_scale.set_ylim(0, MAX_LOGIT_SCALE * 1.05)
    ax_scale.set_xlabel("epoch")
    ax_scale.set_ylabel("1 / temperature")
    ax_scale.set_title("learned 1/τ = exp(logit_scale)")
    ax_scale.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_text_to_image_gallery(similarity: torch.Tensor, caption_to_image: torch.Tensor, captions: Sequence[str],
                               caption_ids: Sequence[int], load_image: Callable, k: int = 5):
    """For each chosen caption, its top-k photos; the correct photo gets a thick green frame."""
    fig = plt.figure(figsize=(2.6 * k, 3.2 * len(caption_ids)), layout="constrained")
    for subfig, t in zip(fig.subfigures(len(caption_ids), 1, hspace=0.04), caption_ids):
        truth = int(caption_to_image[t])
        rank = int((similarity[:, t] > similarity[truth, t]).sum()) + 1
        subfig.suptitle(textwrap.fill(f'"{captions[t]}"', 90) + f"   (correct photo: rank {rank})",
                        fontsize=13, x=0.01, ha="left")
        axes = subfig.subplots(1, k)
        for col, (ax, i) in enumerate(zip(axes, similarity[:, t].topk(k).indices.tolist())):
            ax.imshow(ImageOps.fit(load_image(i), (224, 224)))  # centre crop, no stretching
            ax.set_xticks([])
            ax.set_yticks([])
            hit = i == truth
            for spine in ax.spines.values():
                spine.set_edgecolor("limegreen" if hit else "lightgray")
                spine.set_linewidth(7 if hit else 1)
            ax.set_xlabel(f"#{col + 1}" + ("  ✓ correct" if hit else ""), fontsize=12,
                          color="green" if hit else "black", fontweight="bold" if hit else "normal")
    return fig


# ---------------------------------------------------------------------------- stage 1 (notebook 04)
def _smooth(values, window: int):
    values = np.asarray(values, dtype=float)
    if len(values) < window:
        return np.arange(len(values)), values
    kernel = np.ones(window) / window
    return np.arange(window - 1, len(values)), np.convolve(values, kernel, mode="valid")


def plot_stage1_history(runs: dict, batch_size: int = 32, eval_split: str = "dev", n_eval_images: int | None = None,
                        window: int = 10):
    """The three loss curves of stage-1 runs and their Recall@5 on ``eval_split`` as training goes (2 x 2 panels).

    ``runs``: {name: TrainResult} (``load_or_train_stage1``'s history). Thin lines are the raw
    per-step losses, bold ones a ``window``-step moving average. Dashed lines are what a model that
    has learned nothing scores: log B for ITC (a uniform guess over the batch) and the entropy of
    1 match in 3 for ITM (a head that cannot tell the pairs apart).
    """
    fig, axes = plt.subplots(2, 2, figsize=(15, 9.5))
    axes = axes.flatten()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    blind = {"itc": (math.log(batch_size), f"uniform guess: log {batch_size}"),
             "itm": (-(math.log(1 / 3) + 2 * math.log(2 / 3)) / 3, "blind head: 0.64")}
    titles = {"itc": "ITC (contrastive)", "itm": "ITM (matching, hard negatives), zoomed in",
              "itg": "ITG (captioning)"}
    for ax, name in zip(axes, ("itc", "itm", "itg")):
        for color, (label, run) in zip(colors, runs.items()):
            values = run.column(name)
            if not values:
                continue
            ax.plot(values, color=color, alpha=0.25, lw=1)
            ax.plot(*_smooth(values, window), color=color, lw=2.5, label=label)
        if name in blind:
            value, text = blind[name]
            ax.axhline(value, color="gray", ls="--", lw=1.5)
            ax.text(ax.get_xlim()[1], value, text + " ", color="dimgray", ha="right", va="top")
        ax.set(title=titles[name], xlabel="step", ylabel="loss")
        if name != "itm":
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax = axes[3]
    for color, (label, run) in zip(colors, runs.items()):
        steps = [s + 1 for s in run.column("step", "evals")]
        for key, style in ((f"{eval_split}_i2t_r5", "-o"), (f"{eval_split}_t2i_r5", ":s")):
            values = [100 * v for v in run.column(key, "evals")]
            if values:
                direction = "image→text" if "i2t" in key else "text→image"
                ax.plot(steps, values, style, color=color, lw=2, ms=6, label=f"{label}, {direction}")
    if n_eval_images:
        chance = 100 * chance_recall(n_eval_images)["image->text"][5]
        ax.axhline(chance, color="gray", ls="--", lw=1.5)
        ax.text(0, chance, f" chance ≈ {chance:.0f}%", color="dimgray", va="bottom")
    ax.set(title=f"Recall@5 on the {eval_split} split ({n_eval_images or 'all'} photos)", xlabel="step",
           ylabel="Recall@5 (%)", ylim=(0, 100))
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=11, loc="lower right")
    axes[0].legend(loc="lower left")
    fig.tight_layout()
    return fig


def plot_itm_histograms(groups: dict, ax=None, bins: int = 20, value_range: tuple | None = (0, 1)):
    """Overlaid histograms of ITM P(match), one per kind of pair (``itm_score_groups``).

    ``value_range=None`` zooms in on the scores' own range. A dotted line marks 1/3, the answer of a
    head that cannot tell pairs apart (1 match per 2 mismatches in training).
    """
    ax = ax or plt.subplots(figsize=(10, 4.8))[1]
    colors = {"matched": "tab:green", "random": "tab:gray", "hard negative": "tab:red"}
    if value_range is None:
        every = torch.cat([torch.as_tensor(v).float() for v in groups.values()])
        pad = 0.05 * float(every.max() - every.min()) + 1e-3
        value_range = (float(every.min()) - pad, float(every.max()) + pad)
    for kind, scores in groups.items():
        scores = torch.as_tensor(scores).float()
        color = colors.get(kind)
        ax.hist(scores.numpy(), bins=bins, range=value_range, alpha=0.25, color=color)
        ax.hist(scores.numpy(), bins=bins, range=value_range, histtype="step", lw=2.5, color=color,
                label=f"{kind} (mean {scores.mean():.2f})")
    if value_range[0] <= 1 / 3 <= value_range[1]:
        ax.axvline(1 / 3, color="black", ls=":", lw=1.5, label="blind head: 1/3")
    ax.set(xlabel="ITM head: P(match)", ylabel="pairs", xlim=value_range)
    ax.legend(fontsize=11)
    ax.grid(alpha=0.3)
    return ax


def plot_captions(images, generated: list[str], references: list[str], ncols: int = 3, width: int = 40):
    """Photos in a grid, each with the generated caption and a reference caption underneath."""
    nrows = math.ceil(len(images) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, 7.4 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, gen, ref in zip(axes.flat, images, generated, references):
        ax.imshow(image)
        ax.text(0, -0.03, textwrap.fill(f"ITG: {gen}", width), transform=ax.transAxes, va="top", fontsize=13,
                color="navy", weight="bold")
        lines = len(textwrap.wrap(f"ITG: {gen}", width))
        ax.text(0, -0.06 - 0.05 * lines, textwrap.fill(f"ref: {ref}", width), transform=ax.transAxes, va="top",
                fontsize=13, color="dimgray")
    fig.subplots_adjust(left=0.02, right=0.98, top=0.98, bottom=0.08, wspace=0.08, hspace=0.45)
    return fig


# ---------------------------------------------------------------------------- stage 2 and captions (notebooks 05, 06)
def plot_caption_gallery(images, captions: dict[str, list[str]], ncols: int = 4, width: int = 30):
    """Photos in a grid; under each, one line per entry of ``captions`` ({label: one caption per photo}),
    e.g. {"with stage 1": [...], "reference": [...]}."""
    nrows = math.ceil(len(images) / ncols)
    lines = len(captions)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.9 * ncols, (4.1 + 1.05 * lines) * nrows), squeeze=False)
    for ax in axes.flat[len(images):]:
        ax.axis("off")
    for k, (ax, image) in enumerate(zip(axes.flat, images)):
        ax.imshow(image)
        ax.set_xticks([])
        ax.set_yticks([])
        text = "\n".join(textwrap.fill(f"{label}: {caps[k] or '(empty)'}", width) for label, caps in captions.items())
        ax.set_xlabel(text, loc="left", fontsize=14, linespacing=1.15)
    fig.tight_layout()
    return fig


def plot_caption_ablation(rows: Sequence[dict], baselines: dict[str, dict], metric: str = "CIDEr-D", ax=None,
                          title: str = "", max_ratio: float = 4.0):
    """Grouped bars of a captioning ablation: one group per connector, a bar without LoRA and one with it, a black
    tick for the same model shown a blank photo; the baselines (``{name: {metric: value}}``) as reference lines.

    ``rows``: dicts with "connector", "LoRA" ("yes" / "no"), ``metric`` and f"{metric}, blank photo"; a row that is
    a mean over seeds also gives f"{metric}, per seed" (a list), drawn as dots on its bar. A baseline more than
    ``max_ratio`` times the best model (a human caption) would squash the bars, so it is named in a note at the top
    of the axis, with its value, instead of setting the scale."""
    ax = ax or plt.subplots(figsize=(12, 5))[1]
    connectors = list(dict.fromkeys(r["connector"] for r in rows))
    width, colors = 0.38, {"no": "tab:gray", "yes": "tab:blue"}
    for k, lora in enumerate(("no", "yes")):
        x = [i + (k - 0.5) * width for i, c in enumerate(connectors)]
        found = [next((r for r in rows if r["connector"] == c and r["LoRA"] == lora), None) for c in connectors]
        ax.bar([xi for xi, r in zip(x, found) if r], [r[metric] for r in found if r], width * 0.92,
               color=colors[lora], label="+ LoRA" if lora == "yes" else "frozen LLM")
        ax.scatter([xi for xi, r in zip(x, found) if r], [r[f"{metric}, blank photo"] for r in found if r],
                   marker="_", s=900, linewidths=2.5, color="black", zorder=3,
                   label="same model, blank photo" if k else None)
        seeds = [(xi, v) for xi, r in zip(x, found) if r for v in r.get(f"{metric}, per seed", [])]
        if seeds:
            ax.scatter(*zip(*seeds), s=36, color="white", edgecolors="black", zorder=4,
                       label="each seed (the bar: their mean)" if k else "_each seed")   # "_": once in the legend
    best = max(max(r[metric], r[f"{metric}, blank photo"], *r.get(f"{metric}, per seed", [])) for r in rows)
    shown = {name: v[metric] for name, v in baselines.items() if v[metric] <= max_ratio * best}
    off_scale = {name: v[metric] for name, v in baselines.items() if name not in shown}
    top = 1.15 * max([best, *shown.values()])
    for (name, value), style in zip(shown.items(), ("--", ":", "-.")):
        ax.axhline(value, color="tab:orange", ls=style, lw=1.6)
        ax.text(len(connectors) - 0.5, value, f"{textwrap.shorten(name, 48, placeholder='…')}: {value:.3f}",
                ha="right", va="bottom", fontsize=11, color="tab:orange")
    if off_scale:
        note = "; ".join(f"{name}: {value:.3f}" for name, value in off_scale.items())
        ax.text(0.01, 0.98, f"above the scale ↑ {note}", transform=ax.transAxes, ha="left", va="top", fontsize=11,
                color="tab:orange")
        top *= 1.12                                  # room for the note
    ax.set_xticks(range(len(connectors)), connectors)
    ax.set(ylim=(0, top), xlim=(-0.6, len(connectors) - 0.4), ylabel=metric, title=title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return ax


def plot_input_layout(captioner: SoftPromptCaptioner, image_embeds: torch.Tensor, captions: list[str], ax=None,
                      max_prompt_cells: int = 12):
    """What the LLM reads in training, from ``build_inputs`` itself: one strip per caption, one cell per position,
    coloured by kind, with the input token above and the label below (``·`` = -100, ignored by the loss).

    The Q soft prompts are drawn as one wide cell, and a long prompt by its last ``max_prompt_cells`` tokens.
    """
    _, attention_mask, labels = captioner.build_inputs(image_embeds, captions)
    q, p = captioner.num_soft_tokens, len(captioner.prompt_ids)
    colors = {"soft prompt": "#9ecae1", "prompt": "#fdd0a2", "caption": "#a1d99b", "EOS": "#e6550d", "padding": "#d9d9d9"}
    shown_prompt = list(range(max(0, p - max_prompt_cells), p))
    width = 3 + (1 if shown_prompt[0] > 0 else 0) + len(shown_prompt) + labels.shape[1] - q - p
    ax = ax or plt.subplots(figsize=(max(10, 0.62 * width), 1.5 * len(captions) + 0.8))[1]

    def token(i: int) -> str:
        text = captioner.tokenizer.decode([i])
        return repr(text)[1:-1] if text.strip() != text or not text else text

    for r in range(len(captions)):
        y = len(captions) - 1 - r
        cells = [(3, "soft prompt", f"{q} soft prompts", "·" * 3)]
        if shown_prompt[0] > 0:
            cells.append((1, "prompt", "…", "·"))
        cells += [(1, "prompt", token(int(captioner.prompt_ids[j])), "·") for j in shown_prompt]
        for pos in range(q + p, labels.shape[1]):
            label, real = int(labels[r, pos]), bool(attention_mask[r, pos])
            kind = "padding" if not real else "EOS" if label == captioner.eos_id else "caption"
            cells.append((1, kind, "EOS" if kind != "caption" else token(label),
                          "·" if label == IGNORE_INDEX else "EOS" if kind == "EOS" else str(label)))
        x = 0
        for w, kind, above, below in cells:
            ax.add_patch(Rectangle((x, y), w - 0.06, 0.55, color=colors[kind]))
            ax.text(x + (w - 0.06) / 2, y + 0.28, above, ha="center", va="center", fontsize=9, rotation=0 if w > 1 else 60)
            ax.text(x + (w - 0.06) / 2, y - 0.12, below, ha="center", va="center", fontsize=8,
                    color="black" if below != "·" else "gray")
            x += w
    ax.set(xlim=(-0.2, width + 0.2), ylim=(-0.5, len(captions)), xticks=[], yticks=[])
    for side in ax.spines.values():
        side.set_visible(False)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in colors.items()], ncol=5, loc="upper center",
              bbox_to_anchor=(0.5, 1.0 + 0.35 / len(captions)), frameon=False)
    return ax


# The whole model once (notebook 99): each box is a piece the course builds, with the notebook that builds it.
PATH_Y = 0.55   # the row an image travels along, left to right
COURSE_MAP = [  # (label, notebook, x, y, colour, frozen)
    ("photo → patches\n(a 7×7 grid)", "01", 0.02, PATH_Y, "#8a9ba8", False),
    ("image encoder\n(CNN or ViT)", "01-02", 0.20, PATH_Y, "#34495e", True),
    ("Q-Former: queries,\n3 masks, cross-attn.", "03", 0.40, PATH_Y, "#8e6cc0", False),
    ("stage 1: ITC · ITM · ITG", "04", 0.40, 0.15, "#8e6cc0", False),
    ("projection →\nsoft prompts", "05", 0.60, PATH_Y, "#3d8b5a", False),
    ("LLM (SmolLM2),\nLoRA trains in 06", "05-06", 0.78, PATH_Y, "#34495e", True),
    ("attention maps,\nexplorer", "07", 0.40, 0.88, "#d08a2e", False),
]


def plot_course_map(ax=None):
    """BLIP-2 drawn once: the pieces left to right in the order an image goes through them, each labelled with the
    notebook that builds it; dark boxes stay frozen, coloured ones train."""
    ax = ax or plt.subplots(figsize=(14, 4.2))[1]
    width, height = 0.17, 0.24
    for label, notebook, x, y, colour, frozen in COURSE_MAP:
        ax.add_patch(Rectangle((x, y - height / 2), width, height, color=colour, alpha=0.95))
        ax.text(x + width / 2, y + 0.02, label, ha="center", va="center", color="white", fontsize=10.5)
        ax.text(x + width / 2, y - height / 2 + 0.025, f"notebook {notebook}" + (" · frozen" if frozen else ""),
                ha="center", va="bottom", color="white", fontsize=9, style="italic")
    arrow = dict(arrowstyle="->", color="#555", lw=1.6)
    chain = [b for b in COURSE_MAP if b[3] == PATH_Y]
    for a, b in zip(chain, chain[1:]):
        ax.annotate("", xy=(b[2], PATH_Y), xytext=(a[2] + width, PATH_Y), arrowprops=arrow)
    q = next(b for b in COURSE_MAP if b[1] == "03")
    for other in ("04", "07"):
        b = next(c for c in COURSE_MAP if c[1] == other)
        top = b[3] + height / 2 if b[3] < q[3] else b[3] - height / 2
        start = q[3] - height / 2 if b[3] < q[3] else q[3] + height / 2
        ax.annotate("", xy=(q[2] + width / 2, top), xytext=(q[2] + width / 2, start),
                    arrowprops=dict(arrowstyle="<->" if other == "04" else "->", color="#555", lw=1.6))
    ax.set(xlim=(0, 0.97), ylim=(0, 1.02))
    ax.axis("off")
    return ax


# ---------------------------------------------------------------------------- beyond BLIP-2 (notebook 08)
def plot_vlm_designs(cards: Sequence[dict], text_tokens: int, num_layers: int):
    """Where each design puts the image (``vqa.design_card`` rows), in three panels: the positions of the LLM's input
    (image tokens, then ``text_tokens`` of question and answer), the LLM's ``num_layers`` layers (dark where a layer
    reads the image through a new cross-attention, light where it reads image tokens with its own self-attention),
    and the weights that train (log scale)."""
    fig, (seq, layers, params) = plt.subplots(1, 3, figsize=(16, 1.2 + 0.85 * len(cards)), layout="constrained",
                                              gridspec_kw={"width_ratios": [1.3, 1.1, 0.9]})
    y = np.arange(len(cards))[::-1]
    image_colour, text_colour = "#d62728", "#b0b0b0"
    for row, card in zip(y, cards):
        n = card["image tokens in the input"]
        seq.barh(row, n, color=image_colour, height=0.6)
        seq.barh(row, text_tokens, left=n, color=text_colour, height=0.6)
        seq.text(n + text_tokens + 1, row, f"{n} + {text_tokens}", va="center", fontsize=10)
        cross = card["image enters"].startswith("cross")
        for layer in range(num_layers):
            reads = layer in card["LLM layers that read the image"]
            colour = image_colour if reads and cross else ("#f4b6b6" if reads else "#eeeeee")
            layers.add_patch(Rectangle((layer, row - 0.3), 0.9, 0.6, color=colour))
        params.barh(row, card["trainable parameters"] / 1e6, color="#1f77b4", height=0.6)
        params.text(card["trainable parameters"] / 1e6 * 1.15, row, f"{card['trainable parameters'] / 1e6:.2f}M",
                    va="center", fontsize=10)
    seq.set(yticks=y, yticklabels=[c["design"] for c in cards], xlabel="positions in the LLM's input",
            title="what the LLM reads: image tokens, then the text")
    seq.set_xlim(0, max(c["image tokens in the input"] for c in cards) + text_tokens + 14)
    seq.legend(handles=[Patch(color=image_colour, label="image tokens"),
                        Patch(color=text_colour, label="question, answer")], loc="lower right", fontsize=9)
    layers.set(xlim=(0, num_layers), ylim=(y.min() - 0.6, y.max() + 0.6), yticks=[], xlabel="LLM layer",
               title="where the image is read")
    layers.legend(handles=[Patch(color=image_colour, label="new gated cross-attention"),
                           Patch(color="#f4b6b6", label="the LLM's own self-attention")], loc="lower right", fontsize=9)
    params.set(xscale="log", yticks=[], xlabel="trainable parameters (millions, log scale)", title="what trains")
    params.set_xlim(right=max(c["trainable parameters"] for c in cards) / 1e6 * 8)
    return fig


# ---------------------------------------------------------------------------- recorded longer runs (notebooks 04, 05, 07)
def plot_recorded_curve(record: dict, panels: dict[str, dict[str, tuple[str, float]]], split: str = "test",
                        mark_step: int | None = None, mark_label: str = "this notebook's run"):
    """A recorded run's figures (``recipes.recorded_run``) on ``split`` against the training step, in %: one panel
    per entry of ``panels``, {title: {label: (run name, key in its points, target)}}, each target dashed in its
    line's colour; a grey line at ``mark_step`` (the steps the notebook itself trains). A run name may be a list
    (one run per seed): the first is drawn as usual, the others fainter in the same colour."""
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 4.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    last = max(p["step"] for run in record["runs"].values() for p in run["points"])
    for ax, (title, series) in zip(axes[0], panels.items()):
        for color, (label, (runs, key, target)) in zip(colors, series.items()):
            for k, run in enumerate([runs] if isinstance(runs, str) else runs):
                points = record["runs"][run]["points"]
                # a point keeps a split's figures under the split's name, as "<split>_<key>", or (one split) "<key>"
                values = [100 * (p[split][key] if split in p else p.get(f"{split}_{key}", p.get(key))) for p in points]
                ax.plot([p["step"] for p in points], values, "-o", color=color, lw=2 if k == 0 else 1.2,
                        ms=5 if k == 0 else 3, alpha=1 if k == 0 else 0.45, label=None if k else label)
            if target is not None:
                ax.axhline(100 * target, color=color, ls="--", lw=1.2)
        if mark_step:
            ax.axvline(mark_step, color="gray", lw=1.5)
            ax.text(mark_step, 2, f" {mark_label}", color="dimgray", va="bottom")
        ax.set(title=title, xlabel="training step", ylabel=f"{split} (%)", ylim=(0, 102), xlim=(0, last * 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=10, loc="best")
    seeds = ", ".join(map(str, record["seeds"]))
    targets = any(target is not None for series in panels.values() for (_, _, target) in series.values())
    more = any(not isinstance(runs, str) and len(runs) > 1 for series in panels.values() for runs, _, _ in series.values())
    title = (f"Recorded runs, seed{'s' * (len(record['seeds']) > 1)} {seeds} ({record['machine']})"
             + ("; fainter: a further seed" if more else "") + ("; dashed: the targets" if targets else ""))
    fig.suptitle(textwrap.fill(title, 60 * len(panels) + 40), fontsize=11)   # two machines make a long title
    fig.tight_layout()
    return fig


def plot_gate_curve(gates: Sequence[dict], ax=None, title: str = "Flamingo's gates as it trains"):
    """tanh of a Flamingo model's gates against the training step: ``gates`` is one dict per step, {"step": s,
    "attn 10": ..., "ff 10": ...} (``flamingo.FlamingoLM.gates`` logged each step, as a recorded run keeps it).
    One colour per block (the decoder layer it precedes), solid the attention gate, dashed the feed-forward one."""
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4))
    steps = [g["step"] for g in gates]
    layers = sorted({int(k.split()[1]) for k in gates[0] if k != "step"})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, layer in zip(colors, layers):
        for kind, style in (("attn", "-"), ("ff", "--")):
            name = "attention" if kind == "attn" else "feed-forward"
            ax.plot(steps, [g[f"{kind} {layer}"] for g in gates], style, color=color, lw=2,
                    label=f"before layer {layer}: {name}")
    ax.axhline(0, color="gray", lw=1)
    ax.set(xlabel="training step", ylabel="tanh(gate)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, ncol=len(layers), loc="best")
    return ax
