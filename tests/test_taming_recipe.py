"""taming's stage-1 recipe (bench.taming_recipe) and the autoencoder time-to-quality benchmark around it
(bench.ttq_autoencoder, its report section): tiny random models, no downloads."""
from __future__ import annotations

import argparse
import json
import time

import pytest
import torch
import yaml

from autoencoder.convert import from_taming_state_dict
from autoencoder.model import AutoencoderConfig
from autoencoder.quantizer import QuantizerConfig
from bench import taming_recipe, ttq_autoencoder, ttq_autoencoder_report
from bench.taming_recipe import NoPerceptual, TamingGenerator, TamingRecipe, TamingTrainer
from bench.vqmodel_equal_time import TrainingClock
from tiny import SteppingClock

# taming's GroupNorm has 32 groups and its 3-layer PatchGAN needs 32 px: the smallest model both allow.
CONFIG = AutoencoderConfig(resolution=32, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(16,), z_channels=32, code_dim=4,
                           quantizer=QuantizerConfig(codebook_size=16))
TINY_RUN = {"model": {"resolution": 32, "base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1,
                      "attn_resolutions": [], "z_channels": 32, "code_dim": 4, "quantizer": {"codebook_size": 16}},
            "loss": {"perceptual": "none"}, "data": {"name": "shapes", "resolution": 32, "size": 16},
            "run": {"batch_size": 2, "precision": "no", "log_every": 5}}


def test_the_generator_is_tamings_and_converts_exactly():
    torch.manual_seed(0)
    theirs = TamingGenerator(CONFIG).eval()
    ours = from_taming_state_dict(theirs.state_dict(), resolution=CONFIG.resolution).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        difference = (theirs(x)[0] - ours(x).recon).abs().max().item()
    assert difference < 1e-5
    config = ours.config
    assert (config.base_channels, config.channel_mult, config.attn_resolutions, config.z_channels, config.code_dim,
            config.codebook_size) == (32, (1, 2), (16,), 32, 4, 16)


def test_the_recipe_is_custom_vqgans_with_mains_learning_rate_scaling():
    recipe = TamingRecipe()
    assert recipe.learning_rate(32) == pytest.approx(32 * 4.5e-6)
    assert (recipe.disc_start, recipe.disc_weight, recipe.codebook_weight, recipe.betas) == (10000, 0.8, 1.0,
                                                                                            (0.5, 0.9))
    with pytest.raises(ValueError, match="LPIPS downloads VGG16"):
        TamingRecipe(perceptual_weight=1.0)


