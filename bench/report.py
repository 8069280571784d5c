"""The benchmark report: a pure function from per-mode results to tables.

Nothing here talks to a server, so the numbers can be unit-tested on synthetic
data (tests/unit/test_bench_report.py). Definitions (as ALGORITHMS.md):

* tokens/s = generated tokens / summed client-side request wall time
* ratio = a mode's tokens/s over ``ar``'s (when ``ar`` ran)
* peer rows (another server on the same prompts, e.g. llama.cpp: ``ModeResult.peer``)
  are reported like modes; every row also gets its ratio to the best peer row
  (the peer with the most tokens/s), so "Tandem vs the best alternative" is one column
* acceptance rate = accepted draft tokens / proposed draft tokens
* mean acceptance length = generated tokens / target passes (counts the
  correction/bonus token, as vLLM and SGLang do)
* identical = outputs whose text equals ``ar``'s for the same prompt; for each
  one that differs, the first differing token index and the target's top-2
  log-probability margin there (from ``ar``'s logprobs), so a divergence can be
  told apart as a near-tie (tiny margin: floating point) or a bug (large margin).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from configs.modes import BASELINE


@dataclass
class RequestResult:
    """One measured request (warm-up excluded)."""

    prompt_id: str
    kind: str  # "chat" | "completion"
    prompt: str
    text: str
    completion_tokens: int
    wall_s: float
    finish_reason: str | None = None
    # per generated position: the token string and the top log-probabilities there (descending)
    tokens: list[str] | None = None
    top_logprobs: list[list[float]] | None = None
    # the server's extra "speculation" field (None if it sent none)
    num_draft_tokens: int | None = None
    num_accepted_tokens: int | None = None
    num_target_passes: int | None = None


@dataclass
class ModeResult:
    mode: str
    requests: list[RequestResult]
    startup_s: float | None = None
    # change of the server's worker counters over the measured requests (bench.harness.WORKER_COUNTERS)
    counters: dict[str, float] = field(default_factory=dict)
    peer: bool = False  # another server measured alongside (llama.cpp, --external), not a Tandem mode


@dataclass
class Divergence:
    prompt_id: str
    prompt: str
    index: int | None  # first differing token position (None: token lists unavailable)
    baseline_token: str | None
    mode_token: str | None
    margin: float | None  # ar's top1 - top2 logprob at `index` (None: not available)


@dataclass
class ModeSummary:
    mode: str
    num_requests: int
    generated_tokens: int
    wall_s: float
    tokens_per_s: float | None
    ratio_to_ar: float | None
    num_draft_tokens: int | None
    num_accepted_tokens: int | None
    num_target_passes: int | None
    acceptance_rate: float | None
    mean_acceptance_length: float | None
    identical_to_ar: int | None  # count of outputs equal to ar's, over compared prompts
    compared_to_ar: int | None
    divergences: list[Divergence] = field(default_factory=list)
    startup_s: float | None = None
    verify_busy: float | None = None  # fraction of the wall time the verify worker computed
    draft_busy: float | None = None
    rollback_rate: float | None = None  # draft rollbacks per target pass
    verify_wait: float | None = None  # fraction of the wall time the verifier waited for drafts
    other_ms_per_pass: float | None = None  # wall time neither computing nor waiting, per target pass
    peer: bool = False
    ratio_to_best_peer: float | None = None  # tokens/s over the fastest peer row's


def best_peer(summaries: list[ModeSummary]) -> ModeSummary | None:
    """The peer row with the most tokens/s (None: no peer measured)."""
    peers = [s for s in summaries if s.peer and s.tokens_per_s]
    return max(peers, key=lambda s: s.tokens_per_s) if peers else None


def _sum_optional(values: list[int | None]) -> int | None:
    """Sum if every request reported the field, else None."""
    if not values or any(v is None for v in values):
        return None
    return int(sum(values))


def first_difference(a: list[str], b: list[str]) -> int | None:
    """First index where two token lists differ (a strict prefix differs at its end); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def top2_margin(top_logprobs: list[list[float]] | None, index: int | None) -> float | None:
    """top1 - top2 log-probability at a position, or None if not available."""
    if top_logprobs is None or index is None or index >= len(top_logprobs):
        return None
    lps = sorted(top_logprobs[index], reverse=True)
    if len(lps) < 2:
        return None
    return lps[0] - lps[1]


def divergence(baseline: RequestResult, other: RequestResult) -> Divergence | None:
    """How `other`'s output departs from the baseline's for the same prompt (None: identical text)."""
    if baseline.text == other.text:
        return None
    index = None
    if baseline.tokens is not None and other.tokens is not None:
        index = first_difference(baseline.tokens, other.tokens)

    def token_at(tokens: list[str] | None) -> str | None:
        return tokens[index] if tokens is not None and index is not None and index < len(tokens) else None

    return Divergence(
        prompt_id=baseline.prompt_id,
        prompt=baseline.prompt,
        index=index,
        baseline_token=token_at(baseline.tokens),
        mode_token=token_at(other.tokens),
        margin=top2_margin(baseline.top_logprobs, index),
    )


