"""Training and generation throughput of the policy model, and its peak memory.

    .venv/bin/python bench/train.py                          # CPU: the tiny model; GPU: also a 0.5B Qwen2
    .venv/bin/python bench/train.py --steps 8 --seq-len 2500 --out bench/results
    .venv/bin/python bench/train.py --model runs/models/gemma3-270m --threads 2 --skip-tiny

With --model DIR (a local HF directory, e.g. the Gemma 3 270M of `remed model import`):
one LoRA SFT step as the trainer does it (r 16 on every projection, fp32, SDPA attention,
logits and loss only on the answer) on a typical example: the benchmark's compact prompt
for a recorded report of tests/data/train-episodes.jsonl and the expert runbook's answer,
tokenised by the model's own tokenizer; then greedy generation tokens/s through the rollout
engine (adapters merged, i.e. a plain model): one completion as evaluation runs it, and a
group of 8 completions of the prompt as RL samples them (the prompt run once).

CPU (always): the tiny model of configs/model-tiny.yaml (random init; the tokenizer does not
matter for speed, so the vocabulary is set to its configured size), one SFT step as the
trainer does it (one sequence of --seq-len tokens, the loss on the last --answer-len,
logits only there), at 1 and 2 threads, fp32 and bf16 autocast (where the CPU has native
bf16). Then `generate` tokens/s (greedy, --gen-tokens new tokens after a --seq-len prompt).
Each configuration runs in a subprocess of its own, so its peak RSS is its own.

GPU (where torch sees one): the same on a random-initialised Qwen2 of the 0.5B shape
(hidden 896, 24 layers, vocab 151936) in bf16: training tokens/s and peak allocated
memory, and `generate` tokens/s at batch 1 and 8. Where there is no GPU the JSON says so,
with the reason; no GPU number is ever estimated.

How torch's OpenMP threads wait (`--omp-wait passive,spin`, side by side in one run):
`passive` (OMP_WAIT_POLICY=PASSIVE, what `remed` and the tests set: e2e_reme.host) or
`spin` (libgomp's default, busy-waiting before sleeping) or `spin:N` (GOMP_SPINCOUNT=N: spin
N times, then sleep). `--busy N` keeps N CPU-bound
processes running through the measurement, as a fault's stress workers or other
sandboxes do while an episode generates.

Prints a table and writes JSON (bench/results/train.json). Timings on a shared machine are
noisy: the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True)


def tiny_shape() -> dict:
    import yaml
    c = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "model-tiny.yaml").read_text())
    return dict(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"],
                num_key_value_heads=c["num_kv_heads"], vocab_size=c["tokenizer"]["vocab_size"],
                max_position_embeddings=c["max_position_embeddings"], tie_word_embeddings=c["tie_word_embeddings"])


# ---- one measurement, in a subprocess ---------------------------------------------------------------

def typical_example(tokenizer, index: int = 1) -> dict:
    """A recorded verified episode as SFT sees it: compact prompt ids + the runbook's answer."""
    from e2e_reme.train.data import inventory_hosts
    from e2e_reme.train.format import answer_text, build_messages, encode_example
    path = Path(__file__).resolve().parents[1] / "tests" / "data" / "train-episodes.jsonl"
    rec = json.loads(path.read_text().splitlines()[index])
    rep = rec["report"]
    enc = encode_example(tokenizer, build_messages(rep, inventory_hosts(rep)), answer_text(rec["playbook"]))
    return {"input_ids": enc.input_ids, "prompt_len": enc.prompt_len, "fault": rep.get("fault_kind"),
            "system": rep.get("system")}


def prompt_lengths(model_dir: str) -> dict:
    """Prompt and answer tokens (the model's tokenizer) of the benchmark's compact prompt for
    the recorded reports of tests/data and for the per-fault-type cases of
    tests/test_train_format.py, with the runbook's answer."""
    from transformers import AutoTokenizer

    from e2e_reme.simulators.policies.expert import expert_playbook
    from e2e_reme.train.format import answer_text, build_messages, encode_example
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    import test_train_format as cases
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    rows = []
    for i in range(len((root / "tests" / "data" / "train-episodes.jsonl").read_text().splitlines())):
        ex = typical_example(tok, i)
        rows.append({"case": f"recorded {ex['system']}/{ex['fault']}", "prompt": ex["prompt_len"],
                     "answer": len(ex["input_ids"]) - ex["prompt_len"]})
    for name, rep in sorted(cases.CASES.items()):
        enc = encode_example(tok, build_messages(rep, sorted(rep.placement)), answer_text(expert_playbook(rep.runbook_input())))
        rows.append({"case": name, "prompt": enc.prompt_len, "answer": enc.answer_len})
    from e2e_reme.train.format import prompt_ids, system_prompt
    system = len(prompt_ids(tok, [{"role": "system", "content": system_prompt(["n0", "n1"])}]))
    return {"rows": rows, "system_prompt": system,
            "prompt_range": [min(r["prompt"] for r in rows), max(r["prompt"] for r in rows)],
            "answer_range": [min(r["answer"] for r in rows), max(r["answer"] for r in rows)]}


