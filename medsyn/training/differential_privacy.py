"""Differentially private training (DP-SGD) of the pixel-space models, with Opacus.

A membership attack measures what one attack gets out of a model; DP-SGD bounds what any attack can: with an
(epsilon, delta) guarantee, no test can tell whether a given patient's scan was in the training set much better
than chance (the odds change by at most a factor e^epsilon, except with probability delta). What it takes, as
Dockhorn et al. 2022 ("Differentially Private Diffusion Models") do it:

- Per-sample gradients (Opacus' ``GradSampleModule``), each clipped to ``max_grad_norm``, summed, plus Gaussian
  noise of std ``noise_multiplier x max_grad_norm`` (Opacus' ``DPOptimizer``).
- Poisson sampling: every image joins a batch with probability q = batch size / images, independently, so a batch
  has a random size and may be empty. The accountant's amplification by sampling assumes exactly this.
- Noise multiplicity K: each sample's loss is the mean over K noise draws (levels and noise) before its gradient
  is clipped. Its gradient is less noisy for free: the K copies belong to one sample, so one clip bounds them.
- The accountant (PRV by default, RDP on request) turns (noise, q, steps) into epsilon. The noise multiplier is
  solved for before training from the run's step budget, so a budget that cannot be met is refused before a step
  is spent; the epsilon actually spent goes into the model card and ``training_summary.json``.
- A resume keeps the accountant's history of (noise, q, steps) stretches; when the budget changed (more steps, a
  new batch size), the noise of the remaining steps is solved again so that the whole history meets the target,
  or the resume is refused. The card lists every stretch.
- Nothing derived from the private data leaves the folder unnoised: the final training loss and the exact number
  of images are withheld from the card and ``training_summary.json`` (the sample rate is shown to 2 digits).
  The default delta is a power of ten at most 1 / (100 N), so it does not reveal N either.

The noise and the Poisson batches are drawn from generators seeded from the operating system's entropy, never from
``--seed``: the guarantee holds only while the noise is secret, and the seed is printed in every model card. A DP
run is therefore not reproducible bit for bit. Models must not use BatchNorm (it mixes samples); medsyn's UNets use
GroupNorm. One process only: multi-process DP (Opacus' DPDDP) is refused with a message.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator

from medsyn.training.accelerator import step_budget
from medsyn.validation import count_argument, number_argument

#: The accountant's history in a checkpoint: (noise multiplier, sample rate, steps) per stretch of the run.
ACCOUNTANT_FILE = "privacy_accountant.json"


class PrivacyAccountant(StrEnum):
    PRV = "prv"
    """Gopi et al. 2021: numerically tight; Opacus' recommended accountant."""
    RDP = "rdp"
    """Rényi DP (Mironov 2017): a looser upper bound, the one most papers report."""


@dataclass(frozen=True)
class PrivacyBudget:
    """What the caller asks for: an (epsilon, delta) guarantee at the end of the run, and how to spend it."""

    epsilon: float
    delta: float
    max_grad_norm: float = 1.0
    noise_multiplicity: int = 1
    accountant: PrivacyAccountant = PrivacyAccountant.PRV

    def __post_init__(self):
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"dp_epsilon must be a positive number, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp_delta must be in (0, 1), got {self.delta}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"dp_max_grad_norm must be a positive number, got {self.max_grad_norm}")
        if self.noise_multiplicity < 1:
            raise ValueError(f"dp_noise_multiplicity must be >= 1, got {self.noise_multiplicity}")
        object.__setattr__(self, "accountant", PrivacyAccountant(self.accountant))


@dataclass
class PrivacyReport:
    """What a DP run spent, for the model card and ``training_summary.json``."""

    epsilon: float
    """The accountant's epsilon for the steps actually run, at ``delta``."""
    delta: float
    images_times_delta: float
    """N x delta, to 1 digit: the expected number of images the guarantee's failure case could release."""
    target_epsilon: float
    noise_multiplier: float
    """The noise of the last stretch."""
    sample_rate: float
    """To 2 significant digits (the exact rate would give the number of images)."""
    steps: int
    max_grad_norm: float
    noise_multiplicity: int
    accountant: str
    history: list[tuple[float, float, int]]
    """(noise multiplier, sample rate to 2 digits, steps) per stretch of the run, in order."""

    def card_text(self) -> str:
        stretches = ", then ".join(f"noise multiplier {noise:.4g} for {steps} steps at sample rate {rate:.2g}"
                                   for noise, rate, steps in self.history)
        return (f"(epsilon {self.epsilon:.3g}, delta {self.delta:.3g})-DP by DP-SGD ({self.accountant.upper()} "
                f"accountant, target epsilon {self.target_epsilon:g}; N x delta {self.images_times_delta:.1g}): "
                f"{self.steps} steps (Poisson sampling): {stretches}; per-sample clip {self.max_grad_norm:g}, noise "
                f"multiplicity {self.noise_multiplicity}")