def summarize(results: list[ModeResult]) -> list[ModeSummary]:
    """Per-mode summary rows, in the order the modes ran."""
    baseline = next((r for r in results if r.mode == BASELINE), None)
    base_tps = None
    summaries = []
    for result in results:
        reqs = result.requests
        tokens = sum(r.completion_tokens for r in reqs)
        wall = sum(r.wall_s for r in reqs)
        tps = tokens / wall if wall > 0 else None
        if result is baseline:
            base_tps = tps
        drafted = _sum_optional([r.num_draft_tokens for r in reqs])
        accepted = _sum_optional([r.num_accepted_tokens for r in reqs])
        passes = _sum_optional([r.num_target_passes for r in reqs])

        identical = compared = None
        divergences: list[Divergence] = []
        if baseline is not None and result is not baseline:
            by_id = {r.prompt_id: r for r in baseline.requests}
            pairs = [(by_id[r.prompt_id], r) for r in reqs if r.prompt_id in by_id]
            compared = len(pairs)
            for base_req, req in pairs:
                d = divergence(base_req, req)
                if d is not None:
                    divergences.append(d)
            identical = compared - len(divergences)

        summaries.append(
            ModeSummary(
                mode=result.mode,
                num_requests=len(reqs),
                generated_tokens=tokens,
                wall_s=wall,
                tokens_per_s=tps,
                ratio_to_ar=None,
                num_draft_tokens=drafted,
                num_accepted_tokens=accepted,
                num_target_passes=passes,
                acceptance_rate=accepted / drafted if drafted and accepted is not None else None,
                mean_acceptance_length=tokens / passes if passes else None,
                identical_to_ar=identical,
                compared_to_ar=compared,
                divergences=divergences,
                startup_s=result.startup_s,
                **_worker_columns(result.counters, wall, passes),
                peer=result.peer,
            )
        )
    if base_tps:
        for s in summaries:
            s.ratio_to_ar = s.tokens_per_s / base_tps if s.tokens_per_s is not None else None
    best = best_peer(summaries)
    if best is not None:
        for s in summaries:
            s.ratio_to_best_peer = s.tokens_per_s / best.tokens_per_s if s.tokens_per_s is not None else None
    return summaries


def _worker_columns(counters: dict[str, float], wall: float, passes: int | None) -> dict[str, float | None]:
    def busy(key: str) -> float | None:
        return counters[key] / wall if key in counters and wall > 0 and counters[key] > 0 else None

    rollbacks = counters.get("rollbacks")
    other = None
    if "verify_busy_s" in counters and wall > 0 and passes:
        # messaging, acceptance, bookkeeping, HTTP: everything but target passes and draft waits
        other = (wall - counters["verify_busy_s"] - counters.get("verify_wait_s", 0.0)) / passes * 1e3
    return {
        "verify_busy": busy("verify_busy_s"),
        "draft_busy": busy("draft_busy_s"),
        "rollback_rate": rollbacks / passes if rollbacks is not None and passes else None,
        "verify_wait": counters["verify_wait_s"] / wall if "verify_wait_s" in counters and wall > 0 else None,
        "other_ms_per_pass": other,
    }


# ---------------------------------------------------------------- rendering


