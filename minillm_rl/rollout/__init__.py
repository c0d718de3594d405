"""Rollout generation: teacher-mixed sampling (``sampler``) and its Ray actor wrapper."""

from minillm_rl.rollout.sampler import Rollout, SamplingConfig, sample_rollouts

__all__ = ["Rollout", "SamplingConfig", "sample_rollouts"]