def add_privacy_arguments(parser: argparse.ArgumentParser) -> None:
    dp = parser.add_argument_group("differential privacy (DP-SGD with Opacus; off unless --dp_epsilon is given)")
    dp.add_argument("--dp_epsilon", type=number_argument(0, exclusive=True), default=None,
                    help="Train with DP-SGD to this epsilon at the end of the run; the noise is solved for.")
    dp.add_argument("--dp_delta", type=number_argument(0, exclusive=True), default=None,
                    help="The guarantee's delta; default the largest power of ten at most 1 / (100 x training "
                         "images). Must be below 1 / images.")
    dp.add_argument("--dp_max_grad_norm", type=number_argument(0, exclusive=True), default=1.0,
                    help="Each sample's gradient is clipped to this l2 norm.")
    dp.add_argument("--dp_noise_multiplicity", type=count_argument(), default=1,
                    help="Noise draws per sample, averaged before clipping (DPDM's K).")
    dp.add_argument("--dp_accountant", type=str, default=PrivacyAccountant.PRV.value,
                    choices=[a.value for a in PrivacyAccountant], help="How epsilon is computed.")


def check_privacy_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                            unsupported: dict[str, bool] | None = None) -> None:
    """Refuse what DP-SGD here does not do, naming the flag: accumulation (one Poisson batch is one step),
    gradient checkpointing (Opacus' hooks), mixed precision, and any script-specific ``unsupported`` flags."""
    if args.dp_epsilon is None:
        if args.dp_delta is not None:
            parser.error("--dp_delta needs --dp_epsilon")
        return
    refused = {"--gradient_accumulation_steps > 1": args.gradient_accumulation_steps > 1,
               "--gradient_checkpointing": args.gradient_checkpointing,
               "--mixed_precision fp16/bf16": args.mixed_precision in ("fp16", "bf16"),
               **(unsupported or {})}
    for flag, used in refused.items():
        if used:
            parser.error(f"--dp_epsilon cannot be combined with {flag}")


def default_delta(num_images: int) -> float:
    """The largest power of ten at most 1 / (100 N): a 1% chance at most, summed over the images, that one is
    released outright, and a value that does not give N away."""
    return 10.0 ** math.floor(math.log10(1 / (100 * num_images)))


def budget_from_args(args: argparse.Namespace, num_images: int) -> PrivacyBudget | None:
    if args.dp_epsilon is None:
        return None
    return PrivacyBudget(epsilon=args.dp_epsilon, delta=args.dp_delta or default_delta(num_images),
                         max_grad_norm=args.dp_max_grad_norm, noise_multiplicity=args.dp_noise_multiplicity,
                         accountant=args.dp_accountant)


@contextlib.contextmanager
def quiet_prv_bounds(accountant: PrivacyAccountant):
    """Under the PRV accountant, without the warnings its RDP bound on the grid sets off (the order warning is
    meant for RDP's own epsilon; log(1 - q) at q = 1): every DP run's user would see them, with nothing to do."""
    with warnings.catch_warnings():
        if accountant is PrivacyAccountant.PRV:
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            warnings.filterwarnings("ignore", message="divide by zero encountered in log", category=RuntimeWarning)
        yield


def noise_multiplier_for(budget: PrivacyBudget, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to 1% in epsilon) that keeps ``steps`` steps at ``sample_rate`` within the
    budget; a clear error when none can."""
    try:
        with quiet_prv_bounds(budget.accountant):
            return get_noise_multiplier(target_epsilon=budget.epsilon, target_delta=budget.delta,
                                        sample_rate=sample_rate, steps=steps, accountant=budget.accountant.value)
    except ValueError as error:
        raise ValueError(f"dp_epsilon {budget.epsilon} at delta {budget.delta:.3g} cannot be met in {steps} steps at "
                         f"sample rate {sample_rate:.4g} ({error}); allow a larger epsilon, or train fewer steps "
                         "or with smaller batches") from error


def epsilon_of(history: list[tuple[float, float, int]], budget: PrivacyBudget) -> float:
    """The accountant's epsilon at ``budget.delta`` for the stretches of ``history``."""
    accountant = create_accountant(budget.accountant.value)
    accountant.history = list(history)
    with quiet_prv_bounds(budget.accountant):
        return accountant.get_epsilon(delta=budget.delta)


