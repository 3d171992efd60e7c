"""Domain evaluation time: where it goes, and the one-prefill closed-question path against the plain one.

Same model (the embedded SmolLM2-135M-Instruct, fp32), same closed items (the first ``--pubmedqa`` PubMedQA and
``--medmcqa`` MedMCQA dev items under p_c), same batch size, in one process, variants interleaved over
``--rounds`` rounds (headline: median of per-round ratios; timings on a shared machine drift 20-40 %):

* ``generate``: the plain path for the paper's metric: ``model.generate`` (greedy, ``--new-tokens`` tokens).
* ``generate+ll``: the plain path for accuracy and option log-likelihood: ``generate``, then
  ``continuation_logprobs`` (options sharing one context pass), i.e. each prompt is prefilled twice.
* ``one_pass``: :func:`rega.eval.domain.closed_pass.closed_pass`: one prefill, options scored on a copy of the
  cache, greedy decoding continued on it (same answers and scores as ``generate+ll``).
* ``loglik``: options only (``closed_scoring: loglik``): one prefill and the options, nothing generated.
* ``prefill``: the prompts' forward pass alone (same batches): its share of ``generate`` is where the time goes.

It also checks exactness: the share of items whose greedy answer (token ids) and whose option ranking agree
between the plain and the one-pass path. Writes ``benchmarks/results/eval.json``; a run takes about 2 minutes.
One thread by default: on a shared 2-core machine two threads contend with other processes and timings scatter.

    .venv/bin/python benchmarks/bench_eval.py [--pubmedqa 6] [--medmcqa 12] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import repo_relative  # noqa: E402


def closed_items(chat, tokenizer, system: str, counts: dict[str, int]):
    """(contexts, options per context, gold option) of the first dev items of each task."""
    from rega.config import DataSource
    from rega.eval.domain.metrics import closed_spec
    from rega.eval.domain.scoring import choice_candidates, load_task_records
    from rega.eval.general.retention import continuation_text

    contexts, options, golds, lengths = [], [], [], {}
    for task, n in counts.items():
        data = load_task_records([DataSource(f"shared:{task}/dev.jsonl", domain="medical")], n)
        for rec in data.records:
            candidates, gold = choice_candidates(
                rec, closed_spec(rec, data.labels.get((rec.domain, rec.task)))
            )
            ctx = chat.encode_prompt(system, rec.user_text, rec.history)
            contexts.append(ctx)
            options.append(
                [
                    tokenizer(continuation_text(chat, system, rec.user_text, c), add_special_tokens=False)[
                        "input_ids"
                    ]
                    for c in candidates
                ]
            )
            golds.append(gold)
            lengths.setdefault(task, []).append(len(ctx))
    return contexts, options, golds, {t: sum(v) / len(v) for t, v in lengths.items()}


def variants(model, tokenizer, contexts, options, args):
    from rega.config import SamplingConfig
    from rega.eval.domain.closed_pass import closed_pass
    from rega.eval.general.retention import continuation_logprobs
    from rega.modules.generation import generate

    sampling = SamplingConfig(do_sample=False, temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens)
    pairs = [(c, o) for c, opts in zip(contexts, options) for o in opts]

    def plain_generate():
        gens = {
            g.index: g for g in generate(model, tokenizer, contexts, sampling, batch_size=args.batch_size)
        }
        return [gens[i].token_ids for i in range(len(contexts))], None

    def plain_both():
        answers, _ = plain_generate()
        flat = continuation_logprobs(model, tokenizer, pairs, args.batch_size)
        it = iter(flat)
        return answers, [[next(it) for _ in opts] for opts in options]

    def one_pass():
        gens, scores = closed_pass(model, tokenizer, contexts, options, args.new_tokens, args.batch_size)
        return [g.token_ids for g in gens], scores

    def loglik():
        return None, closed_pass(model, tokenizer, contexts, options, None, args.batch_size)[1]

    def prefill_only():  # where the time goes: the prompts' forward pass alone, same batches
        import torch

        from rega.modules.generation import left_padded, length_sorted_batches

        with torch.inference_mode():
            for batch in length_sorted_batches([len(c) for c in contexts], args.batch_size):
                ids, mask, pos = left_padded([contexts[i] for i in batch], tokenizer.pad_token_id)
                model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1, use_cache=False)
        return None, None

    return {"generate": plain_generate, "generate+ll": plain_both, "one_pass": one_pass, "loglik": loglik,
            "prefill": prefill_only}  # fmt: skip


def ranking(scores) -> list[int]:
    return [max(range(len(row)), key=lambda k: row[k][0] / max(1, row[k][1])) for row in scores]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pubmedqa", type=int, default=6)
    parser.add_argument("--medmcqa", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "eval.json"))
    return parser.parse_args(argv)


def time_rounds(runs: dict, rounds: int) -> tuple[dict, dict, dict]:
    """(wall seconds, CPU seconds, last output) of each variant, alternating order over ``rounds`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    outputs = {}
    for round_ in range(rounds):
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs[name] = runs[name]()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            print(
                f"round {round_} {name}: {times[name][-1]:.1f} s wall, {cpu[name][-1]:.1f} s CPU", flush=True
            )
    return times, cpu, outputs


def exactness(outputs: dict, items: int) -> dict:
    """How far the one-pass path agrees with the plain one: answers, option choices, log-probabilities."""
    plain_answers, plain_scores = outputs["generate+ll"]
    fast_answers, fast_scores = outputs["one_pass"]
    return {
        "greedy_answers_identical": sum(a == b for a, b in zip(plain_answers, fast_answers)) / items,
        "option_choice_identical": sum(a == b for a, b in zip(ranking(plain_scores), ranking(fast_scores)))
        / items,
        "loglik_only_choice_identical": sum(
            a == b for a, b in zip(ranking(plain_scores), ranking(outputs["loglik"][1]))
        )
        / items,
        "max_abs_logprob_diff": max(
            abs(a[0] - b[0]) for pa, pb in zip(plain_scores, fast_scores) for a, b in zip(pa, pb)
        ),
    }


def summary(args, lengths: dict, items: int, times: dict, cpu: dict, agree: dict) -> dict:
    import torch

    pairs = {"generate+ll / one_pass": ("generate+ll", "one_pass"), "generate / loglik": ("generate", "loglik"),
             "generate / one_pass": ("generate", "one_pass")}  # fmt: skip
    ratio = {k: [x / y for x, y in zip(times[a], times[b])] for k, (a, b) in pairs.items()}
    cpu_ratio = {k: [x / y for x, y in zip(cpu[a], cpu[b])] for k, (a, b) in pairs.items()}
    return {
        "items": {"pubmedqa": args.pubmedqa, "medmcqa": args.medmcqa},
        "mean_prompt_tokens": lengths,
        "settings": {**vars(args), "output": repo_relative(args.output)},
        "seconds": times,
        "cpu_seconds": cpu,
        "seconds_per_item_median": {k: statistics.median(v) / items for k, v in times.items()},
        "ratios": {k: statistics.median(v) for k, v in ratio.items()},
        "cpu_time_ratios": {k: statistics.median(v) for k, v in cpu_ratio.items()},
        "prefill_share_of_generate": statistics.median(
            [b / a for a, b in zip(cpu["generate"], cpu["prefill"])]
        ),
        "exactness": agree,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    import torch

    from rega.config import ModelConfig
    from rega.data.chat import ChatFormat
    from rega.model_source import load_tokenizer
    from rega.modules.model import load_model

    torch.set_num_threads(args.threads)
    config = ModelConfig()
    tokenizer = load_tokenizer(config)
    chat = ChatFormat(tokenizer, config.chat_template, config.system_placement)
    model = load_model(config).eval()
    contexts, options, golds, lengths = closed_items(
        chat, tokenizer, chat.default_system, {"pubmedqa": args.pubmedqa, "medmcqa": args.medmcqa}
    )
    times, cpu, outputs = time_rounds(variants(model, tokenizer, contexts, options, args), args.rounds)
    agree = exactness(outputs, len(contexts))
    result = summary(args, lengths, len(contexts), times, cpu, agree)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for name, value in result["ratios"].items():
        print(f"{name}: {value:.2f}x wall, {result['cpu_time_ratios'][name]:.2f}x CPU time")
    print(
        f"prefill share of generation (prefill / generate, CPU time): {result['prefill_share_of_generate']:.0%}"
    )
    print("exactness:", json.dumps(agree))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
