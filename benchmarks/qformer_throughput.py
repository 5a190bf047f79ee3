"""Forward+backward throughput: vlmcourse.qformer.QFormer vs transformers.Blip2QFormerModel.

Same sizes, same weights (ours loads HF's state dict), train mode, on the CPU
(or CUDA if available). Two workloads:

* ``queries``: 32 queries reading the image, no text (how BLIP-2 feeds the LLM);
* ``queries+text``: 32 queries + 32 padded text tokens under the bi-directional
  (ITM) mask (HF built with ``use_qformer_text_input=True``).

HF is timed with its default SDPA attention and with ``attn_implementation="eager"``
(what it needs to return attention maps); ours uses SDPA unless maps are asked for.

Steps of the models are interleaved and the median step time is reported,
so a busy shared machine hurts all alike. Run by hand:

    python benchmarks/qformer_throughput.py            # MiniLM-sized, batch 16
    python benchmarks/qformer_throughput.py --steps 20 --batch 32
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from vlmcourse.reference import qformer_from_blip2


def step_time(fn, device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--patches", type=int, default=49)
    parser.add_argument("--encoder-dim", type=int, default=1280)
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    hf_config = Blip2QFormerConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden, encoder_hidden_size=args.encoder_dim, use_qformer_text_input=True,
    )
    hf = {impl: Blip2QFormerModel._from_config(hf_config, attn_implementation=impl).to(device).train()
          for impl in ("sdpa", "eager")}
    hf["eager"].load_state_dict(hf["sdpa"].state_dict())
    query_tokens = torch.randn(1, args.queries, args.hidden) * 0.02
    ours = qformer_from_blip2(hf["sdpa"], query_tokens).to(device).train()

    B, Q, T = args.batch, args.queries, args.text_len
    image = torch.randn(B, args.patches, args.encoder_dim, device=device)
    ids = torch.randint(1000, 30000, (B, T), device=device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[B // 2:, T // 2:] = 0  # half the captions are padded
    hf_queries = ours.query_tokens.detach().clone().requires_grad_()

    def ours_step(with_text):
        def step():
            out = ours(image, ids, mask, mask_type="itm") if with_text else ours(image)
            out.last_hidden_state.sum().backward()
        return step

    def hf_step(model, with_text):
        def step():
            queries = hf_queries.expand(B, -1, -1)
            if not with_text:
                out = model(query_embeds=queries, encoder_hidden_states=image)
            else:  # HF takes the text embeddings (ours, same weights) after the queries
                positions = torch.arange(T, device=device)
                text = ours.embeddings.word_embeddings(ids) + ours.embeddings.position_embeddings(positions)
                full_mask = torch.cat([torch.ones(B, Q, dtype=mask.dtype, device=device), mask], 1)
                out = model(query_embeds=torch.cat([queries, text], 1), query_length=Q, attention_mask=full_mask,
                            encoder_hidden_states=image)
            out.last_hidden_state.sum().backward()
        return step

    print(f"device={device}, threads={torch.get_num_threads()}, torch {torch.__version__}")
    print(f"config: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, {Q} queries, "
          f"{args.patches} image tokens of dim {args.encoder_dim}, batch {B}, text {T} tokens; "
          f"median of {args.steps} forward+backward steps (train mode)\n")
    rows = []
    for workload, with_text in [("queries", False), ("queries+text", True)]:
        steps = {"ours": ours_step(with_text), "HF sdpa": hf_step(hf["sdpa"], with_text),
                 "HF eager": hf_step(hf["eager"], with_text)}
        times = {name: [] for name in steps}
        for i in range(args.warmup + args.steps):
            order = list(steps)[i % 3:] + list(steps)[:i % 3]  # rotate who goes first
            for name in order:
                for model in (ours, *hf.values()):
                    model.zero_grad(set_to_none=True)
                t = step_time(steps[name], device)
                if i >= args.warmup:
                    times[name].append(t)
        median = {name: statistics.median(t) for name, t in times.items()}
        rows.append((workload, *(B / median[name] for name in steps),
                     median["HF sdpa"] / median["ours"], median["HF eager"] / median["ours"]))

    print(f"{'workload':<14}{'ours':>10}{'HF sdpa':>10}{'HF eager':>10}{'ours/HF sdpa':>14}{'ours/HF eager':>15}"
          "   (samples/s)")
    for workload, mine, sdpa, eager, r_sdpa, r_eager in rows:
        print(f"{workload:<14}{mine:>10.1f}{sdpa:>10.1f}{eager:>10.1f}{r_sdpa:>13.2f}x{r_eager:>14.2f}x")


if __name__ == "__main__":
    main()
