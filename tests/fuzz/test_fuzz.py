"""The fuzz campaign: bad input never reaches an internal error, a hang or an OOM.

The bounded run (the default, part of ``python -m pytest``) runs DEFAULT_CASES cases with fixed
seeds on two worker processes; ``MPDSL_FUZZ_CASES=20000 python -m pytest tests/fuzz -s`` runs a
long campaign (``MPDSL_FUZZ_SEED`` picks other cases, ``MPDSL_FUZZ_WORKERS`` the pool size,
``MPDSL_FUZZ_REPORT=file.json`` writes the counts). See tests/fuzz/README.md.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzz_cases import campaign  # noqa: E402
from fuzz_pool import run_cases  # noqa: E402
from fuzz_report import format_summary, public, summarize, write_reproducers  # noqa: E402

DEFAULT_CASES = 1500
CASES = int(os.environ.get("MPDSL_FUZZ_CASES", DEFAULT_CASES))
SEED = int(os.environ.get("MPDSL_FUZZ_SEED", "0"))
WORKERS = int(os.environ.get("MPDSL_FUZZ_WORKERS", "2"))


def test_fuzz_campaign():
    cases = campaign(CASES, SEED)
    assert len(cases) == CASES and len({c["id"] for c in cases}) == CASES
    results = run_cases(cases, workers=WORKERS)
    summary = summarize(cases, results)
    text = format_summary(summary)
    print(text)
    if os.environ.get("MPDSL_FUZZ_REPORT"):
        Path(os.environ["MPDSL_FUZZ_REPORT"]).write_text(json.dumps(public(summary), indent=2, default=str))
    assert summary["results"] == CASES, text

    failing = summary["_unknown_results"] + summary["_unknown_quality_results"]
    if failing:
        folder = Path(tempfile.mkdtemp(prefix="mpdsl-fuzz-failures-"))
        written = write_reproducers(cases, failing, folder)
        details = "\n\n".join(f"{r['id']}: {r.get('issue') or r['outcome']}\n{r.get('traceback', r.get('message', ''))[-1500:]}"
                              for r in failing[:8])
        raise AssertionError(f"{text}\n\nreproducers of {len(written)} distinct faults in {folder}\n\n{details}")

    # The generator must keep producing programs that check and run, and mutations user errors.
    generated = summary["per_kind"].get("generated", {})
    assert generated.get("ok", 0) >= 0.5 * sum(generated.values()), text
    assert summary["per_kind"].get("mutated", {}).get("user", 0) >= 0.3 * sum(summary["per_kind"]["mutated"].values()), text