def remaining_noise_multiplier(history: list[tuple[float, float, int]], budget: PrivacyBudget, sample_rate: float,
                               steps: int) -> float:
    """The smallest noise (to 0.1%) for ``steps`` more steps after ``history`` so that the whole run meets the
    budget; a clear error when even huge noise cannot (the steps already run spent it)."""
    spent = epsilon_of(history, budget)
    if spent >= budget.epsilon:
        raise ValueError(f"dp_epsilon {budget.epsilon}: the {sum(s for _, _, s in history)} steps already run spent "
                         f"epsilon {spent:.3g}; resume with a larger --dp_epsilon or do not train further")
    low, high = 0.0, 1.0
    while epsilon_of([*history, (high, sample_rate, steps)], budget) > budget.epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"dp_epsilon {budget.epsilon} cannot be met: {steps} more steps after epsilon "
                             f"{spent:.3g} spent would need a noise multiplier over 10,000")
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        if epsilon_of([*history, (middle, sample_rate, steps)], budget) > budget.epsilon:
            low = middle
        else:
            high = middle
    return high


def _contiguous_conv_grad_sample(layer, activations, backprops):
    """Opacus' Conv2d per-sample gradient, on contiguous activations: its unfold walks the input by NCHW strides
    and returns zeros for a channels-last one (opacus 1.6), which diffusers' attention blocks hand to the next
    ResNet block; those convolutions' weights would then get noise only."""
    return compute_conv_grad_sample(layer, [a.contiguous() for a in activations], backprops)


class _GradSampleModule(GradSampleModule):
    GRAD_SAMPLERS = {**GradSampleModule.GRAD_SAMPLERS, torch.nn.Conv2d: _contiguous_conv_grad_sample}


def entropy_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS's entropy: DP noise must not be reproducible from the published seed."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


