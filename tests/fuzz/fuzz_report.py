"""Counts of a fuzz campaign and the faults it found (known ones by name, the others with a
reproducer written to disk)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from known_faults import KNOWN_FAULTS, known

FAULTS = ("internal", "hang", "oom")


def kind_of(case: dict) -> str:
    return case.get("origin", case["kind"])


def template(message: str) -> str:
    """A message with its numbers and quoted names generalised (a key for distinct faults)."""
    message = re.sub(r"'[^']*'", "'*'", message)
    return re.sub(r"\d+", "N", message)[:160]


def summarize(cases: list[dict], results: dict[str, dict]) -> dict:
    by_id = {c["id"]: c for c in cases}
    outcomes = Counter()
    per_kind: dict[str, Counter] = {}
    stages = Counter()
    known_hits = Counter()
    unknown: list[dict] = []
    quality = Counter()
    quality_known = Counter()
    quality_unknown: list[dict] = []
    retried = 0
    for cid, result in results.items():
        case = by_id[cid]
        kind = kind_of(case)
        outcomes[result["outcome"]] += 1
        per_kind.setdefault(kind, Counter())[result["outcome"]] += 1
        retried += bool(result.get("retried"))
        if kind == "generated":
            stages[f"{result['outcome']} ({result.get('stage', '-')})"] += 1
        if result["outcome"] in FAULTS:
            fault = known(result)
            if fault is not None:
                known_hits[fault.name] += 1
            else:
                unknown.append(result)
        for issue in result.get("quality", ()):
            quality[issue] += 1
            fault = known(result, issue)
            if fault is not None:
                quality_known[fault.name] += 1
            else:
                quality_unknown.append({**result, "issue": issue})
    distinct = Counter((r["outcome"], r.get("exception"), r.get("where"), template(r.get("message", "")))
                       for r in unknown)
    return {
        "cases": len(cases), "results": len(results), "outcomes": dict(outcomes),
        "per_kind": {k: dict(v) for k, v in sorted(per_kind.items())},
        "generated_stages": dict(stages), "retried": retried,
        "known_faults": dict(known_hits), "known_quality": dict(quality_known),
        "user_error_quality": dict(quality),
        "unknown_faults": [{"outcome": o, "exception": e, "where": w, "message": m, "count": n}
                           for (o, e, w, m), n in distinct.most_common()],
        "unknown_quality": sorted({(r["issue"], r.get("error"), template(r.get("message", ""))) for r in quality_unknown}),
        "unmatched_known": sorted(f.name for f in KNOWN_FAULTS
                                  if f.name not in known_hits and f.name not in quality_known),
        "_unknown_results": unknown, "_unknown_quality_results": quality_unknown,
    }


def format_summary(s: dict) -> str:
    lines = [f"fuzz campaign: {s['results']} of {s['cases']} cases classified; outcomes {s['outcomes']}"
             f" ({s['retried']} run twice after a hang or a dead worker)"]
    for kind, counts in s["per_kind"].items():
        lines.append(f"  {kind:10s} {dict(counts)}")
    lines.append(f"  generated programs by stage: {s['generated_stages']}")
    lines.append(f"  user-error quality issues: {s['user_error_quality'] or 'none'}")
    lines.append(f"  known faults (other owners): {s['known_faults'] or 'none'}; known quality: {s['known_quality'] or 'none'}")
    if s["unmatched_known"]:
        lines.append(f"  known faults no case reached this time: {', '.join(s['unmatched_known'])}")
    for f in s["unknown_faults"]:
        lines.append(f"  UNKNOWN {f['outcome']} x{f['count']}: {f['exception']} at {f['where']}: {f['message']}")
    for issue, error, message in s["unknown_quality"]:
        lines.append(f"  UNKNOWN quality '{issue}': {error}: {message}")
    return "\n".join(lines)


def write_reproducers(cases: list[dict], results: list[dict], directory: Path, limit: int = 40) -> list[Path]:
    """One folder per failing case (its files, case.json with the options and the result)."""
    by_id = {c["id"]: c for c in cases}
    written = []
    seen = set()
    for result in results:
        key = (result["outcome"], result.get("exception"), result.get("where"), result.get("issue"))
        if key in seen or len(written) >= limit:
            continue
        seen.add(key)
        case = by_id[result["id"]]
        folder = directory / result["id"]
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in case.get("files", {}).items():
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
        meta = {k: v for k, v in case.items() if k != "files"}
        (folder / "case.json").write_text(json.dumps({"case": meta, "result": result}, indent=2, default=str))
        written.append(folder)
    return written


def public(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.startswith("_")}
