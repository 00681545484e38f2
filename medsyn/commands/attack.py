"""`medsyn attack`: membership inference against a model's weights (loss, PIA, LiRA) or a released synthetic set
(DOMIAS, nearest synthetic image)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medsyn.commands.common import SETS_HELP, would_overwrite
from medsyn.validation import count_argument, number_argument

MODEL_ATTACKS, RELEASED_SET_ATTACKS = ("loss", "pia", "lira"), ("nearest", "domias")
"""Spelt here rather than read from the enums, whose modules import torch: ``--help`` stays instant."""


def add_parser(commands, shown: dict) -> None:
    at = commands.add_parser("attack", **shown, help="membership inference: do the model or its released images "
                                                     "tell its training images?")
    at.add_argument("--model", default=None, help="a saved DDPM, score or MediSyn pipeline (folder or Hub id): attack "
                                                  "its weights")
    at.add_argument("--synthetic", default=None, help="a released synthetic image set: attack it, black box"
                    + SETS_HELP)
    at.add_argument("--members", required=True, help="a sample of the model's training images" + SETS_HELP)
    at.add_argument("--non-members", required=True, help="held-out real images of the same distribution" + SETS_HELP)
    at.add_argument("--reference", default=None, help="domias: other real images of the training population, "
                                                      "neither members nor non-members" + SETS_HELP)
    at.add_argument("--method", choices=(*MODEL_ATTACKS, *RELEASED_SET_ATTACKS), default=None,
                    help="with --model: loss (the denoising loss, Carlini et al. 2023, default), pia (proximal "
                         "initialisation, Kong et al.) or lira (the loss against --reference-models', offline LiRA, "
                         "Carlini et al. 2022); with --synthetic: domias (synthetic over reference density, "
                         "van Breugel et al. 2023, default) or nearest (distance to the nearest synthetic image, "
                         "Chen et al. 2020)")
    at.add_argument("--reference-models", nargs="+", default=None,
                    help="lira: models trained by the same script on other images of the population (none of the "
                         "members or non-members), at least 2")
    at.add_argument("--neighbours", type=count_argument(), default=1,
                    help="domias: k of the k-nearest-neighbour densities")
    at.add_argument("--space", choices=("structure", "pixels"), default="structure",
                    help="--synthetic: the audit's distance (structure: robust to noise, blur, intensity, moves, "
                         "mirrors)")
    at.add_argument("--noise-levels", type=number_argument(0, exclusive=True), nargs="+", default=[0.02, 0.05, 0.1],
                    help="fractions of the noise schedule from the clean end")
    at.add_argument("--draws", type=count_argument(), default=4, help="noise draws per level (loss attack)")
    at.add_argument("--prompt", default=None,
                    help="a MediSyn model's caption for every image (the one it was trained with makes a stronger "
                         "attack); default: the empty caption")
    at.add_argument("--resamples", type=count_argument(), default=1000, help="bootstrap resamples for the CIs")
    at.add_argument("--batch-size", type=count_argument(), default=32, help="images per network call")
    at.add_argument("--seed", type=count_argument(0), default=0, help="seed of the noise and the bootstrap")
    at.add_argument("--output-dir", required=True, help="folder for attack.json and roc.png")
    at.add_argument("--overwrite", action="store_true", help="replace existing output files")
    at.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Membership inference against a saved model (--model) or a released synthetic set (--synthetic):
    attack.json (AUC, TPR at low FPR, CIs) and roc.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from medsyn.evaluation import load_image_set
    from medsyn.evaluation.evaluate import attack_statistics
    from medsyn.evaluation.report import roc_figure
    from medsyn.output_files import atomic_write, check_writable, write_text_atomically
    from medsyn.pipelines import load_pipeline
    from medsyn.privacy.membership import AttackMethod, AttackSettings, attack_report, roc_points
    from medsyn.privacy.reference_attack import lira_offline_statistics
    from medsyn.privacy.released_set import ReleasedSetSettings, released_set_statistics

    if (args.model is None) == (args.synthetic is None):
        raise ValueError("give --model (attack the weights) or --synthetic (attack a released image set), not both")
    method = args.method or ("loss" if args.model else "domias")
    if args.model and method not in MODEL_ATTACKS or args.synthetic and method not in RELEASED_SET_ATTACKS:
        raise ValueError(f"--method {method}: with --{'model' if args.model else 'synthetic'} choose one of "
                         f"{', '.join(MODEL_ATTACKS if args.model else RELEASED_SET_ATTACKS)}")
    if args.reference is not None and method != "domias":
        raise ValueError("--reference is the real population set of --method domias")
    if (method == "lira") != bool(args.reference_models):
        raise ValueError("--method lira reads the target against --reference-models (at least 2), and only it does")
    if method == "lira" and len(args.reference_models) < 2:
        raise ValueError(f"--reference-models: at least 2 are needed to estimate a spread, got "
                         f"{len(args.reference_models)}")
    if method == "domias" and args.reference is None:
        raise ValueError("--method domias needs --reference: real images of the training population that are neither "
                         "members nor non-members (or use --method nearest, which needs none)")
    output_dir = Path(args.output_dir)
    if would_overwrite([output_dir / "attack.json", output_dir / "roc.png"], args.overwrite):
        return 2
    specs = (("members", args.members), ("non-members", args.non_members), ("synthetic", args.synthetic),
             ("reference", args.reference))
    sets = {name: load_image_set(spec, name) for name, spec in specs if spec is not None}
    if args.model:
        settings = AttackSettings(method=AttackMethod(method), noise_levels=tuple(args.noise_levels),
                                  draws=args.draws, seed=args.seed, batch_size=args.batch_size)
        pipe = load_pipeline(args.model)
    else:
        settings = ReleasedSetSettings(method=method, k=args.neighbours, space=args.space, seed=args.seed)
    check_writable(output_dir)
    if args.model:
        candidates = (sets["members"], sets["non-members"])
        statistics = attack_statistics(pipe, candidates, settings, args.prompt)
        if method == "lira":
            references = [np.concatenate(attack_statistics(load_pipeline(model), candidates, settings, args.prompt))
                          for model in args.reference_models]
            scores = lira_offline_statistics(np.concatenate(statistics), np.stack(references))
            statistics = [scores[: len(statistics[0])], scores[len(statistics[0]) :]]
    else:
        statistics = released_set_statistics(*(sets[name].images if name in sets else None for name in (
            "synthetic", "members", "non-members", "reference")), settings=settings)
    report = attack_report(*statistics, settings, resamples=args.resamples)
    write_text_atomically(output_dir / "attack.json", json.dumps(report.to_dict(), indent=2))
    figure = roc_figure(*roc_points(*statistics), f"{method} attack, AUC {report.auc:.3f}")
    with atomic_write(output_dir / "roc.png") as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)
    print(f"{method} attack: AUC {report.auc:.3f} [{report.auc_ci[0]:.3f}, {report.auc_ci[1]:.3f}], "
          f"TPR at 1% FPR {report.tpr_at_1pct_fpr:.3f}, at 0.1% FPR {report.tpr_at_0_1pct_fpr:.3f} "
          f"({report.members} members, {report.non_members} non-members); wrote {output_dir / 'attack.json'}")
    if report.auc_ci[1] < 0.5:
        print(f"warning: the statistic separates members from non-members in reverse (AUC {report.auc:.3f}): "
              f"membership is exposed all the same (leakage AUC {report.leakage_auc:.3f})", file=sys.stderr)
    return 0