class _EmptyAsNone:
    """A collate function that gives None for an empty Poisson batch (picklable, for loader worker processes)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, rows):
        return self.collate(rows) if rows else None


class PrivateTraining:
    """One model, its optimiser and its data made private: per-sample gradients, clipping, noise, Poisson batches
    and the accountant. The training loop calls ``backward`` instead of back-propagating itself."""

    def __init__(self, budget: PrivacyBudget, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 dataloader: torch.utils.data.DataLoader, batch_size: int, steps_for: Callable[[int], int],
                 device: torch.device | str = "cpu", noise_multiplier: float | None = None):
        """``steps_for(batches_per_epoch)`` is the run's optimiser-step budget, counted in the Poisson loader's
        epochs, that the noise is solved for; ``noise_multiplier`` overrides the solved one (tests)."""
        errors = ModuleValidator.validate(model.train(), strict=False)  # (a loaded model comes in eval mode)
        if errors:
            raise ValueError(f"the model cannot be trained with DP-SGD: {errors[0]}")
        num_images = len(dataloader.dataset)
        if budget.delta >= 1 / num_images:
            raise ValueError(f"dp_delta {budget.delta:.3g} must be below 1 / training images = {1 / num_images:.3g}: "
                             "a larger delta allows releasing one image outright")
        self.budget = budget
        self.sample_rate = min(1.0, batch_size / num_images)
        self.dataloader = torch.utils.data.DataLoader(
            dataloader.dataset, num_workers=dataloader.num_workers,
            batch_sampler=UniformWithReplacementSampler(num_samples=num_images, sample_rate=self.sample_rate,
                                                        generator=entropy_generator()),
            collate_fn=_EmptyAsNone(dataloader.collate_fn),
        )
        self.total_steps = steps_for(len(self.dataloader))
        self.noise_multiplier = noise_multiplier if noise_multiplier is not None else noise_multiplier_for(
            budget, self.sample_rate, self.total_steps)
        self.model = _GradSampleModule(model, loss_reduction="mean")
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                     max_grad_norm=budget.max_grad_norm, expected_batch_size=batch_size,
                                     loss_reduction="mean", generator=entropy_generator(device))
        self.accountant = create_accountant(budget.accountant.value)
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def backward(self, loss_fn, batch: dict | None, step) -> dict:
        """Per-sample gradients of ``loss_fn`` for the optimiser to clip and noise: each row repeated K times,
        their gradients averaged per sample. An empty batch leaves zero samples, so the step adds noise only (the
        accountant counts it like any other). Returns ``loss_fn``'s terms ({} for an empty batch)."""
        if batch is None:
            for p in self.parameters:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            return {}
        k = self.budget.noise_multiplicity
        losses = loss_fn({name: repeated(value, k) for name, value in batch.items()}, step)
        with warnings.catch_warnings():  # Opacus' hooks fire on module outputs when the input needs no gradient
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses["loss"].backward()
        for p in self.parameters:
            p.grad_sample = p.grad_sample.unflatten(0, (-1, k)).mean(1)
        return losses

    def spent_epsilon(self) -> float:
        if not self.accountant.history:
            return 0.0
        with quiet_prv_bounds(self.budget.accountant):
            return self.accountant.get_epsilon(delta=self.budget.delta)

    def report(self) -> PrivacyReport:
        history = self.accountant.history  # Opacus keeps it as stretches of one noise and rate
        num_images = len(self.dataloader.dataset)
        return PrivacyReport(
            epsilon=self.spent_epsilon(), delta=self.budget.delta,
            images_times_delta=float(f"{num_images * self.budget.delta:.1g}"), target_epsilon=self.budget.epsilon,
            noise_multiplier=self.noise_multiplier, sample_rate=float(f"{self.sample_rate:.2g}"),
            steps=sum(steps for _, _, steps in history), max_grad_norm=self.budget.max_grad_norm,
            noise_multiplicity=self.budget.noise_multiplicity, accountant=self.budget.accountant.value,
            history=[(noise, float(f"{rate:.2g}"), steps) for noise, rate, steps in history])

    def save_accountant(self, checkpoint_dir: str | os.PathLike) -> None:
        Path(checkpoint_dir, ACCOUNTANT_FILE).write_text(json.dumps({"history": self.accountant.history}))

    def load_accountant(self, checkpoint_dir: str | os.PathLike) -> None:
        path = Path(checkpoint_dir, ACCOUNTANT_FILE)
        if not path.is_file():
            raise ValueError(f"{checkpoint_dir} has no {ACCOUNTANT_FILE}: it is not a DP run's checkpoint, and "
                             "resuming it with --dp_epsilon would leave the steps before it unaccounted")
        self.accountant.history = [tuple(entry) for entry in json.loads(path.read_text())["history"]]
        self._meet_the_budget_after(sum(steps for _, _, steps in self.accountant.history))

    def _meet_the_budget_after(self, steps_run: int) -> None:
        """On resume: keep the noise if the whole run still meets the target with it, else solve the remaining
        steps' noise again (a larger --max_train_steps or batch size), or refuse."""
        remaining = max(0, self.total_steps - steps_run)
        history = self.accountant.history
        planned = [*history, (self.noise_multiplier, self.sample_rate, remaining)] if remaining else history
        if epsilon_of(planned, self.budget) <= self.budget.epsilon * 1.0001 or not remaining:
            return
        self.noise_multiplier = remaining_noise_multiplier(history, self.budget, self.sample_rate, remaining)
        self.optimizer.noise_multiplier = self.noise_multiplier
        warnings.warn(f"DP budget changed on resume: {steps_run} steps already spent epsilon "
                      f"{epsilon_of(history, self.budget):.3g}; the remaining {remaining} steps run at noise "
                      f"multiplier {self.noise_multiplier:.4g} so that the whole run meets epsilon "
                      f"{self.budget.epsilon:g}", stacklevel=2)

    def detach(self) -> None:
        """Remove Opacus' hooks: the trained model is saved and sampled as a plain module."""
        self.model.remove_hooks()


def repeated(rows: torch.Tensor | list, k: int) -> torch.Tensor | list:
    """Each row (of a tensor, or of a list such as captions) ``k`` times in a row."""
    return rows.repeat_interleave(k, dim=0) if torch.is_tensor(rows) else [row for row in rows for _ in range(k)]


def make_private(args: argparse.Namespace, accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 dataloader: torch.utils.data.DataLoader) -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                                                   torch.utils.data.DataLoader, PrivateTraining | None]:
    """(model, optimiser, loader, privacy) for the script's flags: made private with --dp_epsilon (the noise solved
    for the run's --max_train_steps or --num_train_epochs, the accountant saved in and restored from every
    checkpoint), as given and None without."""
    budget = budget_from_args(args, len(dataloader.dataset))
    if budget is None:
        return model, optimizer, dataloader, None
    if accelerator.num_processes > 1:
        raise ValueError("--dp_epsilon trains in one process; launch without --multi_gpu / --num_processes")
    private = PrivateTraining(budget, model, optimizer, dataloader, args.train_batch_size,
                              steps_for=lambda batches: step_budget(args, batches)[1], device=accelerator.device)
    accelerator.register_save_state_pre_hook(lambda models, weights, folder: private.save_accountant(folder))
    accelerator.register_load_state_pre_hook(lambda models, folder: private.load_accountant(folder))
    return private.model, private.optimizer, private.dataloader, private