def test_the_loss_is_built_without_downloading(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to fetch LPIPS weights")
    monkeypatch.setattr("taming.util.get_ckpt_path", no_network)
    monkeypatch.setattr("taming.modules.losses.lpips.get_ckpt_path", no_network)
    loss = taming_recipe.build_loss(TamingRecipe())
    assert isinstance(loss.perceptual_loss, NoPerceptual) and loss.perceptual_weight == 0
    assert loss.discriminator_iter_start == 10000 and loss.discriminator_weight == 0.8
    with pytest.raises(RuntimeError, match="perceptual_weight=0"):
        loss.perceptual_loss(torch.zeros(1), torch.zeros(1))


def test_non_vq_or_mid_attention_free_configs_are_refused():
    with pytest.raises(ValueError, match="kind: vq"):
        TamingGenerator(AutoencoderConfig(resolution=32, base_channels=32, kind="kl"))
    with pytest.raises(ValueError, match="mid_attention: true"):
        TamingGenerator(AutoencoderConfig(resolution=32, base_channels=32, mid_attention=False))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("disc_start", [10000, 0])
def test_a_step_updates_both_optimizers_like_lightning(disc_start):
    torch.manual_seed(0)
    trainer = TamingTrainer(CONFIG, batch_size=2, recipe=TamingRecipe(disc_start=disc_start))
    assert trainer.opt_ae.defaults["lr"] == pytest.approx(2 * 4.5e-6)
    assert trainer.opt_ae.defaults["betas"] == (0.5, 0.9) == trainer.opt_disc.defaults["betas"]
    generator, disc = snapshot(trainer.generator), snapshot(trainer.loss.discriminator)
    logs = trainer.step(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert trainer.global_step == 1 and all(map(torch.isfinite, map(torch.tensor, logs.values())))
    assert any(not torch.equal(p, generator[n]) for n, p in trainer.generator.named_parameters())
    changed = any(not torch.equal(p, disc[n]) for n, p in trainer.loss.discriminator.named_parameters())
    assert changed == (disc_start == 0)  # before disc_start the discriminator's loss is multiplied by 0
    every = [*trainer.generator.parameters(), *trainer.loss.discriminator.parameters()]
    assert all(p.requires_grad for p in every)  # the optimizer toggles are undone


def test_the_clock_takes_snapshots_on_schedule_and_does_not_count_them():
    taken = []
    clock = TrainingClock(0.02, lambda step, seconds: (taken.append((step, seconds)), time.sleep(0.05)))
    clock.begin()
    step = 0
    while clock.seconds < 0.07:
        time.sleep(0.005)
        step += 1
        clock.tick(step)
    clock.finish(step)
    clock.finish(step)  # a second finish at the same step takes nothing
    seconds = [t for _, t in taken]
    assert len(taken) >= 3 and seconds == sorted(seconds) and len({s for s, _ in taken}) == len(taken)
    assert seconds[0] >= 0.02 and clock.seconds < 0.1  # the 50 ms sleeps are not training time


def test_minutes_to_threshold_interpolates_and_the_goal_compares():
    rows = [{"minutes": 1.0, "psnr": 18.0, "codebook_used": 0.5, "step": 10},
            {"minutes": 2.0, "psnr": 21.0, "codebook_used": 0.6, "step": 20},
            {"minutes": 3.0, "psnr": 23.0, "codebook_used": 0.7, "step": 30}]
    found = ttq_autoencoder.minutes_to(rows, 22.0)
    assert found == {"minutes": pytest.approx(2.5), "upper_bound": False, "codebook_used": 0.7, "step": 30}
    assert ttq_autoencoder.minutes_to(rows, 10.0)["upper_bound"] is True
    assert ttq_autoencoder.minutes_to(rows, 30.0)["minutes"] is None
    arms = {"ours": {"to_threshold": {"minutes": 2.0}}, "taming": {"to_threshold": {"minutes": 5.0}},
            "vqmodel": {"to_threshold": {"minutes": None}, "seconds": 180.0}}  # trained 3 minutes
    goal = ttq_autoencoder.goal(arms)
    assert goal["peers"]["taming"] == {"ratio": 2.5, "lower_bound": False, "met": True}
    assert goal["peers"]["vqmodel"] == {"ratio": 1.5, "lower_bound": True, "met": None}  # needs a longer budget


def test_merge_adds_only_the_arms_this_run_did_not_measure():
    def arm(minutes, seconds):
        return {"to_threshold": {"minutes": minutes}, "seconds": seconds}
    earlier = {"command": "first", "arms": {"ours": arm(8.0, 960.0), "taming": arm(None, 960.0),
                                            "vqmodel": arm(None, 1440.0)}}
    result = {"command": "python -m bench.ttq_autoencoder --arms taming", "arms": {"taming": arm(None, 1200.0)}}
    ttq_autoencoder.merge(result, earlier)
    assert list(result["arms"]) == ["ours", "taming", "vqmodel"]  # the report's order
    assert result["arms"]["taming"]["seconds"] == 1200.0  # the new, longer taming arm wins
    assert result["goal"]["peers"]["taming"] == {"ratio": 2.5, "lower_bound": True, "met": True}
    assert result["command"].endswith("; arms ours, vqmodel from `first`")


def test_our_arm_runs_the_public_entry_point_with_every_checkpoint_kept(tmp_path):
    args = ttq_autoencoder.parse_args(["--out", str(tmp_path / "new"), "--our-save-every", "40"])
    s = settings(tmp_path / "new", our_save_every=args.our_save_every)
    command = ttq_autoencoder.our_command(s)
    assert command[:2] == ["accelerate", "launch"] and "autoencoder/train.py" in command
    assert {"run.save_every=40", "run.log_every=1", "run.keep_checkpoints=1000000"} <= set(command)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(SystemExit):
        ttq_autoencoder.parse_args(["--out", str(tmp_path / "full")])


def settings(out, config="configs/autoencoder/emoji32_quick.yaml", **changes) -> ttq_autoencoder.Settings:
    values = dict(config=config, out=out, minutes=0.02, every=0.005, our_save_every=50, threads=1,
                  arms=("taming", "vqmodel"), threshold=10.0, device="cpu")
    return ttq_autoencoder.Settings(**{**values, **changes})


def test_the_peer_arms_train_snapshot_and_score_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr("bench.measure.machine_info", lambda: {"cpu": "test"})  # it samples the load for 2 s
    monkeypatch.setattr(ttq_autoencoder.vq, "time", SteppingClock(0.05))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))
    s = settings(tmp_path / "out", config=str(config), minutes=0.01)
    for arm in s.arms:
        ttq_autoencoder.run_worker(s, arm)
    torch.set_num_threads(2)
    result = ttq_autoencoder.run(s, train=False)
    for arm in s.arms:
        record = result["arms"][arm]
        assert len(record["snapshots"]) >= 2 and record["steps"] >= 1
        assert all(0 < r["psnr"] < 60 and 0 < r["codebook_used"] <= 1 for r in record["snapshots"])
    assert result["arms"]["taming"]["precision"] == "fp32" and result["arms"]["taming"]["recipe"]["disc_start"]
    assert set(result["goal"]["peers"]) == set(s.arms)


