"""onestep: distil image autoregressive models into one-step generators (DD2, with DD1 as baseline)."""

__version__ = "0.1.0"
