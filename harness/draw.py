"""
Images from a model: any step counts from the same initial noise, through selfe.sample.
"""
import dataclasses

import torch

import selfe


def allow_tf32():
    """TF32 for float32 matrix products on a CUDA GPU, in training and sampling alike."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def sampler_of(config, **given):
    """-> the run's method's Sampler (selfe.SAMPLERS), with the options given that are not None."""
    return dataclasses.replace(selfe.SAMPLERS[config["method"]],
                               **{k: v for k, v in given.items() if v is not None})


@torch.no_grad()
def generate(model, text, prompts, steps_list, seed, shift, sampler):
    """-> {steps: (P, 3, H, W) images in [-1, 1]}, every step count from the same initial noise,
    with the training's time shift and a selfe.Sampler."""
    device = next(model.parameters()).device
    cond, null = text(prompts), text([""] * len(prompts))
    gen = torch.Generator().manual_seed(seed)
    shape = (len(prompts), model.channels, model.res, model.res)
    noise = torch.randn(shape, generator=gen).to(device)
    out = {}
    for steps in steps_list:
        gen.manual_seed(seed + 1)  # the fresh noise of eta > 0 is the same for every step count
        x = selfe.sample(model, noise, cond, null, steps, shift, sampler, generator=gen)
        out[steps] = x.float().clamp(-1, 1).cpu()
    return out
