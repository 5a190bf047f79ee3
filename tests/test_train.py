import math

import pytest
import torch
from torch import nn

from accelerate.utils import send_to_device

from vlmcourse.train import NonFiniteLossError, TrainConfig, lr_at, make_optimizer, train

X = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
Y = X @ torch.randn(8, 1, generator=torch.Generator().manual_seed(1))


def device(model):
    return next(model.parameters()).device


def model_fn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.1), nn.GELU(), nn.Linear(32, 1))


def batch_fn(step, generator):
    idx = torch.randint(0, 64, (16,), generator=generator)
    return X[idx], Y[idx]


def loss_fn(model, batch):
    x, y = batch
    loss = nn.functional.mse_loss(model(x).float(), y)
    return {"loss": loss, "mse": loss.detach()}


def config(**kw):
    return TrainConfig(**{"steps": 30, "lr": 1e-2, "warmup_steps": 5, "bf16": False, **kw})


def test_schedule_warms_up_then_decays_to_the_floor():
    c = config(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, c) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(100, c) == pytest.approx(1e-3) and lrs[55] == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))


def test_optimizer_is_blip2s_adamw_without_decay_on_biases():
    opt = make_optimizer(model_fn(), config())
    assert opt.defaults["betas"] == (0.9, 0.98)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])


def test_loss_falls():
    result = train(model_fn(), batch_fn, loss_fn, config(steps=60))
    losses = result.column("loss")
    assert len(losses) == 60 and sum(losses[-10:]) < 0.3 * sum(losses[:10])


def test_same_seed_same_run_and_other_seed_other_run():
    a = train(model_fn(), batch_fn, loss_fn, config()).column("loss")
    b = train(model_fn(), batch_fn, loss_fn, config()).column("loss")
    c = train(model_fn(), batch_fn, loss_fn, config(seed=1)).column("loss")
    assert a == b and a != c


def test_nan_stops_with_the_step_number():
    def bad_loss(model, batch):
        losses = loss_fn(model, batch)
        if bad_loss.calls == 7:
            losses["itm"] = torch.full_like(losses["loss"], float("nan"))
            losses["loss"] = losses["loss"] + losses["itm"]
        bad_loss.calls += 1
        return losses
    bad_loss.calls = 0
    with pytest.raises(NonFiniteLossError, match=r"step 7: loss, itm went bad"):
        train(model_fn(), batch_fn, bad_loss, config())


def test_resumed_run_continues_the_same_loss_curve(tmp_path):
    full = train(model_fn(), batch_fn, loss_fn, config())

    class Interrupt(Exception):
        pass

    def interrupted_batches(step, generator):
        if step == 17:
            raise Interrupt
        return batch_fn(step, generator)

    cfg = config(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=5)
    with pytest.raises(Interrupt):
        train(model_fn(), interrupted_batches, loss_fn, cfg)
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    fresh_model = model_fn()
    resumed = train(fresh_model, batch_fn, loss_fn, cfg)
    assert resumed.column("loss") == pytest.approx(full.column("loss"), rel=1e-6, abs=1e-7)
    assert len(resumed.history) == 30 and resumed.history[15]["step"] == 15


def test_eval_fn_is_called_on_schedule():
    result = train(model_fn(), batch_fn, loss_fn, config(steps=20, eval_every=5),
                   eval_fn=lambda m: {"dev_mse": float(nn.functional.mse_loss(m(send_to_device(X, device(m))).cpu(), Y))})
    assert [e["step"] for e in result.evals] == [4, 9, 14, 19]
    assert result.column("dev_mse", "evals")[-1] < result.column("dev_mse", "evals")[0]


def test_send_to_device_moves_the_tensors_of_a_batch_and_leaves_the_rest():
    """What train() relies on when it moves each batch: captions and the step's generator pass through."""
    generator = torch.Generator()
    moved = send_to_device({"image_embeds": torch.zeros(2, 3), "captions": ["a", "b"], "generator": generator}, "meta")
    assert moved["image_embeds"].device.type == "meta" and moved["captions"] == ["a", "b"]
    assert moved["generator"] is generator
    pair = send_to_device((torch.zeros(1), torch.ones(1)), "meta")
    assert isinstance(pair, tuple) and all(t.device.type == "meta" for t in pair)


def test_lr_scales_give_a_layer_a_multiple_of_the_schedule():
    model = model_fn()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, batch_fn, loss_fn, config(steps=3, lr_scales={"3.": 0.0}))     # the last Linear: lr x 0
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach().cpu(), before[n])}
    assert moved == {"0.weight", "0.bias"}
    opt = make_optimizer(model, config(lr_scales={"3.": 10.0}))
    scaled = [g for g in opt.param_groups if g["lr_scale"] == 10.0]
    assert sum(p.numel() for g in scaled for p in g["params"]) == 32 + 1          # its weight and bias
    with pytest.raises(ValueError, match="names no trainable parameter"):
        make_optimizer(model, config(lr_scales={"proj.": 10.0}))



def test_bf16_autocast_is_accelerates_and_switches_within_one_process():
    """bf16=True: the loss function and the evaluation run under accelerate's bf16 autocast (a Linear inside gives
    bfloat16); bf16=False right after, in the same process: float32 again (accelerate fixes its precision once per
    process unless train resets it). The loss still falls under bf16 (emulated on a CPU without it)."""
    def run(bf16, steps):
        dtypes, evals = [], []
        model = model_fn()
        model[0].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
        eval_fn = lambda m: evals.append(nn.functional.linear(X[:2], torch.randn(1, 8)).dtype) or {}   # noqa: E731
        result = train(model, batch_fn, loss_fn, config(steps=steps, bf16=bf16), eval_fn=eval_fn)
        return set(dtypes), evals, result.column("loss")

    dtypes, evals, losses = run(True, 40)
    assert dtypes == {torch.bfloat16} and evals == [torch.bfloat16]
    assert sum(losses[-5:]) < 0.3 * sum(losses[:5])
    dtypes, evals, _ = run(False, 3)
    assert dtypes == {torch.float32} and evals == [torch.float32]


def test_bf16_env_switch_forces_float32(monkeypatch):
    """$VLMCOURSE_BF16=0: no bf16 autocast even where the hardware has it (a CPU with AVX-512 bf16 then trains in
    float32, as the course's reference machine does); unset, the hardware decides."""
    from vlmcourse.train import BF16_ENV, bf16_supported

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.delenv(BF16_ENV, raising=False)
    assert bf16_supported("cpu")
    for off in ("0", "false", "No"):
        monkeypatch.setenv(BF16_ENV, off)
        assert not bf16_supported("cpu")
    dtypes = []
    model = model_fn()
    model[0].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    train(model, batch_fn, loss_fn, config(steps=2, bf16=None))       # None: ask bf16_supported
    assert dtypes == [torch.float32, torch.float32]