def measure_pretrained(spec: dict) -> dict:
    """One configuration on a real model directory (see the module docstring)."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    path = spec["model_dir"]
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    out = {**spec, "parameters": sum(p.numel() for p in model.parameters()),
           "vocab_size": model.config.vocab_size, "attention": model.config._attn_implementation}
    ex = typical_example(tok)
    ids = torch.tensor([ex["input_ids"]])
    A = len(ex["input_ids"]) - ex["prompt_len"]
    out.update(prompt_tokens=ex["prompt_len"], answer_tokens=A, example=f"{ex['system']}/{ex['fault']}")
    if spec["what"] == "train":
        from e2e_reme.train.sft import LoraConfig, with_lora
        model = with_lora(model, LoraConfig(top_layers=spec.get("lora_top_layers")))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        from e2e_reme.train.sft import answer_loss
        times, cpu = [], []
        for step in range(spec["steps"] + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            loss = answer_loss(model, ids, A) / A
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        times.sort()
        med = times[len(times) // 2]
        # CPU seconds (all threads): on a shared machine, what the step costs when it is not
        # waiting for a core; divided by the threads, the wall time on an idle machine at best.
        out.update(step_s=round(med, 2), step_cpu_s=round(sorted(cpu)[len(cpu) // 2], 2),
                   tokens_per_s=round(ids.shape[1] / med, 1), loss=round(loss.item(), 4))
    else:
        # As evaluation (batch 1) and RL (a group of `batch` completions of one prompt) run
        # it: the rollout engine, greedy, after the typical example's prompt.
        from e2e_reme.train.rollout import SamplingParams, TransformersEngine
        model.eval()
        engine = TransformersEngine(path, batch_size=spec["batch"])
        prompt = ex["input_ids"][:ex["prompt_len"]]
        with torch.no_grad():
            engine.generate([prompt[:32]], SamplingParams(max_tokens=4))
            # The prompt's forward pass alone (what generation does first), to tell it from decoding.
            t0 = time.perf_counter()
            engine.model(input_ids=torch.tensor([prompt]), logits_to_keep=1)
            prefill = time.perf_counter() - t0
        runs = []       # (wall, CPU) seconds of each timed call; the median is reported
        for _ in range(spec.get("repeats", 1)):
            t0, c0 = time.perf_counter(), time.process_time()
            (group,) = engine.generate([prompt], SamplingParams(max_tokens=spec["gen_tokens"], n=spec["batch"]))
            runs.append((time.perf_counter() - t0, time.process_time() - c0))
        dt, dc = sorted(runs)[len(runs) // 2]
        new = sum(len(c.completion_ids) for c in group)
        out.update(seconds=round(dt, 2), cpu_seconds=round(dc, 2), new_tokens=new, tokens_per_s=round(new / dt, 1),
                   prefill_s=round(prefill, 2), decode_tokens_per_s=round(new / max(1e-6, dt - prefill), 1),
                   all_seconds=[round(w, 2) for w, _ in runs])
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def measure(spec: dict) -> dict:
    import resource

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    device = spec["device"]
    if device == "cpu":
        torch.set_num_threads(spec["threads"])
    model = Qwen2ForCausalLM(Qwen2Config(**spec["shape"])).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    T, A = spec["seq_len"], spec["answer_len"]
    vocab = spec["shape"]["vocab_size"]
    out = {**{k: v for k, v in spec.items() if k != "shape"}, "parameters": n_params}
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if spec["what"] == "train":
        bf16 = spec["precision"] == "bf16"
        if device == "cuda" and bf16:
            model = model.to(torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, vocab, (spec["batch"], T), device=device)
        times = []
        for step in range(spec["steps"] + 1):
            t0 = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16 and device == "cpu"):
                logits = model(input_ids=ids, logits_to_keep=A + 1).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), ids[:, -A:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if step:                       # the first step warms up kernels and allocators
                times.append(time.perf_counter() - t0)
        times.sort()
        med = times[len(times) // 2]
        out.update(step_s=round(med, 3), tokens_per_s=round(spec["batch"] * T / med, 1))
    else:
        model.eval()
        ids = torch.randint(0, vocab, (spec["batch"], T), device=device)
        if device == "cuda":
            model = model.to(torch.bfloat16)
        kw = dict(max_new_tokens=spec["gen_tokens"], min_new_tokens=spec["gen_tokens"], do_sample=False,
                  pad_token_id=0)
        with torch.no_grad():
            model.generate(input_ids=ids[:, :64], max_new_tokens=4, do_sample=False, pad_token_id=0)
            sync()
            t0 = time.perf_counter()
            res = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
            sync()
        dt = time.perf_counter() - t0
        new = (res.shape[1] - T) * spec["batch"]
        out.update(seconds=round(dt, 2), new_tokens=new, tokens_per_s=round(new / dt, 1))
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if device == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return out


def run_one(spec: dict, timeout: float = 1800) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.get("threads", 1)))
    env.pop("OMP_WAIT_POLICY", None)           # spin: libgomp's default
    env.pop("GOMP_SPINCOUNT", None)
    wait = spec.get("omp_wait", "passive")
    if wait == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif wait.startswith("spin:"):             # spin this many times, then sleep
        env["GOMP_SPINCOUNT"] = wait.split(":", 1)[1]
    res = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                         timeout=timeout, env=env)
    if res.returncode != 0:
        return {**{k: v for k, v in spec.items() if k != "shape"}, "error": res.stderr.strip().splitlines()[-1:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def gpu_info() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, f"no CUDA GPU on this machine (torch {torch.__version__}, CUDA build: {torch.version.cuda})"
    return True, torch.cuda.get_device_name(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per configuration")
    ap.add_argument("--seq-len", type=int, default=2500, help="tokens per sequence (our prompts are 1.5-3.5 k)")
    ap.add_argument("--answer-len", type=int, default=400, help="answer tokens (the loss positions)")
    ap.add_argument("--gen-tokens", type=int, default=256, help="new tokens per generate() call")
    ap.add_argument("--threads", default="1,2", help="CPU thread counts to measure")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--model", action="append", help="a local model directory (repeatable) to measure as the trainer and evaluation use it "
                                    "(e.g. runs/models/gemma3-270m from `remed model import`)")
    ap.add_argument("--model-steps", type=int, default=3, help="timed SFT steps on --model")
    ap.add_argument("--lora-top-layers", type=int, action="append",
                    help="also measure the SFT step with adapters only in the last N layers (repeatable)")
    ap.add_argument("--model-gen-tokens", type=int, default=128, help="new tokens per generate() call on --model")
    ap.add_argument("--gen-repeats", type=int, default=3, help="timed generate() calls per configuration on --model (the median is reported)")
    ap.add_argument("--skip-tiny", action="store_true", help="measure only --model")
    ap.add_argument("--generate-only", action="store_true", help="no SFT step rows for --model")
    ap.add_argument("--omp-wait", default="passive", help="OpenMP wait policies to compare: passive, spin, spin:N (comma list)")
    ap.add_argument("--busy", type=int, default=0, help="CPU-bound processes kept running through the measurement")
    ap.add_argument("--lengths", metavar="DIR", help="print the compact prompt's and the runbook answer's token "
                                                     "counts per case with DIR's tokenizer, and exit")
    args = ap.parse_args()
    if args.lengths:
        r = prompt_lengths(args.lengths)
        for row in r["rows"]:
            print(f"{row['case']:40s} prompt {row['prompt']:5d}  answer {row['answer']:5d}")
        print(f"prompt tokens {r['prompt_range']} (the system prompt alone: {r['system_prompt']}), "
              f"answer tokens {r['answer_range']}")
        return
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(measure_pretrained(spec) if spec.get("model_dir") else measure(spec)))
        return


    console = Console(width=None if sys.stdout.isatty() else 160)
    if args.gen_repeats < 1:
        ap.error(f"--gen-repeats {args.gen_repeats}: time at least one generate() call")
    waits = [w.strip() for w in args.omp_wait.split(",")]
    if any(w not in ("passive", "spin") and not (w.startswith("spin:") and w[5:].isdigit()) for w in waits):
        ap.error(f"--omp-wait {args.omp_wait}: use passive, spin or spin:N (a comma list)")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        results, rows = measure_all(args, console, waits)
    finally:
        for b in busy:
            b.kill()
            b.wait()
    print_results(args, console, results, rows)


def _vs_spin(row: dict, rows: list[dict]) -> str:
    """tokens/s of a row over the same measurement with libgomp's default spin-waiting."""
    if row.get("omp_wait") == "spin":
        return "-"
    same = ("what", "model", "threads", "batch", "precision")
    spin = [r for r in rows if r.get("omp_wait") == "spin" and "error" not in r
            and all(r.get(k) == row.get(k) for k in same)]
    return f"{row['tokens_per_s'] / spin[0]['tokens_per_s']:.2f}x" if spin and spin[0]["tokens_per_s"] else "-"


