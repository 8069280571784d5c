"""Write the local multiple-choice task that `make lmeval` runs through
lm-evaluation-harness against a Tandem server (loglikelihood requests: echo +
logprobs). Deterministic: the same 300 questions on every run.

    python -m bench.lmeval.make_task          # writes bench/lmeval/tandem_arith.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "tandem_arith.jsonl"
NUM_QUESTIONS = 300


def questions(n: int = NUM_QUESTIONS, seed: int = 12) -> list[dict]:
    """Small additions and subtractions, four numeric choices, the answer's place shuffled."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        right = a + b if op == "+" else a - b
        wrong: set[int] = set()
        while len(wrong) < 3:
            candidate = right + rng.choice([-3, -2, -1, 1, 2, 3, 10, -10])
            if candidate >= 0 and candidate != right:
                wrong.add(candidate)
        choices = [right, *sorted(wrong)]
        rng.shuffle(choices)
        out.append({"question": f"What is {a} {op} {b}?", "choices": [str(c) for c in choices],
                    "answer": choices.index(right)})
    return out


def main() -> None:
    DATA.write_text("".join(json.dumps(q) + "\n" for q in questions()))
    print(f"wrote {NUM_QUESTIONS} questions to {DATA}")


if __name__ == "__main__":
    main()
