"""Membership inference on a released synthetic set: the closed-form statistic, a copying generator exposed, a fresh
one not, and `medsyn attack --synthetic`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsyn.cli import main
from medsyn.privacy.membership import attack_report
from medsyn.privacy.released_set import ReleasedSetSettings, released_set_statistics

from .test_copy_detection import brains, nuisance


def flat_images(values) -> np.ndarray:
    """16 x 16 images of one grey level each: their RMS distance on [0, 1] is the levels' difference / 255."""
    return np.repeat(np.asarray(values, np.uint8)[:, None, None], 16, 1).repeat(16, 2)


def test_the_statistics_are_the_closed_form_distances():
    synthetic, reference = flat_images([100, 104, 110, 150]), flat_images([90, 120, 130, 200])
    members, non_members = flat_images([101]), flat_images([140])
    pixels = ReleasedSetSettings(method="nearest", space="pixels")
    m, n = released_set_statistics(synthetic, members, non_members, settings=pixels)
    assert m == pytest.approx([-1 / 255]) and n == pytest.approx([-10 / 255])
    domias = ReleasedSetSettings(method="domias", space="pixels", k=2)
    m, n = released_set_statistics(synthetic, members, non_members, reference, settings=domias)
    # 2nd nearest: 101 -> synthetic 104 (3), reference 120 (19); 140 -> synthetic 110 (30), reference 120 (20)
    assert m == pytest.approx([np.log(19 / 3)]) and n == pytest.approx([np.log(20 / 30)])


@pytest.mark.parametrize("method", ["nearest", "domias"])
def test_a_set_that_copies_its_members_gives_them_away_and_fresh_draws_do_not(method):
    members, non_members, reference = brains(32, 11, 100), brains(32, 12, 100), brains(32, 13, 200)
    settings = ReleasedSetSettings(method=method)
    copied = np.concatenate([nuisance(members, "noise", np.random.default_rng(0)), brains(32, 14, 100)])
    report = attack_report(*released_set_statistics(copied, members, non_members, reference, settings), settings)
    assert report.auc > 0.95 and report.tpr_at_1pct_fpr > 0.9
    fresh = brains(32, 15, 200)
    report = attack_report(*released_set_statistics(fresh, members, non_members, reference, settings), settings)
    assert abs(report.auc - 0.5) < 0.2  # 5 standard errors of a chance AUC at 100 vs 100


def test_attack_a_released_set_from_the_command_line(tmp_path, capsys):
    members, non_members, reference = brains(32, 21, 30), brains(32, 22, 30), brains(32, 23, 40)
    sets = {"members": members, "non_members": non_members, "reference": reference,
            "synthetic": np.concatenate([members[:15, :, ::-1], brains(32, 24, 45)])}  # half the members, mirrored
    for name, images in sets.items():
        np.savez(tmp_path / f"{name}.npz", images=images)
    path = {name: str(tmp_path / f"{name}.npz") for name in sets}
    given = ["--members", path["members"], "--non-members", path["non_members"], "--output-dir", str(tmp_path / "out")]
    assert main(["attack", "--synthetic", path["synthetic"], "--reference", path["reference"], *given]) == 0
    report = json.loads((tmp_path / "out" / "attack.json").read_text())
    assert report["method"] == "domias" and report["settings"]["space"] == "structure"
    assert set(report["most_exposed_members"][:10]) <= set(range(15)) and (tmp_path / "out" / "roc.png").is_file()
    for wrong, message in (
        (["--synthetic", path["synthetic"]], "needs --reference"),
        (["--synthetic", path["synthetic"], "--model", "m"], "not both"),
        (["--synthetic", path["synthetic"], "--method", "loss"], "choose one of nearest, domias"),
        (["--synthetic", path["synthetic"], "--reference", path["members"]], "30 of the candidate images are in the "
                                                                              "reference set"),
    ):
        capsys.readouterr()
        assert main(["attack", *wrong, *given, "--overwrite"]) == 2
        assert message in capsys.readouterr().err


def test_a_reference_image_that_copies_a_candidate_is_left_out():
    members, non_members = brains(32, 31, 20), brains(32, 32, 20)
    reference = np.concatenate([brains(32, 33, 40), nuisance(non_members[:5], "noise", np.random.default_rng(0))])
    settings = ReleasedSetSettings(method="domias")
    with pytest.warns(UserWarning, match="5 of 45 images copy a candidate"):
        with_copies = released_set_statistics(brains(32, 34, 40), members, non_members, reference, settings)
    clean = released_set_statistics(brains(32, 34, 40), members, non_members, reference[:40], settings)
    assert np.allclose(with_copies[1], clean[1]) and np.allclose(with_copies[0], clean[0])
