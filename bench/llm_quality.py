"""Answer quality of the `local` LLM: keyword pass rate on 20 everyday questions, and speed.

Loads the model once in the real worker process (bundled SmolLM2, or a downloaded model with
--model-dir) and asks every question of tests/data/llm_questions.json under each config:
decoding (greedy or sampled, repetition penalty, no-repeat n-grams), prompt (system prompt,
few-shot examples) and answer caps. An answer passes when it contains one of the question's
keywords (whole words, any case); "pass@2" counts only its first two sentences, the part a
listener hears before losing patience. Sampled configs run once per seed. Also printed:
tokens/s while generating, and first-token latency (request sent -> first text delta).

    .venv/bin/python bench/llm_quality.py                    # every config
    .venv/bin/python bench/llm_quality.py --configs today tuned --show
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpuserver.config import LLMSettings
from gpuserver.llm import local
from gpuserver.llm.base import ChatMessage
from gpuserver.llm.local import Answer, AnswerStats, Decoding
from gpuserver.process_worker import ProcessWorker
from gpuserver.text_chunker import split_text

QUESTIONS = Path(__file__).resolve().parent.parent / "tests" / "data" / "llm_questions.json"
TODAY_PROMPT = LLMSettings().system_prompt
SHORT_PROMPT = "Answer in one short sentence."
EXAMPLES = (
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels."),
)
SEEDS = (0, 1)


@dataclass(frozen=True)
class Config:
    decoding: Decoding
    system: str = TODAY_PROMPT  # "" = no system message
    examples: tuple[tuple[str, str], ...] = ()
    small_model_prompt: bool = False  # shaped as LocalLLM shapes it for the bundled model

    def messages(self, question: str) -> tuple[ChatMessage, ...]:
        messages = [ChatMessage(role="system", content=self.system)] if self.system else []
        for asked, answered in self.examples:
            messages.append(ChatMessage(role="user", content=asked))
            messages.append(ChatMessage(role="assistant", content=answered))
        messages.append(ChatMessage(role="user", content=question))
        return local.for_small_model(messages) if self.small_model_prompt else tuple(messages)


CAPPED = Decoding(max_tokens=160, max_sentences=2)
CONFIGS: dict[str, Config] = {
    # The seed's settings: sampled, penalised repeats, persona prompt, no sentence cap.
    "today": Config(
        Decoding(max_tokens=160, max_sentences=0, temperature=0.7, repetition_penalty=1.15)
    ),
    "greedy": Config(CAPPED),
    "greedy-rep1.15": Config(replace(CAPPED, repetition_penalty=1.15)),
    "greedy-rep1.05": Config(replace(CAPPED, repetition_penalty=1.05)),
    "greedy-ngram3": Config(replace(CAPPED, no_repeat_ngram_size=3)),
    "t0.3-k40-p0.9": Config(replace(CAPPED, temperature=0.3, top_k=40, top_p=0.9)),
    "t0.5-k20-rep1.05": Config(replace(CAPPED, temperature=0.5, top_k=20, repetition_penalty=1.05)),
    "greedy-short-prompt": Config(CAPPED, SHORT_PROMPT),
    "greedy-no-prompt": Config(CAPPED, ""),
    "greedy-few-shot": Config(CAPPED, local.SMALL_MODEL_PROMPT, EXAMPLES),
    "greedy-1-sentence": Config(replace(CAPPED, max_sentences=1)),
    # What LocalLLM does with the bundled model: its default decoding and prompt shaping.
    "tuned": Config(local.Decoding(), small_model_prompt=True),
}


@dataclass
class Result:
    question: str
    answer: str
    passed: bool
    passed_in_two: bool
    first_token_s: float
    stats: AnswerStats


def contains_keyword(text: str, keywords: list[str]) -> bool:
    lowered = text.lower()
    return any(re.search(rf"\b{re.escape(keyword)}\b", lowered) for keyword in keywords)


async def ask(worker: ProcessWorker, config: Config, question: dict, seed: int) -> Result:
    request = Answer(config.messages(question["question"]), replace(config.decoding, seed=seed))
    sent = time.monotonic()
    first: float | None = None
    parts: list[str] = []
    stats: AnswerStats | None = None
    async for item in worker.submit(request):
        if isinstance(item, AnswerStats):
            stats = item
        else:
            first = first or time.monotonic() - sent
            parts.append(item)
    assert stats is not None
    text = "".join(parts).strip()
    first_two = "".join(split_text(text)[:2])
    keywords = question["keywords"]
    return Result(
        question["question"],
        text,
        contains_keyword(text, keywords),
        contains_keyword(first_two, keywords),
        first if first is not None else float("nan"),
        stats,
    )


def summary(name: str, results: list[Result]) -> str:
    passed = sum(r.passed for r in results)
    in_two = sum(r.passed_in_two for r in results)
    tokens = sum(r.stats.tokens for r in results)
    seconds = sum(r.stats.seconds for r in results)
    first = [r.first_token_s * 1000 for r in results if r.first_token_s == r.first_token_s]
    words = np.mean([len(r.answer.split()) for r in results])
    return (
        f"{name:<20} {passed:>2}/{len(results):<3} {100 * passed / len(results):>5.0f}% "
        f"{in_two:>4}/{len(results):<3} {tokens / seconds:>8.1f} "
        f"{np.percentile(first, 50):>7.0f} {np.percentile(first, 95):>7.0f} {words:>6.1f}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--model-dir", type=Path, help="a downloaded model (default: bundled)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the worker")
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument("--show", action="store_true", help="print every answer")
    args = parser.parse_args()
    questions = json.loads(QUESTIONS.read_text())[: args.limit]
    source = local.find_model(args.model_dir)
    worker = ProcessWorker(
        local.service_factory(source, args.threads), name="llm-bench", niceness=0
    )
    started = time.monotonic()
    await worker.wait_ready()
    print(
        f"{source.name}: loaded in {time.monotonic() - started:.1f} s; {os.cpu_count()} cores, "
        f"{args.threads} torch thread(s); {len(questions)} questions; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'config':<20} {'pass':>10} {'pass@2':>8} {'tok/s':>8} "
        f"{'1st p50':>7} {'p95 ms':>7} {'words':>6}"
    )
    try:
        for name in args.configs:
            config = CONFIGS[name]
            seeds = SEEDS if config.decoding.temperature > 0 else (0,)
            results = [
                await ask(worker, config, question, seed)
                for seed in seeds
                for question in questions
            ]
            if args.show:
                for r in results:
                    mark = "ok " if r.passed else "BAD"
                    print(f"  {mark} {r.question} -> {r.answer!r} ({r.stats.ended_by})")
            print(summary(name, results), flush=True)
    finally:
        await worker.aclose()


if __name__ == "__main__":
    asyncio.run(main())
