"""What medsyn's samplers share: ``timesteps`` lists the sigma of every network evaluation, in order, and each
``step`` advances past one evaluation, so a pipeline loop is ``for t in timesteps: x = step(f(x, t), t, x)``."""

from __future__ import annotations

import torch


class EvaluationSchedule:
    """``step_index``, the identity ``scale_model_input`` and the checks every ``step`` makes."""

    timesteps: torch.Tensor
    _step_index: int

    @property
    def step_index(self) -> int:
        """Index into ``timesteps`` of the next evaluation."""
        return self._step_index

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | float | None = None) -> torch.Tensor:
        """Identity: the score network takes the noisy sample as it is (kept for the diffusers contract)."""
        return sample

    def _check_step(self, model_output: torch.Tensor, sample: torch.Tensor) -> None:
        if self._step_index >= len(self.timesteps):
            raise ValueError(f"step() called {self._step_index + 1} times for a schedule of {len(self.timesteps)} "
                             "evaluations; call set_timesteps() before sampling again")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}")
