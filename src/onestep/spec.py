"""How a run is sampled: :class:`SampleSpec`, and the teacher's sampling rule when none is given.

Plain data that imports no torch, so that ``onestep.SampleSpec`` is there at once; the API that samples with it
(:mod:`onestep.api`, which loads torch) is imported when ``onestep.load`` is first used.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SampleSpec", "TEACHER_DEFAULTS", "RULE_FIELDS"]

# the teacher's sampling rule when a teacher run is sampled without settings: the defaults of ``onestep sample``
TEACHER_DEFAULTS = {"cfg_scale": 2.0, "cfg_schedule": "constant", "temperature": 1.0, "top_k": 0, "top_p": 1.0}
RULE_FIELDS = tuple(TEACHER_DEFAULTS)


@dataclass(frozen=True)
class SampleSpec:
    """How a run is sampled.

    method: "teacher" (KV cache), "teacher-nocache", "dd1", "dd2" or "mapkd".
    steps: sequential network calls; 1 = one step, more = one step refined by the teacher under ``multistep``.
    multistep: the multi-step sampler (:mod:`onestep.multistep`; None = the method's default): "alg4" (the teacher
        re-samples its last K - 1 AR steps; DD2's default), "jacobi" (K - 1 parallel teacher passes re-mapping the same
        noise; MapKD's default), or for DD1 "dd1" (its own rule, the default: 2 = two-step, K >= 3 =
        teacher-involved).
    continuous: DD2 one-step only: decode the generator's continuous vectors instead of their nearest codes.
    cfg_scale, cfg_schedule, temperature, top_k, top_p: the teacher's sampling rule
        (:class:`onestep.teacher.sampling.SamplingConfig`); None takes the default: for a teacher run the defaults of
        ``onestep sample`` (``TEACHER_DEFAULTS``), for a distilled run (DD1, DD2, MapKD) the rule it was distilled
        under (it samples under that rule only, so another value is refused).

    The samplers read these attributes by name (the same names as the options of ``onestep sample``).
    """

    method: str = "teacher"
    steps: int = 1
    multistep: str | None = None
    continuous: bool = False
    cfg_scale: float | None = None
    cfg_schedule: str | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
