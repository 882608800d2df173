"""Greedy answers of the eval matrix: every model one at a time (`model.generate` per model, as `loraplex eval` did
before) vs shared mixed-adapter continuous batches (`lm.decoding.greedy_answers`, what it does now), on a run.

    python benchmarks/eval_speed.py runs/demo [--max-new-tokens 24] [--batch-size 40] [--examples 30] [--dtype auto]

Three paths: `model.generate` per model, continuous batches of one model at a time (`mixed=False`), and
shared mixed-adapter continuous batches. Each model answers the test splits the demo asks of it: the base every
dataset's, each adapter its own. Prints the CPU features, seconds per path, the ratio to `model.generate` and how
many answers differ from it (0 expected in float32; in bfloat16 a row's logits depend on its batch, so near-ties
may flip). Loads the run's base once with every adapter.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch


def cpu_features() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return " ".join(sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|avx2)\b", text)))) or "none of avx2/avx512_bf16/amx"


@torch.no_grad()
def one_at_a_time(model, tokenizer, prompts: list[str], max_new: int, batch_size: int, eos: set[int]) -> list[str]:
    """`loraplex eval`'s former path: `model.generate` on left-padded batches of one model's prompts."""
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(**enc, max_new_tokens=max_new, do_sample=False, num_beams=1, eos_token_id=sorted(eos),
                             pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
        answers += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run folder with trained adapters (runs/demo)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--examples", type=int, default=30, help="test rows per dataset")
    parser.add_argument("--dtype", default=None, help="override the run's model.dtype (float32, bfloat16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from loraplex.adapters import load
    from loraplex.data.render import chat_template_for, end_of_turn_ids
    from loraplex.device import pick_dtype
    from loraplex.evaluation import load_test_split
    from loraplex.lm.decoding import GreedyJob, Target, complete_text, greedy_answers
    from loraplex.models import stop_token_ids
    from loraplex.run import adapter_dir, complete_adapters, open_run

    ws = open_run(args.run)
    names = complete_adapters(Path(args.run))
    dtype = pick_dtype(args.dtype) if args.dtype else ws.dtype
    adapters = load(ws.base, {n: adapter_dir(Path(args.run), n) for n in names}, dtype=dtype)
    model, tokenizer = adapters.model.eval(), adapters.tokenizer
    eos = stop_token_ids(model, tokenizer) | set().union(
        *(end_of_turn_ids(tokenizer, chat_template_for(tokenizer, s.template)) for s in ws.recipe.datasets))
    tests = {s.name: load_test_split(s, ws.recipe, tokenizer, args.examples).prompts
             for s in ws.recipe.datasets if s.test_path}
    unique = {tuple(p): name for name, p in tests.items()}  # the base answers each distinct split once
    work = [(None, name) for name in unique.values()] + [(n, n) for n in names if n in tests]
    print(f"cpu: {cpu_features()}; dtype {str(dtype).removeprefix('torch.')}; threads {torch.get_num_threads()}; "
          f"{len(work)} (model, test split) pairs, {sum(len(tests[t]) for _, t in work)} prompts")
    started = time.perf_counter()
    before = {}
    for adapter, test in work:
        adapters.use(adapter)
        before[adapter, test] = one_at_a_time(model, tokenizer, tests[test], args.max_new_tokens, args.batch_size, eos)
    alone_s = time.perf_counter() - started
    def jobs(pairs):
        return [GreedyJob(Target(str(adapter), adapter), tokenizer(p, add_special_tokens=False)["input_ids"],
                          args.max_new_tokens) for adapter, test in pairs for p in tests[test]]

    started = time.perf_counter()
    continuous = {}
    for adapter, test in work:  # continuous batches, one model at a time
        adapters.use(adapter)
        continuous[adapter, test] = greedy_answers(model, tokenizer, jobs([(adapter, test)]), eos, args.batch_size,
                                                   mixed=False)
    continuous_s = time.perf_counter() - started
    adapters.use(names[0])
    started = time.perf_counter()
    texts = iter(greedy_answers(model, tokenizer, jobs(work), eos, args.batch_size, mixed=True))
    shared_s = time.perf_counter() - started
    after = {key: [next(texts) for _ in tests[key[1]]] for key in work}
    total = sum(len(tests[test]) for _, test in work)
    for label, seconds, answers in (("continuous batches, one model at a time", continuous_s, continuous),
                                    ("shared mixed-adapter continuous batches", shared_s, after)):
        differ = sum(complete_text(a).strip() != b for key in work for a, b in zip(before[key], answers[key]))
        print(f"{label}: {seconds:.1f} s, {alone_s / max(seconds, 1e-9):.2f}x the speed of model.generate one model "
              f"at a time ({alone_s:.1f} s); answers that differ: {differ} of {total}")


if __name__ == "__main__":
    main()