def test_the_report_section_renders_the_json(tmp_path):
    from bench.measure import Context
    from bench.report import Report
    rows = [{"minutes": m, "step": 10 * m, "psnr": p, "ssim": 0.5, "codebook_used": 0.5, "perplexity": 9.0}
            for m, p in ((1, 20.0), (2, 23.0))]
    arm = {"precision": "fp32", "steps": 20, "seconds": 120.0, "snapshots": rows,
           "to_threshold": ttq_autoencoder.minutes_to(rows, 22.0)}
    result = {"settings": {"config": "c.yaml", "minutes": 2, "threads": 1, "arms_at_once": 2}, "threshold_db": 22.0,
              "data": {"name": "emoji", "resolution": 32, "batch_size": 32}, "command": "python -m bench.ttq",
              "machine": {"cpu": "cpu", "bf16_flags": [], "torch": "2"}, "interpolation": "linear",
              "arms": {"ours": {**arm, "label": "ours"}, "taming": {**arm, "label": "taming", "to_threshold":
                                                                    ttq_autoencoder.minutes_to(rows, 30.0)}},
              "goal": {"factor": 2.0, "ours_minutes": 1.67,
                       "peers": {"taming": {"ratio": 1.2, "lower_bound": True, "met": None}}}}
    path = tmp_path / "ttq.json"
    other = {**result, "machine": {"cpu": "other cpu", "bf16_flags": ["amx_bf16"], "torch": "2"},
             "goal": {"factor": 2.0, "ours_minutes": 1.67, "peers": {"taming": {"ratio": 3.0, "lower_bound": False,
                                                                               "met": True}}}}
    path.write_text(json.dumps({**result, "also": [other]}))  # an earlier run on another machine, kept beside
    report = Report(Context(args=argparse.Namespace(), profile={}, out=tmp_path, argv=[]))
    ttq_autoencoder_report.section(report, path)
    text = "\n".join(report.lines)
    assert "| ours | fp32 | 20 steps in 2.0 min | 1.67 |" in text and "not reached in 2.0" in text
    assert "at least 1.20x sooner (goal 2x: undecided" in text
    newest, earlier = text.split("Also measured on other cpu:")
    assert "on cpu (bf16 flags: none" in newest and "on other cpu (bf16 flags: amx_bf16" in earlier
    assert "ours reached 22 dB 3.00x sooner (goal 2x: met)" in earlier and earlier.count("| ours |") == 1
    assert (tmp_path / "autoencoder_time_to_quality.png").stat().st_size > 0