def measure_all(args, console, waits: list[str]) -> tuple[dict, list[dict]]:
    from e2e_reme.train.sft import bf16_supported
    load0 = os.getloadavg()
    common = dict(seq_len=args.seq_len, answer_len=args.answer_len, steps=args.steps, gen_tokens=args.gen_tokens)
    rows = []
    tiny = tiny_shape()
    precisions = ["fp32"] + (["bf16"] if bf16_supported("cpu") else [])
    for threads, model_dir, wait in [(int(t), m, w) for t in args.threads.split(",") for m in args.model or []
                                     for w in waits]:
        name = Path(model_dir).name
        base = dict(device="cpu", threads=threads, precision="fp32", model=name, omp_wait=wait, busy=args.busy,
                    model_dir=str(Path(model_dir).resolve()), steps=args.model_steps, gen_tokens=args.model_gen_tokens,
                    repeats=args.gen_repeats)
        for top in [None] + (args.lora_top_layers or []) if not args.generate_only else []:
            console.log(f"cpu LoRA SFT step, {name}, {threads} thread(s), OpenMP {wait}"
                        + (f", adapters in the last {top} layers" if top else ""))
            rows.append(run_one(dict(base, what="train", batch=1, lora_top_layers=top,
                                     model=name + (f" lora-top{top}" if top else ""))))
        for batch in (1, 8):
            console.log(f"cpu generate, {name}, {threads} thread(s), batch {batch}, OpenMP {wait}")
            rows.append(run_one(dict(base, what="generate", batch=batch)))
    for threads in [int(t) for t in args.threads.split(",")] if not args.skip_tiny else []:
        for prec in precisions:
            spec = dict(common, what="train", device="cpu", threads=threads, precision=prec, batch=1,
                        model="tiny", shape=tiny, omp_wait=waits[0], busy=args.busy)
            console.log(f"cpu train, tiny, {threads} thread(s), {prec}")
            rows.append(run_one(spec))
        spec = dict(common, what="generate", device="cpu", threads=threads, precision="fp32", batch=1,
                    model="tiny", shape=tiny, omp_wait=waits[0], busy=args.busy)
        console.log(f"cpu generate, tiny, {threads} thread(s)")
        rows.append(run_one(spec))

    has_gpu, gpu = gpu_info()
    gpu_section: dict = {"available": has_gpu}
    if has_gpu:
        gpu_section["device"] = gpu
        for what, batch in (("train", 1), ("train", 4), ("generate", 1), ("generate", 8)):
            spec = dict(common, what=what, device="cuda", threads=1, precision="bf16", batch=batch,
                        model="qwen2-0.5b-random", shape=QWEN2_05B)
            console.log(f"gpu {what}, 0.5B, batch {batch}")
            rows.append(run_one(spec))
    else:
        gpu_section["reason"] = gpu
        console.log(f"[yellow]no GPU measurements[/]: {gpu}")

    results = {"bench": "train", "host": platform.node(), "cpu": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "cpu_bf16": bf16_supported("cpu"), "loadavg_before": load0, "loadavg_after": os.getloadavg(),
               "args": vars(args), "gpu": gpu_section, "rows": rows}
    return results, rows


