"""Where do the Q-Former's queries look? Cross-attention maps, drawn on the photo.

In every cross-attention layer each of the Q queries spreads one unit of
attention over the N image patches (a softmax over the patches, per head). Laid
back on the patch grid, that row of probabilities is a picture: a *cross-attention
map*. This module

* collects them from our Q-Former (``cross_attention_maps``) or from Hugging
  Face's BLIP-2 (``blip2_cross_attention``), always as (layers, B, heads, Q, h, w);
* draws them on the photo (``upsample_map``, ``overlay``, ``query_grid``);
* sums them up in numbers: how spread out a map is (``attention_entropy``),
  where its mass sits (``attention_centroid``), and whether a query looks at
  the same place in every photo (``query_region_consistency``);
* puts it all behind sliders (``explorer``), with a static gallery for places
  where widgets cannot run (nbval, GitHub).

The figures of notebooks 01-06 are in plots.py; only notebooks import either file.

A map shows *where a query reads* in that layer: its output there is the
attention-weighted mix of the patches' value vectors. It is not an explanation of
what the model "thinks", and each head reads differently.
"""
from __future__ import annotations

import io
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.patches import Rectangle
from PIL import Image

from .plots import as_image_array
from .utils import eval_mode, in_jupyter_kernel

__all__ = [
    "cross_attention_maps",
    "query_input_similarity",
    "query_vectors",
    "mean_query_cosine",
    "distinct_queries",
    "query_collapse",
    "upsample_map",
    "overlay",
    "query_grid",
    "attention_entropy",
    "attention_centroid",
    "map_correlation",
    "query_similarity",
    "query_region_consistency",
    "plot_region_consistency",
    "hf_cross_attention_maps",
    "blip2_cross_attention_maps",
    "blip2_cross_attention",
    "blip2_display_image",
    "widgets_available",
    "static_gallery",
    "explorer",
]

CMAP = "inferno"
MIN_VMAX = 2.0  # colour scales (in multiples of uniform attention) never top out below this


