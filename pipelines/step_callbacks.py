"""The state diffusers' step-end callbacks read and write, shared by medsyn's pipelines.

diffusers' callbacks (``SDCFGCutoffCallback`` and the like) read ``pipe.num_timesteps`` and set
``pipe._guidance_scale`` or ``pipe._interrupt``; a pipeline reads these back at every step.
"""

from __future__ import annotations

from typing import Any

from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback


class StepCallbackMixin:
    """``guidance_scale``, ``num_timesteps`` and ``interrupt`` as diffusers' pipelines expose them; ``__call__``
    sets ``_guidance_scale``, ``_interrupt`` and ``_num_timesteps``."""

    _callback_tensor_inputs: list[str]

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def callback_tensor_inputs(self, callback: Any, names: list[str] | None, default: list[str]) -> list[str]:
        """The tensors a step-end callback receives: a ``PipelineCallback``'s own ``tensor_inputs``, else
        ``names`` or ``default``; each must be one of ``_callback_tensor_inputs``."""
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            names = callback.tensor_inputs
        names = names or default
        unknown = set(names) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {sorted(unknown)} are not among {self._callback_tensor_inputs}"
            )
        return names
