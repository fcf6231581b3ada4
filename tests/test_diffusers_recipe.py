"""bench.diffusers_recipe is diffusers' train_text_to_image.py step at its defaults; bench.ttq_diffusion's bookkeeping.

The transcriptions below follow examples/text_to_image/train_text_to_image.py (diffusers commit 58eb52c0,
lines 955-1051 and its argparse defaults) line by line, on diffusers' own components.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench import diffusers_recipe as recipe
from bench import ttq_diffusion as ttq
from common.config import load_config
from common.data import build_dataset
from diffusion.convert import from_diffusers
from diffusion.stable_diffusion import diffusion_config_from_scheduler
from diffusion.train_config import TrainConfig
from diffusion.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# Stable Diffusion v1.5's scheduler/scheduler_config.json, as the script loads it.
SD15_SCHEDULER_JSON = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                       "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                       "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
# The script's argparse defaults: --learning_rate, --adam_beta1/2, --adam_weight_decay, --adam_epsilon,
# --lr_scheduler, --max_grad_norm, --train_batch_size.
SCRIPT = dict(learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2, adam_epsilon=1e-08,
              lr_scheduler="constant", max_grad_norm=1.0, train_batch_size=16)
TINY_UNET = UNetConfig(in_channels=4, out_channels=4, block_channels=(32, 64), layers_per_block=1,
                       attention_levels=(False, True), mid_attention=True, head_dim=16, context_dim=32)


@pytest.fixture(scope="module")
def batch(tiny_parts):
    """Scaled latents and text of 8 tiny shapes items (captions of different lengths, so the mask matters)."""
    from autoencoder.model import Autoencoder
    from tiny import TINY_DATA

    dataset = build_dataset(TINY_DATA)
    items = [dataset[i] for i in range(8)]
    raw = {"image": torch.stack([item["image"] for item in items]), "caption": [item["caption"] for item in items]}
    autoencoder = Autoencoder.from_pretrained(tiny_parts["ae"]).eval()
    latents, text = recipe.encode_batch(raw, autoencoder, tiny_parts["text_encoder"], latent_scale=1.7)
    assert not text.mask.all(), "the batch needs padded captions for the mask to be checked"
    return latents, text


def script_loss(unet, noise_scheduler, latents, text):
    """The script's step, transcribed (snr_gamma None, no noise offset, perturbation or DREAM), plus the mask."""
    noise = torch.randn_like(latents)
    bsz = latents.shape[0]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
    timesteps = timesteps.long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise
    model_pred = unet(noisy_latents, timesteps, text.states, encoder_attention_mask=text.mask.float(),
                      return_dict=False)[0]
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def script_parts(unet):
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    noise_scheduler = DDPMScheduler.from_config(SD15_SCHEDULER_JSON)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=SCRIPT["learning_rate"],
                                  betas=(SCRIPT["adam_beta1"], SCRIPT["adam_beta2"]),
                                  weight_decay=SCRIPT["adam_weight_decay"], eps=SCRIPT["adam_epsilon"])
    lr_scheduler = get_scheduler(SCRIPT["lr_scheduler"], optimizer=optimizer, num_warmup_steps=500,
                                 num_training_steps=100 * 625)
    return noise_scheduler, optimizer, lr_scheduler


def test_loss_equals_the_scripts_on_the_same_batch(batch):
    latents, text = batch
    torch.manual_seed(0)
    unet = recipe.build_unet(TINY_UNET)
    noise_scheduler, _, _ = script_parts(unet)
    torch.manual_seed(3)
    ours = recipe.recipe_loss(unet, recipe.make_scheduler(), latents, text)
    torch.manual_seed(3)
    theirs = script_loss(unet, noise_scheduler, latents, text)
    assert abs(float(ours.detach()) - float(theirs.detach())) <= 1e-6
    assert float(ours.detach()) > 0.1  # a random U-Net is far from the noise: the loss is not trivially zero


