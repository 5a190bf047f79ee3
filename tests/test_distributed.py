"""Training on several processes (distributed.py): 2 CPU processes over gloo give what 1 process gives on the
whole batch, and in a single process every change is the identity (bit for bit)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from test_captioner import world  # noqa: F401  (the colour photos, an empty cache, the tiny LLM's tokenizer)

from vlmcourse import distributed as D
from vlmcourse import losses as L
from vlmcourse.__main__ import main
from vlmcourse.backbones import load_text_encoder
from vlmcourse.stage1 import Stage1Config, Stage1Model

IDS = ["a", "b", "c", "a", "d", "e", "f", "b"]          # photos a and b twice: positives across the two processes


def tiny_stage1(itm_batch_size=4):
    torch.manual_seed(0)
    return Stage1Model.from_text_encoder(load_text_encoder("tiny"), image_hidden_size=24, num_image_tokens=9,
                                         config=Stage1Config(num_query_tokens=4, itm_batch_size=itm_batch_size))


def global_batch():
    """8 rows; the generator draws ITM's negatives, the same in every process."""
    image_embeds = torch.randn(8, 9, 24, generator=torch.Generator().manual_seed(1))
    captions = [f"photo {i} shows " + "a dog " * (i % 4) for i in range(8)]    # unequal lengths: padding differs
    return {"image_embeds": image_embeds, "captions": captions, "image_ids": IDS,
            "generator": torch.Generator().manual_seed(3)}


def losses_and_grads(model, out) -> dict[str, torch.Tensor]:
    return {**{f"loss.{k}": v.detach().reshape(1) for k, v in out.items()},
            **{f"grad.{n}": p.grad for n, p in model.named_parameters() if p.grad is not None}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, path: str):
    """One of the 2 processes: its half of the batch through DDP, as ``train`` runs it under accelerate."""
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = tiny_stage1().train()
        batch = D.shard(global_batch())
        assert batch["image_ids"] == IDS[rank::2] and len(batch["image_embeds"]) == 4
        ddp = DistributedDataParallel(model)      # kept: the backward needs its hooks (a temporary is freed at once)
        out = ddp(**batch)
        out["loss"].backward()                    # DDP averages the gradients of the 2 processes
        out = D.mean_over_processes(out)
        if rank == 0:
            save_file(losses_and_grads(model, out), path)
    finally:
        dist.destroy_process_group()


def test_one_process_changes_nothing():
    """No process group: gather, shard, global_mean and the reported losses are the identity (same objects)."""
    x, batch = torch.randn(4, 3), global_batch()
    assert D.world_size() == 1 and D.gather(x) is x and D.shard(batch) is batch and D.local_rows(4) is None
    assert D.gather_objects(IDS) is IDS and D.own_rows(x) is x and D.global_mean(x, 7) is x
    values = {"loss": x.sum()}
    assert D.mean_over_processes(values) is values


