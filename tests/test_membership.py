"""Membership inference against closed-form models: a perfect memoriser (the exact denoiser of its 8 training
images) gives its members away (AUC 1), a model of other images does not (the CI covers 0.5); the report's
TPR at low FPR, the seeding rule, and the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medsyn.pipelines import ClassConditionalDDPMPipeline, ScoreLangevinPipeline
from medsyn.privacy.membership import (
    AttackMethod,
    AttackSettings,
    attack_report,
    membership_statistics,
    tpr_at_fpr,
)
from medsyn.schedulers import AnnealedLangevinScheduler

MEMORISING_STEPS = 1500


class EmpiricalDenoiser(torch.nn.Module):
    """The exact denoiser of the empirical distribution of ``data`` ((N, C, H, W) in [-1, 1]): what a network that
    memorised its training set perfectly computes. ``alphas`` (a DDPM's cumulative alphas) makes it predict the
    noise at integer timesteps; without them it returns the variance-exploding score at sigma."""

    def __init__(self, data: torch.Tensor, alphas: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("data", data.double())
        self.alphas = alphas
        self.config = SimpleNamespace(in_channels=data.shape[1], num_class_embeds=None, sample_size=data.shape[-1])
        self.dtype = torch.float32

    def forward(self, x, level, class_labels=None):
        x = x.double()
        if self.alphas is None:  # x = x0 + sigma z
            scale, spread = torch.ones_like(level, dtype=torch.float64), level.double()
        else:  # x = sqrt(abar) x0 + sqrt(1 - abar) eps
            alpha = self.alphas[level.long()].double()
            scale, spread = alpha.sqrt(), (1 - alpha).sqrt()
        centres = scale.view(-1, 1, 1, 1, 1) * self.data[None]  # (B, N, C, H, W)
        squared = (x[:, None] - centres).pow(2).flatten(2).sum(2)  # (B, N)
        weights = torch.softmax(-squared / (2 * spread.view(-1, 1) ** 2), dim=1)
        mean = torch.einsum("bn,nchw->bchw", weights, self.data)  # E[x0 | x]
        if self.alphas is None:
            output = (mean - x) / spread.view(-1, 1, 1, 1) ** 2  # the score
        else:
            output = (x - scale.view(-1, 1, 1, 1) * mean) / spread.view(-1, 1, 1, 1)  # the noise
        return SimpleNamespace(sample=output.float())


def images(seed: int, count: int = 8) -> torch.Tensor:
    """Smooth 8x8 'slices', uint8 (N, 1, 8, 8)."""
    coarse = torch.from_numpy(np.random.default_rng(seed).uniform(0, 255, (count, 1, 3, 3))).float()
    return torch.nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear").round().byte()


def memoriser(kind: str, data: torch.Tensor):
    clean = data.float() / 127.5 - 1
    if kind == "score":
        scheduler = AnnealedLangevinScheduler(num_train_timesteps=10, sigma_max=10.0, sigma_min=0.01)
        return ScoreLangevinPipeline(unet=EmpiricalDenoiser(clean), scheduler=scheduler)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    return ClassConditionalDDPMPipeline(unet=EmpiricalDenoiser(clean, scheduler.alphas_cumprod), scheduler=scheduler)


@pytest.mark.parametrize("kind", ["score", "ddpm"])
@pytest.mark.parametrize("method", list(AttackMethod))
def test_a_perfect_memoriser_gives_its_members_away_and_others_do_not(kind, method):
    members, non_members, others = images(0), images(1), images(2)
    settings = AttackSettings(method=method, batch_size=5)
    pipe = memoriser(kind, members)
    report = attack_report(membership_statistics(pipe, members, settings=settings),
                           membership_statistics(pipe, non_members, settings=settings), settings, resamples=200)
    assert report.auc == report.leakage_auc == 1.0 and report.tpr_at_1pct_fpr == 1.0 and report.auc_ci[0] == 1.0
    blind = memoriser(kind, others)  # trained on neither set: nothing to give away
    report = attack_report(membership_statistics(blind, members, settings=settings),
                           membership_statistics(blind, non_members, settings=settings), settings, resamples=200)
    assert report.auc_ci[0] < 0.5 < report.auc_ci[1]



class LatentMemoriser(EmpiricalDenoiser):
    """The exact denoiser of a set of latents, called as MediSyn calls its UNet2DConditionModel; it records the
    prompt states it was given."""

    def forward(self, x, level, encoder_hidden_states=None, encoder_attention_mask=None):
        self.prompt_states = encoder_hidden_states
        return super().forward(x, level)


def latent_memoriser(data: torch.Tensor):
    """A MediSyn pipeline (the dummy VAE and text encoder) whose unet memorised the latents of ``data``: the VAE's
    posterior mean, scaled to unit variance as training scales it."""
    from medsyn.pipelines import MediSynPipeline

    from .conftest import get_dummy_medisyn_components

    components = get_dummy_medisyn_components()
    vae = components["vae"]
    with torch.no_grad():
        latents = vae.encode(data.float() / 127.5 - 1).latent_dist.mean * vae.config.scaling_factor
    components["unet"] = LatentMemoriser(latents, components["scheduler"].alphas_cumprod)
    return MediSynPipeline(**components)


@pytest.mark.parametrize("method", list(AttackMethod))
def test_a_latent_model_is_attacked_in_its_latent_space(method):
    members, non_members, others = images(0), images(1), images(2)
    members, non_members, others = (torch.nn.functional.interpolate(x.float(), size=16).byte()
                                    for x in (members, non_members, others))
    settings = AttackSettings(method=method, batch_size=5)
    pipe = latent_memoriser(members)
    report = attack_report(membership_statistics(pipe, members, settings=settings),
                           membership_statistics(pipe, non_members, settings=settings), settings, resamples=200)
    assert report.auc == 1.0 and report.auc_ci[0] == 1.0
    blind = latent_memoriser(others)
    report = attack_report(membership_statistics(blind, members, settings=settings),
                           membership_statistics(blind, non_members, settings=settings), settings, resamples=200)
    assert report.auc_ci[0] < 0.5 < report.auc_ci[1]
    # the caption reaches the unet: the empty caption's states unless the caller gives the images' own
    empty = pipe.encode_prompt([""] * 2, "cpu", 1, False)[0]
    membership_statistics(pipe, members[:2], settings=settings)
    assert torch.equal(pipe.unet.prompt_states, empty)
    membership_statistics(pipe, members[:2], settings=settings, prompts=["brain MRI, glioma"] * 2)
    assert not torch.equal(pipe.unet.prompt_states, empty)
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        membership_statistics(pipe, members[:2], prompts=["a"] * 3)
    with pytest.raises(ValueError, match="prompts condition a MediSyn model"):
        membership_statistics(memoriser("ddpm", images(0)), images(0), prompts=["a"] * 8)

def test_statistics_do_not_depend_on_the_batch():
    pipe, data = memoriser("ddpm", images(0)), images(3, count=6)
    one = membership_statistics(pipe, data, settings=AttackSettings(batch_size=6))
    split = membership_statistics(pipe, data, settings=AttackSettings(batch_size=4))
    other_seed = membership_statistics(pipe, data, settings=AttackSettings(batch_size=6, seed=1))
    assert np.allclose(one, split, rtol=1e-6) and not np.allclose(one, other_seed)


def test_tpr_at_low_fpr_lets_at_most_the_allowed_false_positives_through():
    non_members = np.arange(200, dtype=float)  # 1% of 200: 2 false positives allowed, threshold 197
    members = np.array([196.0, 197.0, 198.0, 250.0])
    assert tpr_at_fpr(members, non_members, 0.01) == 0.5
    assert tpr_at_fpr(members, non_members, 0.001) == 0.25  # none allowed: above the largest, 199
    assert tpr_at_fpr(np.array([5.0]), np.array([1.0, 2.0]), 0.001) == 1.0


def test_bad_settings_and_models_are_named():
    with pytest.raises(ValueError, match="noise_levels"):
        AttackSettings(noise_levels=(0.0,))
    with pytest.raises(ValueError, match="DDPM, score and MediSyn models"):
        membership_statistics(SimpleNamespace(), images(0))
    with pytest.raises(ValueError, match="uint8 images"):
        membership_statistics(memoriser("score", images(0)), images(0).float())


def test_medsyn_attack_writes_the_report_and_the_roc_curve(tmp_path, capsys):
    from medsyn.cli import main

    from .conftest import get_dummy_pipeline

    get_dummy_pipeline().save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    for name in ("members", "non_members"):
        np.savez(tmp_path / f"{name}.npz", images=rng.integers(0, 256, (6, 16, 16), dtype=np.uint8),
                 labels=np.arange(6) % 2, class_names=np.array(["healthy", "tumor"]))
    assert main(["attack", "--model", str(tmp_path / "model"), "--members", str(tmp_path / "members.npz"),
                 "--non-members", str(tmp_path / "non_members.npz"), "--method", "pia", "--resamples", "50",
                 "--output-dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "attack.json").read_text())
    assert report["method"] == "pia" and report["members"] == 6 and 0 <= report["auc"] <= 1
    assert len(report["most_exposed_members"]) == 6 and (tmp_path / "out" / "roc.png").stat().st_size > 1000
    assert "AUC" in capsys.readouterr().out
    assert main(["attack", "--model", str(tmp_path / "model"), "--members", str(tmp_path / "nope.npz"),
                 "--non-members", str(tmp_path / "non_members.npz"), "--output-dir", str(tmp_path / "x")]) == 2


def test_medsyn_attack_takes_a_medisyn_model_and_its_caption(tmp_path, capsys):
    from medsyn.cli import main

    from .conftest import get_dummy_medisyn_pipeline

    get_dummy_medisyn_pipeline().save_pretrained(tmp_path / "medisyn")
    rng = np.random.default_rng(0)
    for name in ("members", "non_members"):
        np.savez(tmp_path / f"{name}.npz", images=rng.integers(0, 256, (4, 16, 16), dtype=np.uint8))
    runs = {}
    for caption in (None, "brain MRI, glioma"):
        out = tmp_path / f"out-{caption is None}"
        assert main(["attack", "--model", str(tmp_path / "medisyn"), "--members", str(tmp_path / "members.npz"),
                     "--non-members", str(tmp_path / "non_members.npz"), "--resamples", "20", "--output-dir",
                     str(out), *([] if caption is None else ["--prompt", caption])]) == 0
        runs[caption] = json.loads((out / "attack.json").read_text())["member_statistics"]
    assert runs[None] != runs["brain MRI, glioma"]  # the caption conditions the unet


@pytest.fixture(scope="module")
def eight_image_models(tmp_path_factory):
    """Tiny DDPMs trained MEMORISING_STEPS steps on 8 simulated images, plain or with DP-SGD at epsilon, made on
    first use; 8 other images of the same distribution are the non-members."""
    from medsyn.data import SimulatedBrainMRI
    from medsyn.train_scripts.train_ddpm import main, parse_args

    folder = tmp_path_factory.mktemp("eight")
    made = SimulatedBrainMRI(resolution=16, seed=0).generate(16)
    np.savez(folder / "members.npz", images=made["images"][:8], labels=made["labels"][:8],
             class_names=np.array(["healthy", "tumor"]))
    models = {}

    def model(epsilon: float | None = None):
        if epsilon not in models:
            output = folder / f"model-{epsilon}"
            main(parse_args([
                "--train_data_dir", str(folder / "members.npz"), "--output_dir", str(output),
                "--resolution", "16", "--base_channels", "16", "--channel_mult", "1", "2", "--layers_per_block", "1",
                "--norm_num_groups", "4", "--train_batch_size", "8", "--learning_rate", "2e-3",
                "--lr_warmup_steps", "10", "--max_train_steps", str(MEMORISING_STEPS), "--checkpointing_steps",
                "100000", "--validation_steps", "100000", "--num_validation_images", "1", "--report_to", "none",
                "--seed", "0", *([] if epsilon is None else ["--dp_epsilon", str(epsilon)]),
            ]))
            models[epsilon] = output
        return models[epsilon]

    return model, torch.from_numpy(made["images"])[:, None]


def loss_attack(model_folder, images):
    from medsyn.pipelines import load_pipeline

    pipe = load_pipeline(model_folder)
    loss = AttackSettings(method=AttackMethod.LOSS)
    return attack_report(membership_statistics(pipe, images[:8], settings=loss),
                         membership_statistics(pipe, images[8:], settings=loss), loss, resamples=200)


@pytest.mark.slow
def test_a_trained_model_that_memorised_eight_images_gives_them_away(eight_image_models):
    """The issue's test on a real network: a tiny DDPM trained many steps on 8 images, attacked with 8 others of
    the same simulated distribution as non-members."""

    model, images = eight_image_models
    report = loss_attack(model(), images)
    assert report.auc >= 0.9, report.auc  # measured: 1.0
    # PIA is not asserted on this model: its separation here depends on the CPU the model was trained on (AUC
    # 0.016 on one machine, 0.125 and 0.73 [0.47, 0.95] on CI's). The members' clean-image noise estimate is
    # small and not noise-like, and a network trained on white noise only reproduces it erratically. PIA's
    # forward direction is tested against the closed-form memorisers above.


@pytest.mark.slow
def test_dp_sgd_takes_the_memorised_images_back(eight_image_models):
    """The same 8 images, the same steps, trained with DP-SGD at epsilon 1: the members' loss advantage that let
    the attack separate the plain model's members perfectly shrinks to noise.

    Not "the AUC's CI covers 0.5": DP noise is drawn from OS entropy, so the private model differs on every run,
    and with 8 against 8 images the AUC of a model that leaks nothing has a standard deviation of 0.15 (runs here:
    0.47 and 0.78, the second CI [0.56, 0.98]). The mean gap is steadier: 0.003 and 0.022 in those runs (a null
    sampling SD of ~0.01), against 0.225 for the plain model."""
    model, images = eight_image_models
    plain, private = loss_attack(model(), images), loss_attack(model(1.0), images)

    def members_advantage(report):
        return np.mean(report.member_statistics) - np.mean(report.non_member_statistics)

    assert plain.auc == 1.0 and members_advantage(plain) > 0.1, plain
    assert abs(members_advantage(private)) < members_advantage(plain) / 4, (private, plain)
    assert private.leakage_auc < plain.leakage_auc, (private.leakage_auc, plain.leakage_auc)


def test_medsyn_evaluate_reports_the_attack_with_its_roc_curve(tmp_path):
    """``evaluate(membership_attack=...)``: --train as members against --test, in metrics and report.html."""
    from medsyn.data import SimulatedBrainMRI
    from medsyn.evaluation import evaluate, write_report
    from medsyn.evaluation.image_sets import ImageSet

    def image_set(name, seed):
        made = SimulatedBrainMRI(32, seed=seed).generate(24)
        return ImageSet(name, torch.from_numpy(made["images"])[:, None], made["labels"], ["healthy", "tumor"], name)

    train, test, real, generated = (image_set(name, seed) for seed, name in
                                    enumerate(("train", "test", "real", "generated")))
    attack = {"model": memoriser("ddpm", train.images), "method": "loss"}
    metrics = evaluate(real, generated, tmp_path, train=train, test=test, diversity_pairs=10,
                       membership_attack=attack, progress=False)
    section = metrics["membership"]
    assert section["auc"] == 1.0 and section["members"] == 24 and section["members_from"] == "train"
    assert section["roc"]["fpr"][0] == section["roc"]["tpr"][0] == 0 and section["roc"]["tpr"][-1] == 1
    assert section["roc"]["tpr"][24] == 1 and section["roc"]["fpr"][24] == 0  # every member ranked first
    assert "member_statistics" not in section
    page = write_report(metrics, real, generated, tmp_path).read_text()
    assert "Privacy: membership inference" in page and "TPR at 1% FPR" in page
    with pytest.raises(ValueError, match="pass --train"):
        evaluate(real, generated, tmp_path, membership_attack=attack, progress=False)


def test_lira_reads_each_image_against_models_that_never_saw_it():
    """Images differ in how easy they are (each its own mean under any model); members gain a little under the
    target. The raw statistic mostly ranks easiness; standardised against reference models it ranks membership."""
    from medsyn.privacy.reference_attack import lira_offline_statistics
    from medsyn.privacy.statistics import binary_auc

    rng = np.random.default_rng(0)
    easiness = rng.normal(0, 3, 400)
    member = np.arange(400) < 200
    references = easiness + rng.normal(0, 0.5, (8, 400))
    target = easiness + rng.normal(0, 0.5, 400) + 1.5 * member
    raw, lira = binary_auc(target, member), binary_auc(lira_offline_statistics(target, references), member)
    assert raw < 0.7 and lira > 0.95
    own = lira_offline_statistics(target, references, global_variance=False)
    assert binary_auc(own, member) > 0.85  # noisier with 8 references, still far above the raw statistic
    one = lira_offline_statistics(np.array([3.0]), np.array([[1.0], [3.0]]))
    assert one == pytest.approx([(3 - 2) / 2**0.5])  # references' mean 2, sd sqrt(2)
    with pytest.raises(ValueError, match="at least 2 reference"):
        lira_offline_statistics(target, references[:1])


def test_medsyn_attack_lira_needs_reference_models(tmp_path, capsys):
    from medsyn.cli import main

    from .conftest import get_dummy_pipeline

    for seed in range(3):
        torch.manual_seed(seed)
        get_dummy_pipeline().save_pretrained(tmp_path / f"model-{seed}")
    rng = np.random.default_rng(0)
    for name in ("members", "non_members"):
        np.savez(tmp_path / f"{name}.npz", images=rng.integers(0, 256, (6, 16, 16), dtype=np.uint8),
                 labels=np.arange(6) % 2, class_names=np.array(["healthy", "tumor"]))
    given = ["--model", str(tmp_path / "model-0"), "--members", str(tmp_path / "members.npz"), "--non-members",
             str(tmp_path / "non_members.npz"), "--resamples", "20", "--draws", "1"]
    assert main(["attack", *given, "--method", "lira", "--reference-models", str(tmp_path / "model-1"),
                 str(tmp_path / "model-2"), "--output-dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "attack.json").read_text())
    assert report["method"] == "lira" and len(report["member_statistics"]) == 6
    for wrong, message in ((["--method", "lira"], "--reference-models (at least 2)"),
                           (["--method", "lira", "--reference-models", str(tmp_path / "model-1")], "got 1"),
                           (["--reference-models", str(tmp_path / "model-1"), str(tmp_path / "model-2")],
                            "only it does")):
        capsys.readouterr()
        assert main(["attack", *given, *wrong, "--output-dir", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