def test_one_update_equals_the_scripts(batch):
    latents, text = batch
    torch.manual_seed(0)
    unet = recipe.build_unet(TINY_UNET)
    twin = copy.deepcopy(unet)
    optimizer, lr_scheduler = recipe.make_optimizer(unet)
    noise_scheduler, their_optimizer, their_lr = script_parts(twin)
    for seed in (1, 2):  # two steps: AdamW's moments and the bias correction take part
        torch.manual_seed(seed)
        recipe.train_step(unet, recipe.make_scheduler(), optimizer, lr_scheduler, latents, text)
        torch.manual_seed(seed)
        loss = script_loss(twin, noise_scheduler, latents, text)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), SCRIPT["max_grad_norm"])
        their_optimizer.step()
        their_lr.step()
        their_optimizer.zero_grad()
    theirs, fresh = twin.state_dict(), recipe.build_unet(TINY_UNET).state_dict()
    assert max(float((p - theirs[name]).abs().max()) for name, p in unet.state_dict().items()) <= 1e-6
    assert any(float((p - fresh[name]).abs().max()) > 0 for name, p in unet.state_dict().items())  # it moved


def test_optimizer_and_schedule_are_the_script_defaults():
    unet = recipe.build_unet(TINY_UNET)
    optimizer, lr_scheduler = recipe.make_optimizer(unet)
    group = optimizer.param_groups[0]
    assert type(optimizer) is torch.optim.AdamW
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (
        SCRIPT["learning_rate"], (SCRIPT["adam_beta1"], SCRIPT["adam_beta2"]), SCRIPT["adam_weight_decay"],
        SCRIPT["adam_epsilon"])
    rates = []
    for _ in range(600):  # "constant": no warm-up, whatever lr_warmup_steps says
        rates.append(lr_scheduler.get_last_lr()[0])
        optimizer.step()  # no gradients: changes nothing, and keeps torch's step order
        lr_scheduler.step()
    assert set(rates) == {SCRIPT["learning_rate"]}
    assert (recipe.DEFAULTS.max_grad_norm, recipe.DEFAULTS.train_batch_size) == (
        SCRIPT["max_grad_norm"], SCRIPT["train_batch_size"])
    assert (recipe.DEFAULTS.use_ema, recipe.DEFAULTS.snr_gamma, recipe.DEFAULTS.mixed_precision) == (False, None, "no")


def test_the_noise_process_is_stable_diffusions_and_our_configs():
    from diffusers import DDPMScheduler

    mine, sd = recipe.make_scheduler(), DDPMScheduler.from_config(SD15_SCHEDULER_JSON)
    assert torch.equal(mine.alphas_cumprod, sd.alphas_cumprod)
    assert mine.config.prediction_type == "epsilon"
    shipped = load_config(TrainConfig, "configs/diffusion/shapes32_quick.yaml", []).diffusion
    process = diffusion_config_from_scheduler(dict(mine.config))
    for name in ("schedule", "num_steps", "beta_start", "beta_end", "prediction", "zero_terminal_snr"):
        assert getattr(process, name) == getattr(shipped, name), name


def test_the_unet_is_ours_in_size_and_computes_ours(batch):
    latents, text = batch
    torch.manual_seed(0)
    peer = recipe.build_unet(TINY_UNET).eval()
    ours = from_diffusers(peer)
    t = torch.tensor([3, 500, 999, 10, 0, 250, 750, 999])
    with torch.no_grad():
        theirs = peer(latents, t, text.states, encoder_attention_mask=text.mask.float()).sample
        mine = ours(latents, t, text.states, text.mask)
    assert float((theirs - mine).abs().max()) <= 1e-5
    shipped = load_config(TrainConfig, "configs/diffusion/shapes32_quick.yaml", []).model.resolve(8, 384)
    with torch.device("meta"):
        sizes = [sum(p.numel() for p in model.parameters()) for model in (UNet(shipped), recipe.build_unet(shipped))]
    assert sizes[0] == sizes[1]


