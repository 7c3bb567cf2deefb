"""The sampler's clean estimate x̂0 (what live previews show, see previews.py).

`predicted_clean` reads x̂0 from a scheduler step (the layered sampler calls it directly);
`CleanEstimateScheduler` lets a stock diffusers pipeline, whose step-end callback only sees
the noisy latent, report it too: the job's pipeline gets the wrapper as its scheduler.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch


def predicted_clean(scheduler, step_output, model_input: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """x̂0 from the step output, or from ᾱ_t for schedulers that do not report it."""
    x0 = getattr(step_output, "pred_original_sample", None)
    if x0 is not None:
        return x0
    alpha = scheduler.alphas_cumprod.to(model_input.device)[int(round(float(t)))].to(model_input.dtype)
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return alpha.sqrt() * model_input - (1 - alpha).sqrt() * eps
    return (model_input - (1 - alpha).sqrt() * eps) / alpha.sqrt()


class CleanEstimateScheduler:
    """A scheduler that delegates everything to `scheduler` but keeps each step's x̂0 in
    `clean` (None before the first step), so the pipeline's step-end callback can preview it.

    Installed only while previews are collected: the extra work is one tensor per step.
    """

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.clean: Optional[torch.Tensor] = None
        # pipelines read step()'s signature to decide which kwargs (eta, generator) to pass
        self.step = functools.wraps(scheduler.step)(
            lambda *args, **kwargs: self._step(*args, **kwargs))

    def __getattr__(self, name):
        return getattr(self.scheduler, name)

    def _step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *args, **kwargs):
        return_dict = kwargs.pop("return_dict", True)
        model_input = self.scheduler.scale_model_input(sample, timestep)  # before step() moves on
        out = self.scheduler.step(model_output, timestep, sample, *args, return_dict=True, **kwargs)
        self.clean = predicted_clean(self.scheduler, out, model_input, model_output, timestep)
        return out if return_dict else out.to_tuple()
