"""Samplers in the diffusers scheduler contract, and the rules that pick their noise schedules."""

from .ncsn_rules import NoiseSchedule, noise_schedule_from_data
from .scheduling_annealed_langevin import AnnealedLangevinScheduler, AnnealedLangevinSchedulerOutput
from .scheduling_edm_heun import EDMHeunScheduler, EDMHeunSchedulerOutput

__all__ = ["AnnealedLangevinScheduler", "AnnealedLangevinSchedulerOutput", "EDMHeunScheduler", "EDMHeunSchedulerOutput",
           "NoiseSchedule", "noise_schedule_from_data"]
