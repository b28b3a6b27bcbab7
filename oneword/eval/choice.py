"""Choosing among a refinement's words: the names of the candidates and the record of a choice.

The round trip that makes the choice needs an encoder (:mod:`oneword.encoder.select`); the
evaluation only reads its records (``ti eval curve``'s select rows), so they live here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Candidate names: the encoder's prediction and the word after the whole refinement.
PREDICTION, REFINED = "prediction", "refined"


def candidate_name(budget: int, top: int) -> str:
    """The name of the word at ``budget`` steps of a refinement run to ``top`` steps:
    :data:`PREDICTION` (0), :data:`REFINED` (``top``) or ``refined@<budget>``."""
    return PREDICTION if budget == 0 else REFINED if budget == top else f"{REFINED}@{budget}"


@dataclass(frozen=True)
class Choice:
    """Which candidate was kept and every candidate's round-trip distance."""

    kept: str
    distances: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    """Each candidate's round trip, in seconds."""

    def describe_distances(self) -> str:
        """``"prediction 0.0075, refined 0.0089"``: for logs and reports."""
        return ", ".join(f"{name} {d:.4f}" for name, d in self.distances.items())
