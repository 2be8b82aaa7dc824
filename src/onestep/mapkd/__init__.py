"""MapKD, the project's own one-step method: a generator that gives logits and draws every token through DD1's
closed-form noise-to-token map, distilled on the teacher's conditionals at its own samples (docs/method.md, "MapKD").

    generator.py   MapKDGenerator: the teacher reading noise -> logits -> the map of each position's noise
    train.py       MapKDConfig, the presets, the loss and the resumable training run (onestep mapkd train)
    sampling.py    loading a run, the sampler (one step; k steps through onestep.multistep)
"""