def _fmt(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _cell(text: str, limit: int = 60) -> str:
    text = text.replace("\n", "\\n").replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pooled(rounds: list[list[ModeResult]]) -> list[ModeResult]:
    """Each run's results of every round as one (requests one after another, counters summed,
    the first round's start-up), in the first round's order."""
    out = []
    for first in rounds[0]:
        same = [r for results in rounds for r in results if r.mode == first.mode]
        counters: dict[str, float] = {}
        for r in same:
            for key, value in r.counters.items():
                counters[key] = counters.get(key, 0.0) + value
        out.append(ModeResult(first.mode, [q for r in same for q in r.requests], first.startup_s, counters, first.peer))
    return out


@dataclass
class RoundRow:
    """One run's tokens/s in each round, and its ratio to the baseline of the same round."""

    mode: str
    tokens_per_s: list[float | None]
    ratios_to_ar: list[float | None]

    @property
    def median_ratio(self) -> float | None:
        ratios = [r for r in self.ratios_to_ar if r is not None]
        return statistics.median(ratios) if ratios else None


def round_rows(rounds: list[list[ModeResult]]) -> list[RoundRow]:
    """Per run, its rounds side by side: on a machine whose speed drifts, a ratio to ar taken
    within each round (the two measured minutes apart) is the figure to trust, not one of
    pooled totals."""
    per_round = [summarize(results) for results in rounds]
    rows = []
    for first in per_round[0]:
        picked = [next((s for s in summaries if s.mode == first.mode), None) for summaries in per_round]
        rows.append(RoundRow(first.mode, [s.tokens_per_s if s else None for s in picked],
                             [s.ratio_to_ar if s else None for s in picked]))
    return rows


def rounds_markdown(rows: list[RoundRow]) -> str:
    """The per-round table (bench --rounds)."""
    n = len(rows[0].tokens_per_s)
    lines = [
        "## Rounds",
        "",
        "Every run once per round, the rounds one after another; vs ar within each round.",
        "",
        "| mode | " + " | ".join(f"round {i + 1} tokens/s" for i in range(n)) + " | "
        + " | ".join(f"round {i + 1} vs ar" for i in range(n)) + " | median vs ar |",
        "| --- | " + " | ".join("---:" for _ in range(2 * n)) + " | ---: |",
    ]
    for row in rows:
        cells = [_fmt(t) for t in row.tokens_per_s] + [_fmt(r, ".2f", "x") for r in row.ratios_to_ar]
        lines.append(f"| {row.mode} | " + " | ".join(cells) + f" | {_fmt(row.median_ratio, '.2f', 'x')} |")
    return "\n".join(lines) + "\n"


def to_markdown(summaries: list[ModeSummary], meta: dict[str, Any] | None = None) -> str:
    """The report as Markdown: a settings line, the mode table, then every divergence from ar."""
    lines = ["# Tandem benchmark", ""]
    if meta:
        lines += [", ".join(f"{k}: `{v}`" for k, v in meta.items()), ""]
    lines += [
        "| mode | server | requests | tokens | wall s | tokens/s | vs ar | vs best peer | acceptance rate "
        "| mean acc. length | rollbacks / pass | verify busy | verify waits | other ms / pass | draft busy "
        "| identical to ar |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        identical = "-" if s.identical_to_ar is None else f"{s.identical_to_ar}/{s.compared_to_ar}"
        lines.append(
            f"| {s.mode} | {'peer' if s.peer else 'tandem'} | {s.num_requests} | {s.generated_tokens} "
            f"| {_fmt(s.wall_s)} | {_fmt(s.tokens_per_s)} "
            f"| {_fmt(s.ratio_to_ar, '.2f', 'x')} | {_fmt(s.ratio_to_best_peer, '.2f', 'x')} "
            f"| {_fmt(s.acceptance_rate, '.1%')} "
            f"| {_fmt(s.mean_acceptance_length)} | {_fmt(s.rollback_rate)} | {_fmt(s.verify_busy, '.0%')} "
            f"| {_fmt(s.verify_wait, '.0%')} | {_fmt(s.other_ms_per_pass, '.1f')} "
            f"| {_fmt(s.draft_busy, '.0%')} | {identical} |"
        )
    lines += [
        "",
        "tokens/s = generated tokens / summed request wall time (client side, sequential requests); "
        "acceptance rate = accepted / drafted; mean acceptance length = tokens per target pass; "
        "busy = time a worker spent computing / that wall time (draft and verify overlap when both are high); "
        "verify waits = time the verifier sat idle for drafts / that wall time; "
        "other ms / pass = (wall - verify busy - verify waits) / target passes: messaging, acceptance, HTTP.",
    ]
    best = best_peer(summaries)
    if best is not None:
        lines += [
            "",
            f"server `peer`: another server on the same prompts through the same client (not Tandem); "
            f"vs best peer = tokens/s over {best.mode}'s ({best.tokens_per_s:.2f}), the fastest peer row. "
            "Worker columns do not apply to peers (`-`); a peer's acceptance rate is its own report "
            "(llama.cpp: timings.draft_n_accepted / draft_n).",
        ]
    divs = [(s.mode, d) for s in summaries for d in s.divergences]
    if divs:
        lines += [
            "",
            "## Outputs that differ from ar",
            "",
            "| mode | prompt | first differing token | ar token | mode token | ar top-2 logprob margin |",
            "| --- | --- | ---: | --- | --- | ---: |",
        ]
        for mode, d in divs:
            lines.append(
                f"| {mode} | {_cell(d.prompt_id + ': ' + d.prompt)} | {_fmt(d.index, 'd')} "
                f"| {_cell(repr(d.baseline_token)) if d.baseline_token is not None else '-'} "
                f"| {_cell(repr(d.mode_token)) if d.mode_token is not None else '-'} | {_fmt(d.margin, '.4f')} |"
            )
    return "\n".join(lines) + "\n"


def to_json(summaries: list[ModeSummary], results: list[ModeResult], meta: dict[str, Any] | None = None) -> dict:
    """Everything, machine-readable: settings, the summaries, and every request."""
    best = best_peer(summaries)
    return {
        "meta": meta or {},
        "best_peer": best.mode if best is not None else None,
        "summary": [asdict(s) for s in summaries],
        "results": [asdict(r) for r in results],
    }


def write_report(out: Path, name: str, latest: str, markdown: str, data: dict, prog: str) -> None:
    """The report as NAME.md and NAME.json, and again as LATEST.md and LATEST.json, in `out`;
    then printed, with where it went."""
    out.mkdir(parents=True, exist_ok=True)
    for stem in (name, latest):
        (out / f"{stem}.md").write_text(markdown)
        (out / f"{stem}.json").write_text(json.dumps(data, indent=2))
    print()
    print(markdown)
    print(f"{prog}: wrote {out / f'{name}.md'} (+ .json, {latest}.md, {latest}.json)")
