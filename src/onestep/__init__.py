"""onestep: distil image autoregressive models into one-step generators (DD2, with DD1 as baseline).

The Python API (:mod:`onestep.api`): ``onestep.load(run_dir, device="cpu")`` gives a generator whose
``sample(labels, steps=1, seed=0, **settings)`` returns uint8 images (N, C, H, W); ``onestep.SampleSpec`` holds the
sampling settings. They are imported on first use, so ``import onestep`` stays cheap.
"""

__version__ = "0.1.0"
__all__ = ["load", "SampleSpec", "Generator"]


def __getattr__(name):
    if name in __all__:
        from onestep import api

        return getattr(api, name)
    raise AttributeError(f"module 'onestep' has no attribute {name!r}")
