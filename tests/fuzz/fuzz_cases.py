"""The fuzz campaign's cases: a fixed mix of generated programs, mutated examples, malformed
graphs and weights, and command lines; deterministic in (count, seed)."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

import fuzz_inputs
import fuzz_mutations
from fuzz_programs import programs

# Shares of the campaign (they sum to 1).
MIX = {"generated": 0.36, "mutated": 0.30, "graph": 0.12, "weights": 0.08, "cli": 0.14}


BATCH = 10  # programs per hypothesis seed: hypothesis varies one seed's examples only a little


def _batch(size: int, seed: int) -> list[dict]:
    drawn: list[dict] = []

    @settings(max_examples=size, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hypothesis_seed(seed)
    @given(programs())
    def collect(case):
        drawn.append(case)

    collect()
    return drawn


def draw_programs(count: int, seed: int) -> list[dict]:
    """``count`` distinct generated programs (hypothesis, seeded: the same every run)."""
    drawn: list[dict] = []
    seen: set[str] = set()
    batch = 0
    while len(drawn) < count:
        for case in _batch(BATCH, seed * 1_000_003 + batch):
            text = "\0".join(case["files"].values())
            if text not in seen and len(drawn) < count:
                seen.add(text)
                drawn.append(case)
        batch += 1
    return drawn


def campaign(count: int, seed: int = 0) -> list[dict]:
    """``count`` cases in the MIX proportions, each with a unique id."""
    shares = {k: int(count * v) for k, v in MIX.items()}
    shares["generated"] += count - sum(shares.values())
    rng = random.Random(seed)
    generated = draw_programs(shares["generated"], seed)
    cases = []
    for i, case in enumerate(generated):
        cases.append({**case, "id": f"gen-{i}"})
    # mutations start from the examples and, for a fifth, from the generated programs
    bases = fuzz_mutations.example_bases() + [
        (c["main"], c["files"]) for c in generated[: max(1, len(generated) // 5)]]
    for i in range(shares["mutated"]):
        cases.append({**fuzz_mutations.mutated_case(rng, bases), "id": f"mut-{i}"})
    for i in range(shares["graph"]):
        cases.append({**fuzz_inputs.graph_case(rng, i), "id": f"graph-{i}"})
    for i in range(shares["weights"]):
        cases.append({**fuzz_inputs.weights_case(rng, i), "id": f"weights-{i}"})
    for i in range(shares["cli"]):
        cases.append({**fuzz_inputs.cli_case(rng, i, bases), "id": f"cli-{i}"})
    random.Random(seed + 1).shuffle(cases)  # mixed kinds keep both workers busy
    return cases