# --------------------------------------------------------------------------- collecting maps
@torch.no_grad()
def cross_attention_maps(qformer, image_embeds: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Cross-attention probabilities of every query over the patch grid.

    Args:
        qformer: a :class:`vlmcourse.qformer.QFormer` (run in eval mode, no text:
            the queries alone, as for ITC features and for the LLM in stage 2).
        image_embeds: (B, N, D) patch tokens *as the Q-Former reads them* (for a
            stage-1 model: after ``model.image_adapter``).
        grid_size: (h, w) with h * w = N, row-major as the encoder flattened them.

    Returns:
        float32 CPU tensor (layers, B, heads, Q, h, w), one entry per
        cross-attention layer; each (h, w) map sums to 1.
    """
    h, w = grid_size
    if image_embeds.shape[1] != h * w:
        raise ValueError(f"{image_embeds.shape[1]} image tokens do not fill a {h}x{w} grid")
    with eval_mode(qformer):  # no dropout on the probabilities
        out = qformer(image_embeds=image_embeds, output_attentions=True)
    maps = torch.stack(out.cross_attentions)  # (layers, B, heads, Q, N)
    return maps.float().cpu().reshape(*maps.shape[:-1], h, w)


@torch.no_grad()
def query_vectors(qformer, image_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
    """The Q query vectors of every photo as they *enter* each cross-attention layer, and as they leave the
    Q-Former (what ITC and stage 2 read): {"entering layer 0": (B, Q, H), ..., "output": (B, Q, H)}, float32."""
    entering = []
    hooks = [(i, layer.cross_attn.register_forward_pre_hook(lambda module, args: entering.append(args[0].float())))
             for i, layer in enumerate(qformer.layers) if layer.cross_attn is not None]
    try:
        with eval_mode(qformer):
            out = qformer(image_embeds=image_embeds)
    finally:
        for _, hook in hooks:
            hook.remove()
    vectors = {f"entering layer {i}": x for (i, _), x in zip(hooks, entering)}
    return {**vectors, "output": out.query_output.float()}


def mean_query_cosine(vectors: torch.Tensor) -> torch.Tensor:
    """(B, Q, H) -> (B,): the mean cosine similarity of two different queries of the same photo."""
    unit = F.normalize(vectors.float(), dim=-1)
    Q = unit.shape[1]
    off_diagonal = ~torch.eye(Q, dtype=torch.bool, device=unit.device)
    return (unit @ unit.transpose(1, 2))[:, off_diagonal].reshape(len(unit), -1).mean(-1)


def distinct_queries(vectors: torch.Tensor, threshold: float = 0.99) -> torch.Tensor:
    """(B, Q, H) -> (B,): how many *different* vectors the Q queries of each photo are, counting queries at cosine
    >= ``threshold`` as one. Greedy: the first query left opens a group, every query that close to it joins.
    Q: as many questions as queries; 1: query collapse, all of them one vector."""
    unit = F.normalize(vectors.float().cpu(), dim=-1)
    counts = []
    for cosine in unit @ unit.transpose(1, 2):          # (Q, Q) per photo
        left, groups = torch.ones(len(cosine), dtype=torch.bool), 0
        while left.any():
            first = int(left.nonzero()[0])
            left &= cosine[first] < threshold
            groups += 1
        counts.append(groups)
    return torch.tensor(counts)


def query_collapse(qformer, image_embeds: torch.Tensor, thresholds: tuple[float, ...] = (0.9, 0.99)):
    """How far the queries have collapsed into one vector, stage by stage: a pandas DataFrame with one row per
    cross-attention layer (the queries entering it) and one for the Q-Former's output, giving the mean cosine of
    two queries of a photo and, for each threshold, the number of distinct queries (``distinct_queries``, mean over
    the photos). A loose threshold shows a partial collapse (a few groups), a strict one a complete one."""
    rows = []
    for stage, vectors in query_vectors(qformer, image_embeds).items():
        row = {"queries": stage, "mean cosine of two queries": mean_query_cosine(vectors).mean().item()}
        for t in thresholds:
            row[f"distinct queries (cosine < {t})"] = distinct_queries(vectors, t).float().mean().item()
        rows.append(row)
    return pd.DataFrame(rows).set_index("queries")


def query_input_similarity(qformer, image_embeds: torch.Tensor) -> torch.Tensor:
    """How alike the Q query vectors are as they *enter* each cross-attention layer: (layers,).

    The mean cosine similarity between two different queries (averaged over the
    batch). Near 1, the queries have become (almost) one vector, so they can only
    attend alike, whatever their maps looked like at the start.
    """
    vectors = query_vectors(qformer, image_embeds)
    return torch.stack([mean_query_cosine(v).mean() for stage, v in vectors.items() if stage != "output"]).cpu()


def hf_cross_attention_maps(cross_attentions, grid_size: tuple[int, int], num_prefix_tokens: int = 1):
    """Hugging Face ``cross_attentions`` (per layer (B, heads, Q, prefix + N)) -> maps over the patch grid.

    BLIP-2's image encoder puts a [CLS] token in front of the patches; it has no
    place on the grid, so it is cut off and each map is renormalised over the
    patches. Returns ``(maps, prefix_share)``: maps (layers, B, heads, Q, h, w)
    summing to 1, and (layers, B, heads, Q) the attention that went to the
    prefix token(s) before renormalising.
    """
    if cross_attentions is None or any(a is None for a in cross_attentions) or len(cross_attentions) == 0:
        raise ValueError("no cross-attention probabilities: load the model with attn_implementation=\"eager\" "
                         "(SDPA and flash attention do not return them) and pass output_attentions=True")
    h, w = grid_size
    probs = torch.stack([a.detach().float().cpu() for a in cross_attentions])  # (layers, B, heads, Q, prefix + N)
    if probs.shape[-1] != num_prefix_tokens + h * w:
        raise ValueError(f"{probs.shape[-1]} image tokens are not {num_prefix_tokens} prefix token(s) "
                         f"+ a {h}x{w} grid")
    prefix_share = probs[..., :num_prefix_tokens].sum(-1)
    patches = probs[..., num_prefix_tokens:]
    maps = patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)
    return maps.reshape(*maps.shape[:-1], h, w), prefix_share


def _blip2_pixel_values(processor, image) -> torch.Tensor:
    image_processor = getattr(processor, "image_processor", processor)  # a Blip2Processor or its image part
    return image_processor(images=image, return_tensors="pt")["pixel_values"]


def blip2_grid_size(model, pixel_values: torch.Tensor) -> tuple[int, int]:
    patch = model.config.vision_config.patch_size
    return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch


@torch.no_grad()
def blip2_cross_attention_maps(model, pixel_values: torch.Tensor):
    """The Q-Former cross-attention of a Hugging Face ``Blip2ForConditionalGeneration`` or ``Blip2Model``.

    Runs only what the maps depend on: the vision encoder, then the Q-Former on
    the learned query tokens (exactly as the model's own forward does; the
    language model is not needed). We call the Q-Former ourselves because
    ``Blip2ForConditionalGeneration.forward`` does not pass ``output_attentions``
    on to it (in transformers 5.x its ``qformer_outputs.cross_attentions`` is None), while
    ``Blip2Model`` does. The model must be loaded with
    ``attn_implementation="eager"``.

    Returns ``(maps, cls_share)`` as :func:`hf_cross_attention_maps`:
    (layers, B, heads, Q, h, w) and (layers, B, heads, Q).
    """
    vision_dtype = model.vision_model.embeddings.patch_embedding.weight.dtype
    device = model.query_tokens.device
    image_embeds = model.vision_model(pixel_values=pixel_values.to(device, vision_dtype)).last_hidden_state
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    qformer_outputs = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                                    output_attentions=True, return_dict=True)
    return hf_cross_attention_maps(qformer_outputs.cross_attentions, blip2_grid_size(model, pixel_values))


def blip2_display_image(processor, image):
    """The photo as BLIP-2 sees it: squashed to the processor's square size (no crop), for overlays."""
    image_processor = getattr(processor, "image_processor", processor)
    size = image_processor.size
    height, width = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    return image.convert("RGB").resize((width, height), Image.BICUBIC)


def blip2_cross_attention(model, processor, image, layer: int = -1, average_heads: bool = True) -> torch.Tensor:
    """One photo through BLIP-2: the maps of the ``layer``-th cross-attention layer (default: the last).

    Returns (Q, h, w) (averaged over heads) or (heads, Q, h, w); each map sums to
    1 over the patches ([CLS] removed, see :func:`hf_cross_attention_maps`).
    """
    maps, _ = blip2_cross_attention_maps(model, _blip2_pixel_values(processor, image))
    maps = maps[layer, 0]  # (heads, Q, h, w)
    return maps.mean(0) if average_heads else maps


# --------------------------------------------------------------------------- numbers
def upsample_map(attention: torch.Tensor, size) -> torch.Tensor:
    """Bilinear upsampling of (..., h, w) maps to (..., H, W) (``size`` an int or (H, W)), for drawing."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    attention = torch.as_tensor(attention).float()
    h, w = attention.shape[-2:]
    flat = attention.reshape(-1, 1, h, w)
    up = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return up.reshape(*attention.shape[:-2], *size)


def attention_entropy(maps: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each (h, w) map: (..., h, w) -> (...).

    0 = all attention on one patch; log(h * w) = spread evenly over all of them
    (the maximum: log 49 = 3.89 on a 7x7 grid). exp(entropy) reads as "the
    number of patches it effectively looks at".
    """
    p = maps.flatten(-2).float()
    return -torch.special.xlogy(p, p).sum(-1)


def attention_centroid(maps: torch.Tensor) -> torch.Tensor:
    """Where the attention mass of each (h, w) map sits: (..., h, w) -> (..., 2) as (row, col) in cells."""
    h, w = maps.shape[-2:]
    p = maps.float() / maps.float().sum((-2, -1), keepdim=True)
    rows = (p.sum(-1) * torch.arange(h, dtype=p.dtype)).sum(-1)
    cols = (p.sum(-2) * torch.arange(w, dtype=p.dtype)).sum(-1)
    return torch.stack([rows, cols], dim=-1)


def map_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two sets of maps over their cells: (..., h, w) x (..., h, w) -> (...).

    1: the same pattern (whatever the scale), 0: unrelated, -1: opposite. A flat
    map correlates with nothing (0, up to float rounding).
    """
    a, b = a.flatten(-2).float(), b.flatten(-2).float()
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


def query_similarity(maps: torch.Tensor) -> torch.Tensor:
    """(P, Q, h, w) maps of P photos -> (Q, Q): how alike two queries' maps are on the same photo.

    Entry (i, j) is the correlation of query i's and query j's maps, averaged
    over the photos. Off the diagonal, near 1 means the two queries read the
    same places: they ask the image the same question.
    """
    return map_correlation(maps[:, :, None], maps[:, None, :]).mean(0)


def query_region_consistency(maps: torch.Tensor):
    """Does each query look at the same place in every photo?

    Args:
        maps: (P, Q, h, w): one layer's maps (heads averaged) for P >= 2 photos.

    Returns a pandas DataFrame, one row per query:

    * ``consistency``: the correlation of the query's maps between two photos,
      averaged over all pairs of photos. Near 1: it reads the same region
      whatever the photo shows (a *positional* query); near 0: where it reads
      depends on the photo (content), or its maps are noise.
    * ``peak row``, ``peak col``: the cell where its average map (over the
      photos) is highest: *where* it looks, when it is consistent.
    * ``centroid spread``: how far (in cells) its per-photo centroid moves from
      photo to photo, on average.
    * ``entropy``: the mean entropy of its maps (nats).
    """
    P, Q, h, w = maps.shape
    if P < 2:
        raise ValueError("need the maps of at least 2 photos to compare them")
    pairs = map_correlation(maps[:, None], maps[None, :])  # (P, P, Q): photo i vs photo j, per query
    consistency = pairs[~torch.eye(P, dtype=torch.bool)].mean(0)  # all pairs of different photos
    peak = maps.float().mean(0).flatten(-2).argmax(-1)
    centroids = attention_centroid(maps)  # (P, Q, 2)
    spread = (centroids - centroids.mean(0)).norm(dim=-1).mean(0)
    return pd.DataFrame({
        "consistency": consistency.numpy(),
        "peak row": (peak // w).numpy(),
        "peak col": (peak % w).numpy(),
        "centroid spread": spread.numpy(),
        "entropy": attention_entropy(maps).mean(0).numpy(),
    }, index=pd.RangeIndex(Q, name="query"))


# --------------------------------------------------------------------------- drawing
def _muted(array: np.ndarray) -> np.ndarray:
    """The photo half desaturated and a little darker, so the colours on top stand out."""
    rgb = array[..., :3].astype(np.float32)
    rgb = rgb / 255.0 if rgb.max() > 1.0 else rgb
    gray = rgb.mean(-1, keepdims=True)
    return 0.8 * (0.5 * rgb + 0.5 * gray)


def overlay(ax, image, attention, vmax: float | None = None, title: str | None = None, alpha: float = 0.85,
            cmap: str = CMAP, grid: bool = False, fontsize: int = 12):
    """Draw ``image`` with one (h, w) attention map on top, bilinearly upsampled to the photo.

    Colours are in *multiples of uniform attention*: 1 means the 1/N share every
    patch would get if the query looked everywhere equally; ``vmax`` fixes the
    top of the scale (share it between panels to compare them; it is never below
    ``MIN_VMAX`` = 2, so a uniform map is drawn half-way up). Where attention
    is low the overlay is transparent, so the photo shows through. ``grid``
    draws the patch cells, a reminder that the map has only h x w numbers.
    Returns a ``ScalarMappable`` for a colour bar.
    """
    array = as_image_array(image)
    H, W = array.shape[:2]
    attention = torch.as_tensor(attention).float()
    h, w = attention.shape[-2:]
    times_uniform = upsample_map(attention * (h * w), (H, W)).numpy()
    # The scale tops out at least at 2x uniform, so a flat map looks flat (half-way), not saturated.
    vmax = max(float(vmax) if vmax is not None else float(times_uniform.max()), MIN_VMAX)
    norm = Normalize(0.0, vmax)
    level = np.clip(norm(times_uniform), 0, 1)
    rgba = plt.get_cmap(cmap)(level)
    rgba[..., 3] = alpha * np.sqrt(level)  # see-through where attention is low
    ax.imshow(_muted(array), extent=(0, W, H, 0))
    ax.imshow(rgba, extent=(0, W, H, 0))
    if grid:
        for x in np.linspace(0, W, w + 1)[1:-1]:
            ax.axvline(x, color="white", lw=0.6, alpha=0.5)
        for y in np.linspace(0, H, h + 1)[1:-1]:
            ax.axhline(y, color="white", lw=0.6, alpha=0.5)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)
    return ScalarMappable(norm=norm, cmap=cmap)


def _colorbar(fig, mappable, axes, label="attention (× uniform)"):
    bar = fig.colorbar(mappable, ax=axes, shrink=0.8, aspect=30)
    bar.set_label(label)
    return bar


def query_grid(image, maps: torch.Tensor, vmax: float | None = None, cols: int = 8, title: str | None = None,
               panel_size: float = 2.0, fontsize: int = 12):
    """All queries at once: one overlay per query in a grid (4 x 8 for 32 queries).

    ``maps`` is (Q, h, w) for one photo and one layer (heads averaged or one
    head). Every panel shares one colour scale (default: the largest value in
    any of them), so a diffuse query looks faint next to a focused one; each
    title gives the query and its entropy in nats.
    """
    Q, h, w = maps.shape
    rows = math.ceil(Q / cols)
    vmax = vmax if vmax is not None else float(maps.amax()) * h * w
    entropy = attention_entropy(maps)
    size = (cols * panel_size + 1.2, rows * (panel_size + 0.3) + 0.4 * bool(title))
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
    mappable = None
    for q, ax in enumerate(axes.flat):
        if q >= Q:
            ax.axis("off")
            continue
        mappable = overlay(ax, image, maps[q], vmax=vmax, title=f"q{q} · {entropy[q]:.2f}", fontsize=fontsize)
    _colorbar(fig, mappable, axes)
    if title:
        fig.suptitle(title, fontsize=fontsize + 3)
    return fig


def plot_region_consistency(table, mean_maps: torch.Tensor, threshold: float = 0.5, top: int = 8, image=None,
                            fontsize: int = 12):
    """Two panels from :func:`query_region_consistency`.

    Left: every query's consistency, sorted (bars above ``threshold`` are
    "positional"). Right: the ``top`` most consistent queries' average maps
    (``mean_maps``, (Q, h, w), e.g. averaged over the photos), each on the
    grid (or on ``image``), titled with the query and its consistency.
    """
    order = table["consistency"].sort_values(ascending=False)
    fig = plt.figure(figsize=(16, 5.4), layout="constrained")
    grid = fig.add_gridspec(2, 1 + top // 2, width_ratios=[2.6] + [1] * (top // 2))
    ax = fig.add_subplot(grid[:, 0])
    colors = ["#ef8354" if r >= threshold else "#8d99ae" for r in order]
    ax.bar(range(len(order)), order.values, color=colors)
    ax.axhline(threshold, color="#2b2d42", lw=1, ls="--")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([f"{q}" for q in order.index], fontsize=max(fontsize - 2, 7), rotation=90)
    ax.set_xlabel("query (sorted)", fontsize=fontsize)
    ax.set_ylabel("same region in every photo?\n(mean correlation between photos)", fontsize=fontsize)
    ax.set_ylim(min(-0.1, float(order.min()) - 0.05), 1)
    h, w = mean_maps.shape[-2:]
    vmax = max(float(mean_maps[list(order.index[:top])].amax()) * h * w, MIN_VMAX)
    panels, mappable = [], None
    for k, q in enumerate(order.index[:top]):
        sub = fig.add_subplot(grid[k // (top // 2), 1 + k % (top // 2)])
        if image is not None:
            mappable = overlay(sub, image, mean_maps[q], vmax=vmax, fontsize=fontsize)
        else:
            mappable = sub.imshow((mean_maps[q] * h * w).numpy(), cmap=CMAP, vmin=0, vmax=vmax)
            sub.set_xticks([])
            sub.set_yticks([])
        sub.set_title(f"q{q} · r = {order[q]:.2f}", fontsize=fontsize)
        panels.append(sub)
    fig.colorbar(mappable, ax=panels, shrink=0.85, aspect=25).set_label("attention (× uniform)")
    return fig


# --------------------------------------------------------------------------- explorer
def widgets_available() -> bool:
    """True inside a Jupyter kernel (one that can talk to widgets) with ipywidgets installed.

    False in plain Python and pytest, in a terminal IPython, and when ipywidgets
    is missing or broken. A kernel cannot tell whether a browser is watching, so
    under nbconvert / nbval this is True too: that is why :func:`explorer`
    always draws its static gallery first.
    """
    try:
        import ipywidgets  # noqa: F401
    except Exception:  # not installed, or an incompatible version that fails on import
        return False
    return in_jupyter_kernel()


def _head_label(head) -> str:
    return "mean of heads" if head in (None, "mean") else f"head {head}"


def _select(maps: torch.Tensor, photo: int, layer: int, query: int, head) -> torch.Tensor:
    chosen = maps[layer, photo, :, query]  # (heads, h, w)
    return chosen.mean(0) if head in (None, "mean") else chosen[int(head)]


def plot_view(images, maps: torch.Tensor, photo: int = 0, layer: int = -1, query: int = 0, head="mean",
              layer_names=None, photo_names=None, fontsize: int = 13):
    """One explorer view: the map on the photo (left) and its h x w numbers (right)."""
    layer_names = layer_names or [f"cross-attention {i}" for i in range(maps.shape[0])]
    attention = _select(maps, photo, layer, query, head)
    h, w = attention.shape
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5.0), gridspec_kw={"width_ratios": [1, 1.15]},
                                      layout="constrained")
    overlay(left, images[photo], attention, grid=True, fontsize=fontsize)
    name = photo_names[photo] if photo_names else f"photo {photo}"
    left.set_title(f"{name} · query {query}", fontsize=fontsize)
    values = (attention * h * w).numpy()
    im = right.imshow(values, cmap=CMAP, vmin=0, vmax=max(float(values.max()), MIN_VMAX))
    if h * w <= 100:
        for r in range(h):
            for c in range(w):
                right.text(c, r, f"{values[r, c]:.1f}", ha="center", va="center", fontsize=fontsize - 3,
                           color="black" if values[r, c] > 0.6 * max(values.max(), MIN_VMAX) else "white")
    right.set_xticks([])
    right.set_yticks([])
    entropy = float(attention_entropy(attention))
    right.set_title(f"{layer_names[layer]} · {_head_label(head)}\nentropy {entropy:.2f} of max "
                    f"{math.log(h * w):.2f} nats", fontsize=fontsize)
    fig.colorbar(im, ax=right, fraction=0.046, pad=0.03).set_label("attention (× uniform)")
    return fig


def static_gallery(images, maps: torch.Tensor, query: int = 0, head="mean", layer_names=None, photo_names=None,
                   max_photos: int = 3, fontsize: int = 12):
    """The explorer without widgets: rows = photos, columns = layers, for one query (shared colour scale)."""
    L, P = maps.shape[:2]
    P = min(P, max_photos)
    layer_names = layer_names or [f"cross-attention {i}" for i in range(L)]
    chosen = torch.stack([torch.stack([_select(maps, p, l, query, head) for l in range(L)]) for p in range(P)])
    h, w = chosen.shape[-2:]
    vmax = float(chosen.amax()) * h * w
    fig, axes = plt.subplots(P, L, figsize=(3.3 * L + 1.2, 3.4 * P + 0.5), squeeze=False, layout="constrained")
    mappable = None
    for p in range(P):
        for l in range(L):
            entropy = float(attention_entropy(chosen[p, l]))
            mappable = overlay(axes[p, l], images[p], chosen[p, l], vmax=vmax, fontsize=fontsize,
                               title=f"{layer_names[l]} · H = {entropy:.2f}" if p == 0 else f"H = {entropy:.2f}")
        axes[p, 0].set_ylabel(photo_names[p] if photo_names else f"photo {p}", fontsize=fontsize)
    _colorbar(fig, mappable, axes)
    fig.suptitle(f"query {query} · {_head_label(head)} (static view: sliders need a live Jupyter kernel)",
                 fontsize=fontsize + 2)
    return fig


def explorer(images, maps: torch.Tensor, layer_names=None, photo_names=None, query: int = 0, head="mean",
             interactive: bool | None = None):
    """Browse the maps by photo, layer, query and head.

    Always draws :func:`static_gallery` (so an executed notebook, nbval and
    GitHub show images). Then, where widgets can run (``interactive=None``:
    :func:`widgets_available`), returns an ipywidgets UI (dropdowns and a query
    slider around :func:`plot_view`): make it the last line of a cell to show
    it. Returns None when there are no widgets.

    Args:
        images: the P photos (PIL images or arrays, as the encoder saw them).
        maps: (layers, P, heads, Q, h, w), e.g. from :func:`cross_attention_maps`.
    """
    L, P, heads, Q = maps.shape[:4]
    layer_names = list(layer_names or [f"cross-attention {i}" for i in range(L)])
    static_gallery(images, maps, query=query, head=head, layer_names=layer_names, photo_names=photo_names)
    plt.show()
    if interactive is None:
        interactive = widgets_available()
    if not interactive:
        return None
    try:
        return _widget_ui(images, maps, layer_names, photo_names, query, head)
    except Exception as error:  # a broken widget install must not break the notebook
        print(f"(interactive explorer unavailable: {type(error).__name__}: {error})")
        return None


def _widget_ui(images, maps, layer_names, photo_names, query, head):
    import ipywidgets as widgets

    L, P, heads, Q = maps.shape[:4]
    photo_names = photo_names or [f"photo {p}" for p in range(P)]
    controls = {
        "photo": widgets.Dropdown(options=[(name, p) for p, name in enumerate(photo_names)], value=0,
                                  description="photo"),
        "layer": widgets.Dropdown(options=[(name, l) for l, name in enumerate(layer_names)], value=L - 1,
                                  description="layer"),
        "query": widgets.IntSlider(value=query, min=0, max=Q - 1, description="query", continuous_update=False),
        "head": widgets.Dropdown(options=[("mean of heads", "mean")] + [(f"head {k}", k) for k in range(heads)],
                                 value=head, description="head"),
    }

    picture = widgets.Image(format="png")

    def draw(change=None):
        # Drawn to PNG bytes for an Image widget rather than captured by an Output widget: simpler, and
        # nbclient (nbconvert, nbval) can stall on Output widgets that hold a figure.
        fig = plot_view(images, maps, *(controls[k].value for k in ("photo", "layer", "query", "head")),
                        layer_names=layer_names, photo_names=photo_names)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80)
        plt.close(fig)
        picture.value = buffer.getvalue()

    for control in controls.values():
        control.observe(draw, names="value")
    draw()

    class Explorer(widgets.VBox):
        def __repr__(self):  # what a page that cannot run widgets (GitHub) prints instead
            return "Attention explorer: run the notebook in Jupyter or Colab to use the sliders."

    return Explorer([widgets.HBox(list(controls.values())[:2]), widgets.HBox(list(controls.values())[2:]), picture])


def plot_object_attention(images, maps: torch.Tensor, objects: list[list[dict]], grid: tuple[int, int] = (7, 7),
                          panel_size: float = 3.4, fontsize: int = 11):
    """Shapes world: for each object of each photo, the map of the query that puts the most attention on it.

    ``maps``: (photos, Q, h, w), one layer with its heads averaged; ``objects``: each photo's ground truth
    (``shapes.ShapesDataset.objects``, whose ``cells`` are on the h x w patch grid). Each panel outlines the
    object's cells and gives the query and the share of its attention that lands on them.
    Returns the figure."""
    h, w = grid
    columns = max(len(objs) for objs in objects)
    fig, axes = plt.subplots(len(images), columns, figsize=(panel_size * columns + 1.2, panel_size * len(images)),
                             squeeze=False, layout="constrained")
    mappable = None
    for row, (image, photo_maps, objs) in enumerate(zip(images, maps, objects)):
        array = as_image_array(image)
        cell_h, cell_w = array.shape[0] / h, array.shape[1] / w
        for ax in axes[row, len(objs):]:
            ax.axis("off")
        for ax, obj in zip(axes[row], objs):
            inside = torch.zeros(h * w, dtype=torch.bool)
            inside[[i * w + j for i, j in obj["cells"]]] = True
            mass = photo_maps.reshape(len(photo_maps), h * w).float()[:, inside].sum(-1)   # (Q,)
            q = int(mass.argmax())
            mappable = overlay(ax, image, photo_maps[q], title=f"{obj['colour']} {obj['shape']}: query {q}, "
                               f"{mass[q]:.0%} on it", fontsize=fontsize)
            for i, j in obj["cells"]:
                ax.add_patch(Rectangle((j * cell_w, i * cell_h), cell_w, cell_h, fill=False, ec="white", lw=1.2,
                                       ls="--"))
    if mappable is not None:
        _colorbar(fig, mappable, axes)
    return fig
