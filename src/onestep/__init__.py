"""onestep: distil image autoregressive models into one-step generators (MapKD, DD2, and DD1 as the baseline).

The Python API (:mod:`onestep.api`): ``onestep.load(run_dir, device="cpu")`` gives a generator whose
``sample(labels, steps=1, seed=0, **settings)`` returns uint8 images (N, C, H, W); ``onestep.SampleSpec`` holds the
sampling settings; ``onestep.to_pil(images)`` and ``onestep.save_grid(images, path)`` turn images into PIL images or
one PNG. They are imported on first use, so ``import onestep`` stays cheap; ``SampleSpec`` is plain data
(:mod:`onestep.spec`) and loads no torch.
"""

__version__ = "0.1.0"
__all__ = ["load", "SampleSpec", "Generator", "to_pil", "save_grid"]


def __getattr__(name):
    # the package's one lazy import: ``import onestep`` (and the command line's parser) load no torch
    if name == "SampleSpec":
        from onestep.spec import SampleSpec

        return SampleSpec
    if name in __all__:
        from onestep import api

        return getattr(api, name)
    raise AttributeError(f"module 'onestep' has no attribute {name!r}")
