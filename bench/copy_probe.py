"""Can the tiny model learn to copy the report's names? A probe of why SFT of a random
4 M-parameter model reaches 0 % held-out execution success (docs/train.md).

    .venv/bin/python bench/copy_probe.py                      # after `remed train sft` made runs/sft-tiny/init
    .venv/bin/python bench/copy_probe.py --copy-minutes 0     # the same time as plain SFT only
    .venv/bin/python bench/copy_probe.py --induction-minutes 10 --copy-minutes 0 --sft-minutes 0 \
        --out bench/results/induction_probe.json

A playbook is a template chosen by fault kind plus names copied from the report (service,
host, unit, port). Trained as `remed train sft` does, the tiny model learns the templates
and never the copying. This probe trains a fresh model from the same init in up to three phases,
in this process (no Ray: it measures learning, not the trainer):

0. induction (--induction-minutes, off by default): the bare mechanism copying needs, on
   synthetic sequences: a prefix of random tokens, a random string s of 6-16 tokens, s
   again; loss on the repeat from its second token on (what only an induction mechanism
   predicts: ~0 once the model copies in order, ln 512 = 6.2 if it guesses among the 512
   tokens drawn, ~3.3 if it only knows "some token seen earlier"). Measured: the exact
   ordered copy of 200 unseen strings, greedy.
1. copy: short windows, the report's header (its first lines up to "Symptoms:", where it
   names the service, host, unit and port) followed by the answer's first
   --copy-answer-tokens tokens; loss on the answer part. Each window is ~100 tokens, so a
   step costs a fraction of an SFT step and thousands fit in minutes.
2. sft: whole examples (system prompt + report + inventory -> answer), loss on the answer,
   as the trainer does; the report's evidence as the benchmark writes it (--evidence full)
   or only its symptom lines (--evidence summary, half the prompt).

It then measures on examples whose names were never trained on (each trace's first renamed
copy, held back): in the copy format, whether greedy decoding names the service; in the
full format, whether it names the service and the host within its first 40 tokens, and the
teacher-forced answer token accuracy. Prints a table; writes bench/results/copy_probe.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/sft-tiny.yaml", help="its data section says which episodes")
    ap.add_argument("--model-dir", default="runs/sft-tiny/init", help="a tiny model's init (config + tokenizer)")
    ap.add_argument("--induction-minutes", type=float, default=0.0)
    ap.add_argument("--induction-lr", type=float, default=1e-3)
    ap.add_argument("--copy-minutes", type=float, default=5.0)
    ap.add_argument("--sft-minutes", type=float, default=10.0)
    ap.add_argument("--copy-answer-tokens", type=int, default=40)
    ap.add_argument("--copy-batch", type=int, default=16)
    ap.add_argument("--sft-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--evidence", choices=("full", "summary"), default="summary")
    ap.add_argument("--test", type=int, default=24, help="held-out examples measured")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/copy_probe.json")
    args = ap.parse_args()

    import torch
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from e2e_reme.train.data import DataConfig, build_sft_data, inventory_hosts
    from e2e_reme.train.errors import TrainError
    from e2e_reme.train.format import build_messages, encode_example
    from e2e_reme.train.sft import bf16_supported

    console = Console()
    torch.set_num_threads(args.threads)
    if not Path(args.model_dir, "tokenizer.json").is_file():
        sys.exit(f"{args.model_dir}: no tokenizer; run `remed train sft --config {args.config}` (or "
                 f"`remed model init`) first, or pass --model-dir")
    examples_needed = args.copy_minutes > 0 or args.sft_minutes > 0
    if examples_needed:
        if not Path(args.config).is_file():
            sys.exit(f"{args.config}: no such config; pass --config (its data section says which episodes)")
        cfg = yaml.safe_load(Path(args.config).read_text()) or {}
        try:
            with console.status("building the SFT examples"):
                data = build_sft_data(DataConfig.from_dict(cfg.get("data") or {}))
        except TrainError as e:
            sys.exit(f"{args.config}: {e}")
    tok = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)

    def messages(e):
        rep = dict(e.report)
        if args.evidence == "summary":
            rep["evidence"] = {k: v for k, v in (rep.get("evidence") or {}).items() if k == "symptoms"}
        return build_messages(rep, inventory_hosts(rep), mode="solo")

    def encode(e):
        """(the whole example, the report's header as copy-window ids, the answer's first ids)"""
        msgs = messages(e)
        user = msgs[1]["content"]
        head = tok(user[:user.find("Symptoms:")] if "Symptoms:" in user else user, add_special_tokens=False)
        return (encode_example(tok, msgs, e.answer, e.meta), head["input_ids"],
                tok(e.answer, add_special_tokens=False)["input_ids"][:args.copy_answer_tokens])

    full, short, tests = [], [], []
    if examples_needed:     # the induction phase alone needs only the tokenizer
        train = [e for e in data.train if e.meta.get("copy", 0) != 1]
        test = [e for e in data.train if e.meta.get("copy", 0) == 1]
        random.Random(args.seed).shuffle(test)
        test = test[:args.test]
        with console.status("tokenising"):
            encoded = [encode(e) for e in train]
            full = [x for x, _, _ in encoded]
            short = [(h, a) for _, h, a in encoded]
            tests = [(x, h, e) for e, (x, h, _) in ((e, encode(e)) for e in test)]

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_dir, local_files_only=True))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(args.seed)
    bf16 = bf16_supported("cpu")

    def step(seqs: list[tuple[list[int], int]], lr: float) -> float:
        n, L = len(seqs), max(len(s) for s, _ in seqs)
        ids = torch.zeros((n, L), dtype=torch.long)
        att = torch.zeros((n, L), dtype=torch.long)
        lab = torch.full((n, L), -100)
        for i, (s, k) in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            att[i, :len(s)] = 1
            lab[i, k:len(s)] = torch.tensor(s[k:])
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return loss.item()

    def phase(name: str, minutes: float, batch, lr_steps: int, lr: float | None = None) -> dict:
        lr = lr or args.lr
        t0, n, losses = time.monotonic(), 0, []
        with console.status(f"{name}: {minutes:g} min") as st:
            while time.monotonic() - t0 < minutes * 60:
                cos = 0.5 * (1 + math.cos(math.pi * min(1.0, n / lr_steps)))
                losses.append(step(batch(), lr * min(1.0, (n + 1) / 30) * (0.2 + 0.8 * cos)))
                n += 1
                st.update(f"{name}: step {n}, loss {statistics.mean(losses[-20:]):.4f}")
        return {"steps": n, "seconds": round(time.monotonic() - t0, 1),
                "final_loss": round(statistics.mean(losses[-20:]), 5) if losses else None}

    def service(e) -> str:
        return e.meta["rewrite"]["names"].get(e.meta["service"], e.meta["service"])

    def measure() -> dict:
        model.eval()
        copy_ok = name_ok = host_ok = 0
        acc = []
        with torch.no_grad(), console.status("measuring") as st:
            for i, (enc, h, e) in enumerate(tests):
                st.update(f"measuring: held-out example {i + 1}/{len(tests)}")
                out = model.generate(torch.tensor([h]), max_new_tokens=30, do_sample=False)
                copy_ok += service(e) in tok.decode(out[0, len(h):])
                ids = torch.tensor([enc.input_ids])
                pred = model(ids).logits[0, enc.prompt_len - 1:-1].argmax(-1)
                acc.append((pred == ids[0, enc.prompt_len:]).float().mean().item())
                out = model.generate(ids[:, :enc.prompt_len], max_new_tokens=40, do_sample=False)
                text = tok.decode(out[0, enc.prompt_len:])
                name_ok += service(e) in text
                host_ok += f"hosts: {e.report['target']['node']}\n" in text
        model.train()
        n = len(tests)
        return {"copy_format_names_service": f"{copy_ok}/{n}", "full_format_names_service": f"{name_ok}/{n}",
                "full_format_host_right": f"{host_ok}/{n}",
                "answer_token_accuracy": round(statistics.mean(acc), 3) if acc else None}

    # Random tokens from the middle of the vocabulary: no special token, none the copy
    # windows above favour. The measured strings come from their own generator.
    pool = range(len(tok) // 4, len(tok) // 4 + 512)

    def random_strings(r: random.Random, n: int) -> list[tuple[list[int], list[int]]]:
        return [([r.choice(pool) for _ in range(r.randint(0, 20))], [r.choice(pool) for _ in range(r.randint(6, 16))])
                for _ in range(n)]

    def induction_batch() -> list[tuple[list[int], int]]:
        return [(pre + s + s, len(pre) + len(s) + 1) for pre, s in random_strings(rng, 32)]

    induction_tests = random_strings(random.Random(args.seed + 1), 200)

    def measure_induction() -> dict:
        model.eval()
        exact = 0
        with torch.no_grad(), console.status("measuring") as st:
            for i, (pre, s) in enumerate(induction_tests):
                st.update(f"measuring: unseen string {i + 1}/{len(induction_tests)}")
                ctx = pre + s + s[:1]
                out = model.generate(torch.tensor([ctx]), max_new_tokens=len(s) - 1, do_sample=False)
                exact += out[0, len(ctx):].tolist() == s[1:]
        model.train()
        return {"ordered_copy_exact": f"{exact}/{len(induction_tests)}"}

    result = {"args": vars(args), "examples": len(full), "held_out": len(tests)}
    if full:
        result["median_tokens"] = {"full": statistics.median(len(x.input_ids) for x in full),
                                   "copy_window": statistics.median(len(h) + len(a) for h, a in short)}
    model.train()
    if args.induction_minutes > 0:
        result["induction"] = phase("induction", args.induction_minutes, induction_batch, 5000,
                                    args.induction_lr)
        result["after_induction"] = measure_induction()
    if args.copy_minutes > 0:
        result["copy"] = phase("copy", args.copy_minutes,
                               lambda: [(h + a, len(h)) for h, a in (short[rng.randrange(len(short))]
                                                                     for _ in range(args.copy_batch))], 1500)
        result["after_copy"] = measure()
    if args.sft_minutes > 0:
        result["sft"] = phase("sft", args.sft_minutes,
                              lambda: [(x.input_ids, x.prompt_len) for x in (full[rng.randrange(len(full))]
                                                                             for _ in range(args.sft_batch))], 200)
        result["after_sft"] = measure()
    result["loadavg"] = os.getloadavg()

    table = Table(title=f"copy probe: {len(tests)} held-out examples (unseen names)")
    for c in ("after", "steps", "s", "loss", "copy fmt: service", "full: service", "full: host", "token acc"):
        table.add_column(c)
    for ph in ("copy", "sft"):
        if ph in result:
            m = result[f"after_{ph}"]
            table.add_row(ph, str(result[ph]["steps"]), str(result[ph]["seconds"]), str(result[ph]["final_loss"]),
                          m["copy_format_names_service"], m["full_format_names_service"],
                          m["full_format_host_right"], str(m["answer_token_accuracy"]))
    if any(f"after_{ph}" in result for ph in ("copy", "sft")):
        console.print(table)
    if "induction" in result:
        r = result["induction"]
        console.print(f"induction: {r['steps']} steps in {r['seconds']} s, final loss {r['final_loss']} "
                      f"(ordered copy: ~0; none: 6.2), unseen strings copied exactly: "
                      f"{result['after_induction']['ordered_copy_exact']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