def print_results(args, console, results: dict, rows: list[dict]) -> None:
    load0 = results["loadavg_before"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "train.json"
    path.write_text(json.dumps(results, indent=2))

    t = Table(title=f"policy model throughput (seq {args.seq_len} tokens, loss on {args.answer_len}; "
                    f"load avg {load0[0]:.1f} -> {results['loadavg_after'][0]:.1f}; {args.busy} busy process(es))")
    for c in ("what", "model", "params", "device", "threads", "OpenMP wait", "precision", "batch", "tokens/s",
              "vs spin", "step s", "CPU s", "prefill s", "decode tok/s", "peak RSS MiB", "peak GPU MiB"):
        t.add_column(c, justify="left" if c in ("what", "model", "device", "precision", "OpenMP wait") else "right")
    for r in rows:
        wait = r.get("omp_wait", "-") if r["device"] == "cpu" else "-"
        if "error" in r:
            t.add_row(r["what"], r["model"], "-", r["device"], str(r.get("threads")), wait, r["precision"],
                      str(r["batch"]), f"[red]{r['error']}[/]", *[""] * 7)
            continue
        t.add_row(r["what"], r["model"], f"{r['parameters'] / 1e6:.1f} M", r["device"], str(r["threads"]), wait,
                  r["precision"], str(r["batch"]), f"{r['tokens_per_s']:.1f}", _vs_spin(r, rows),
                  str(r.get("step_s", "-")), str(r.get("step_cpu_s", r.get("cpu_seconds", "-"))),
                  str(r.get("prefill_s", "-")), str(r.get("decode_tokens_per_s", "-")), f"{r['peak_rss_mib']:.0f}",
                  str(r.get("peak_gpu_mib", "-")))
    console.print(t)
    if not results["gpu"]["available"]:
        console.print(f"GPU: not measured ({results['gpu']['reason']})")
    console.print(f"results: {path}")


if __name__ == "__main__":
    main()