def test_the_recipe_trains_and_snapshots_by_wall_clock(tiny_parts, tmp_path, monkeypatch):
    from tiny import TINY_DATA, SteppingClock

    monkeypatch.setattr(recipe, "time", SteppingClock(0.12))
    cfg = TrainConfig(autoencoder=str(tiny_parts["ae"]), text=tiny_parts["text"], model=TINY_UNET, data=TINY_DATA)
    steps = recipe.train(cfg, tmp_path, minutes=0.04, snapshot_minutes=0.015, start=0.0)
    snaps = ttq.read_jsonl(tmp_path / recipe.SNAPSHOTS)
    assert steps >= 1 and 2 <= len(snaps) <= 3
    assert [s["minutes"] for s in snaps] == sorted(s["minutes"] for s in snaps) and snaps[-1]["minutes"] >= 0.04
    assert snaps[-1]["step"] == steps
    imported = from_diffusers(tmp_path / snaps[-1]["unet"])
    assert imported.config.block_channels == TINY_UNET.block_channels
    assert json.loads((tmp_path / "recipe.json").read_text())["latent_scale"] > 0


def test_minutes_to_target_and_verdict():
    settings, _ = ttq.parse_args(["--minutes", "30", "--interval", "5"])
    assert ttq.marks(settings) == [5, 10, 15, 20, 25, 30]
    ours = [{"minutes": m, "accuracy": a} for m, a in ((4.0, 0.5), (9.0, 0.92), (14.0, 0.85), (19.0, 0.95))]
    theirs = [{"minutes": m, "accuracy": a} for m, a in ((5.0, 0.1), (25.0, 0.91))]
    assert ttq.minutes_to(ours, 0.9) == 9.0
    found = ttq.verdict({"ours": ours, "diffusers": theirs}, settings)
    assert found["speedup"] == pytest.approx(25 / 9) and found["met"] and not found["speedup_is_lower_bound"]
    never = ttq.verdict({"ours": ours, "diffusers": theirs[:1]}, settings)
    assert never["speedup"] == pytest.approx(30 / 9) and never["speedup_is_lower_bound"]
    assert ttq.verdict({"ours": ours[:1], "diffusers": theirs}, settings)["speedup"] is None


def test_grab_ema_takes_each_new_complete_checkpoint_once(tmp_path):
    run, into, taken = tmp_path / "run", tmp_path / "snaps", []
    into.mkdir()
    ttq.grab_ema(run, into, 0.0, taken)
    assert taken == []  # nothing saved yet
    for step in (20, 40):
        checkpoint = run / "checkpoints" / f"step_{step:08d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / ttq.EMA_FILE).write_bytes(b"ema")
        (checkpoint / "step.json").write_text(json.dumps({"step": step}))
        (run / "checkpoints" / "latest").write_text(checkpoint.name)
        ttq.grab_ema(run, into, 0.0, taken)
        ttq.grab_ema(run, into, 0.0, taken)
    assert [t["step"] for t in taken] == [20, 40]
    assert all((into / t["ema"]).read_bytes() == b"ema" and t["minutes"] > 0 for t in taken)


def test_the_report_section_renders_the_json(tmp_path):
    from bench import ttq_diffusion_report

    point = {"minutes": 9.0, "step": 900, "accuracy": 0.92, "guidance": 2.0,
             "sweep": [{"guidance": 1.0, "accuracy": 0.8}, {"guidance": 2.0, "accuracy": 0.92}]}
    settings, _ = ttq.parse_args([])
    result = {"command": "python -m bench.ttq_diffusion", "date": "today", "settings": ttq.asdict(settings),
              "machine": {"cpu": "cpu", "bf16_flags": [], "torch": "2", "precision": {
                  "ours": {"chosen": "bf16"}, "diffusers": {"chosen": "fp32"}}},
              "arms": {"ours": [point], "diffusers": [{**point, "minutes": 30.0, "accuracy": 0.5}]},
              "minutes_to_target": {"ours": 9.0, "diffusers": None, "speedup": 40 / 9, "speedup_is_lower_bound": True,
                                    "met": True}, "target": 0.9}
    lines = "\n".join(ttq_diffusion_report.render(result, Path("docs/ttq_diffusion.json"), tmp_path))
    assert "met** — ours reaches it at least 4.4x sooner" in lines and "not within 40" in lines
    assert (tmp_path / "ttq_diffusion.png").stat().st_size > 0