def test_accelerate_cpu_launch_of_one_process_is_refused_with_the_working_command(monkeypatch):
    """accelerate launch --cpu --num_processes 2 starts ONE process (no MPI): training stops and says what works."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="--multi_gpu --num_processes N"):
        D.check_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")
    D.check_launch()                                  # torchrun's processes: fine


def test_one_process_stage1_is_bit_for_bit_the_plain_computation():
    """The stage-1 losses and gradients in one process equal, exactly, the single-batch computation written
    without any of distributed.py (the code before it): cached models and notebook outputs stay valid."""
    batch = global_batch()
    model = tiny_stage1().train()
    out = model(**batch)
    out["loss"].backward()
    got = losses_and_grads(model, out)

    ref = tiny_stage1().train()
    image_embeds = ref.image_adapter(batch["image_embeds"])
    input_ids, attention_mask = ref.tokenize(batch["captions"])
    both = ref.qformer(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask,
                       mask_type="itc", use_cache=True)
    image_feats = torch.nn.functional.normalize(ref.vision_proj(both.query_output), dim=-1)
    text_feats = torch.nn.functional.normalize(ref.text_proj(both.text_output[:, 0]), dim=-1)
    itc, sim = L.itc_loss(image_feats, text_feats, ref.logit_scale, IDS, max_logit_scale=ref.config.max_logit_scale)
    neg_text, neg_image = L.sample_hard_negatives(sim, L.positives(IDS), torch.Generator().manual_seed(3))
    idx = torch.arange(4)
    rows = torch.cat([idx, idx, neg_image[idx]])       # ITM's photos: their keys and values from the ITC pass
    image_kv = tuple((k.index_select(0, rows), v.index_select(0, rows)) for k, v in both.cross_key_values)
    ids = torch.cat([input_ids[idx], input_ids[neg_text[idx]], input_ids[idx]])
    att = torch.cat([attention_mask[idx], attention_mask[neg_text[idx]], attention_mask[idx]])
    itm, _ = L.itm_loss(ref.itm_logits(None, ids, att, image_key_values=image_kv), 4)
    decoder_ids, labels = L.itg_inputs(input_ids, attention_mask, ref.bos_id)
    gen = ref.qformer(input_ids=decoder_ids, attention_mask=attention_mask, past_key_values=both.past_key_values,
                      mask_type="itg")
    itg = L.itg_loss(gen.text_output, labels, 0.1, lm_head=ref.qformer.lm_head)
    loss = itc + itm + itg
    loss.backward()
    want = losses_and_grads(ref, {"itc": itc, "itm": itm, "itg": itg, "loss": loss})
    assert got.keys() == want.keys() and len(got) > 10
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]


def test_two_processes_give_the_one_process_losses_and_gradients(tmp_path):
    """2 gloo processes, 4 rows each, ITC over the gathered 8 and ITM's hard negatives drawn from them: the losses
    (mean over the processes) and DDP's averaged gradients equal one process's on the 8 rows."""
    path = tmp_path / "two.safetensors"
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), str(path)), nprocs=2)
    two = load_file(path)

    model = tiny_stage1().train()
    out = model(**global_batch())
    out["loss"].backward()
    one = losses_and_grads(model, out)

    assert two.keys() == one.keys()
    diffs = {k: float((two[k] - one[k]).abs().max()) for k in one}
    print("max |2 processes - 1 process|: losses", max(v for k, v in diffs.items() if k.startswith("loss.")),
          "gradients", max(v for k, v in diffs.items() if k.startswith("grad.")),
          {k: round(float(one[k]), 4) for k in one if k.startswith("loss.")})
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    # the gathered gradient matters: without it the temperature and the projections would get a part of it
    assert float(one["grad.logit_scale"].abs()) > 1e-3


def run_cli(args: list[str], cache, processes: int, env_world) -> str:
    env = {**os.environ, "VLMCOURSE_CACHE": str(cache), "VLMCOURSE_DATA": str(env_world["data"]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), "-m", "vlmcourse"]
    done = subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:] + "\n--- first traceback:\n" + done.stderr[done.stderr.find("Traceback"):][:3000]
    return done.stdout


def fresh_cache(root, name):
    cache = root / name
    cache.mkdir()
    (cache / "llm").symlink_to((root / "cache" / "llm").resolve())   # the tokenizer of the tiny LLM, converted once
    return cache


def test_accelerate_launch_two_processes_save_what_one_process_saves(world, monkeypatch):  # noqa: F811
    """``accelerate launch`` with 2 CPU processes trains stage 1 then stage 2 (``train stage2``; global batch 8 = 4
    per process): the main process alone prints and writes, and both saved models equal what a single process
    saves (same seed, same global batch). Tolerance: 3 steps of Adam turn rounding-level gradient differences in
    near-zero gradients into weight differences of up to about lr (measured: 7e-4 at most, 3e-7 for the gradients
    of one step in the test above)."""
    root = world["root"]
    args = ["train", "stage2", "--steps", "3", "--stage1-steps", "3", "--profile", "tiny", "--seed", "1"]
    one_cache, two_cache = fresh_cache(root, "cache1"), fresh_cache(root, "cache2")
    stdout = run_cli([*args, "--out", str(root / "two")], two_cache, 2, world)
    assert stdout.count("saved the stage2 model") == 1, stdout             # printed by the main process only
    monkeypatch.setenv("VLMCOURSE_CACHE", str(one_cache))
    assert main([*args, "--out", str(root / "one")]) == 0

    stage1 = [p.name for p in (one_cache / "models").iterdir() if p.name.startswith("stage1-")]
    assert len(stage1) == 1 and not list((two_cache / "models").glob("*.partial*"))
    worst, losses = {}, {}
    for one_dir, two_dir in [(one_cache / "models" / stage1[0], two_cache / "models" / stage1[0]),
                             (root / "one", root / "two")]:
        one_hist = json.loads((one_dir / "history.json").read_text())["history"]
        two_hist = json.loads((two_dir / "history.json").read_text())["history"]
        assert len(one_hist) == len(two_hist) == 3
        assert [r["loss"] for r in two_hist] == pytest.approx([r["loss"] for r in one_hist], rel=1e-3)
        losses[one_dir.name] = max(abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(one_hist, two_hist))
        one, two = load_file(one_dir / "model.safetensors"), load_file(two_dir / "model.safetensors")
        assert one.keys() == two.keys()
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-3, atol=2e-3, msg=f"{one_dir.name}: {k}")
        worst[one_dir.name] = max(float((two[k] - one[k]).abs().max()) for k in one)
    print("relative loss differences", losses, "max |2 processes - 1 process| of the saved weights:", worst)
