"""Per-noise-level DSM error of a score model, against the zero-score model's known answer."""

import numpy as np
import pytest
import torch

from medsyn.evaluation.score_error import per_sigma_score_error

from .conftest import get_dummy_pipeline


def _images(n=6):
    return torch.randint(0, 256, (n, 1, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_a_zero_score_model_has_relative_error_one_at_every_level():
    pipe = get_dummy_pipeline()
    torch.nn.init.zeros_(pipe.unet.conv_out.weight)
    torch.nn.init.zeros_(pipe.unet.conv_out.bias)
    result = per_sigma_score_error(pipe, _images(40), labels=np.zeros(40, dtype=int))
    assert result["sigma"] == pytest.approx(pipe.scheduler.sigmas.tolist())
    # 1/2 ||z||^2 / (D/2) averaged over 40 images of D = 256: 1 within a few percent.
    assert np.allclose(result["relative_dsm_error"], 1.0, atol=0.05)


def test_same_seed_same_noise_and_labels_are_required():
    pipe = get_dummy_pipeline()
    labels = np.array([0, 1, 0, 1, 0, 1])
    first = per_sigma_score_error(pipe, _images(), labels=labels, batch_size=4)
    second = per_sigma_score_error(pipe, _images(), labels=labels, batch_size=6)  # noise keyed per image
    assert first["relative_dsm_error"] == pytest.approx(second["relative_dsm_error"], rel=1e-5)
    with pytest.raises(ValueError, match="class-conditional"):
        per_sigma_score_error(pipe, _images())
    with pytest.raises(ValueError, match="uint8 images"):
        per_sigma_score_error(pipe, torch.zeros(2, 1, 8, 8, dtype=torch.uint8), labels=np.zeros(2, dtype=int))


def test_evaluate_reports_the_score_error_of_a_saved_model(tmp_path):
    import json

    from medsyn.cli import main

    get_dummy_pipeline().save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "README.md").write_text("# model\n\n## Limitations\n\nSome.\n")
    path = tmp_path / "real.npz"
    np.savez(path, images=_images(8)[:, 0].numpy(), labels=np.arange(8) % 2, class_names=np.array(["healthy", "tumor"]))
    assert main(["evaluate", "--real", str(path), "--generated", str(path), "--no-inception", "--no-downstream",
                 "--score-model", str(tmp_path / "model"), "--output-dir", str(tmp_path / "eval"),
                 "--diversity-pairs", "5", "--model-card", str(tmp_path / "model")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert len(metrics["score_error"]["relative_dsm_error"]) == 4 and metrics["score_error"]["images_from"] == "real"
    assert "Score model error per noise level" in (tmp_path / "eval" / "report.html").read_text()
    card = (tmp_path / "model" / "README.md").read_text()
    assert card.startswith("# model") and "## Limitations" in card and card.count("## Evaluation") == 1
    diversity = metrics["diversity"]["overall"]["generated"]
    assert f"| mean pairwise MS-SSIM, generated (real) | {diversity:.4g}" in card
    from medsyn.model_card import add_evaluation_to_model_card

    again = add_evaluation_to_model_card(tmp_path / "model", metrics).read_text()  # replaced, not appended
    assert again.count("## Evaluation") == 1 and "## Limitations" in again
    np.savez(path, images=_images(8)[:, 0].numpy(), labels=np.arange(8) % 2, class_names=np.array(["a", "b"]))
    assert main(["evaluate", "--real", str(path), "--generated", str(path), "--no-inception", "--no-downstream",
                 "--score-model", str(tmp_path / "model"), "--output-dir", str(tmp_path / "e2")]) == 2


def test_an_edm_model_with_a_zero_network_has_its_closed_form_error_at_every_level():
    """F = 0 leaves D = c_skip x, so s = -x / (sigma^2 + sd^2), and the relative DSM error at sigma is
    (sd^4 + sigma^2 E[x0^2]) / (sigma^2 + sd^2)^2. EDM Heun's schedule ends at sigma 0, which is skipped."""
    from medsyn.models.preconditioning import set_preconditioning
    from medsyn.schedulers import EDMHeunScheduler

    pipe = get_dummy_pipeline()
    torch.nn.init.zeros_(pipe.unet.conv_out.weight)
    torch.nn.init.zeros_(pipe.unet.conv_out.bias)
    sd = 0.5
    set_preconditioning(pipe.unet, "edm", sd)
    pipe.scheduler = EDMHeunScheduler(sigma_max=20.0, sigma_min=0.01)
    images = _images(40)
    result = per_sigma_score_error(pipe, images, labels=np.zeros(40, dtype=int))
    sigmas = np.array(result["sigma"])
    assert (sigmas > 0).all() and len(sigmas) == len(pipe.scheduler.sigmas) - 1
    m2 = ((images.double() / 127.5 - 1) ** 2).mean().item()
    expected = (sd**4 + sigmas**2 * m2) / (sigmas**2 + sd**2) ** 2
    np.testing.assert_allclose(result["relative_dsm_error"], expected, rtol=0.06)
