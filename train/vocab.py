"""A trimmed vocabulary: the same model with only the tokens our texts and English need.

Gemma 3's vocabulary has 262 144 tokens, most of them for other scripts; its language-model
head (tied to the embeddings, 168 M of the 268 M parameters) then costs about as much per
generated token as the whole transformer body, and it dominates the bytes read per token
at batch 1, which is what bounds CPU generation. We keep:

- the special tokens (minus the thousands of `<unusedN>`) and the 256 byte-fallback tokens,
  so that any text still tokenises (a character outside the kept set falls back to bytes);
- the `keep` most frequent ASCII tokens (BPE merge rank, i.e. how early the tokenizer
  learned them: English words, code, YAML, shell);
- every token a tokenisation of the given corpus uses (our prompts and playbooks);
- and the closure of all of these under the tokenizer's merges: every token the BPE needs
  on its way to a kept token. With that closure, a text made only of kept tokens
  tokenises exactly as before (a dropped merge could only have produced a dropped token),
  which `trim_vocab` checks on the corpus.

The embedding rows (and so the tied head) are selected in the old id order; the ids are
renumbered and the tokenizer's vocabulary, merges, added tokens and post-processor
rewritten to match. The output is a plain model directory.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import TrainError

BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
UNUSED_TOKEN = re.compile(r"<unused\d+>")


@dataclass(frozen=True)
class TrimResult:
    path: Path
    old_vocab: int
    new_vocab: int
    corpus_tokens: int          # corpus tokens checked to tokenise exactly as before


def _ascii(tok: str) -> bool:
    return all(ord(c) < 128 for c in tok.replace("\u2581", " "))


def _merge_pair(m) -> tuple[str, str]:
    return tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))


def kept_tokens(tok_json: dict, corpus_ids: Iterable[int], keep: int) -> list[int]:
    """The old ids to keep, sorted (see the module docstring)."""
    model = tok_json["model"]
    vocab: dict[str, int] = model["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    merges = [_merge_pair(m) for m in model["merges"]]
    rank: dict[str, int] = {}
    parents: dict[str, list[tuple[str, str]]] = {}
    for r, (a, b) in enumerate(merges):
        rank.setdefault(a + b, r)
        parents.setdefault(a + b, []).append((a, b))
    keep_ids = set(corpus_ids)
    for t in tok_json.get("added_tokens") or []:
        if not UNUSED_TOKEN.fullmatch(t["content"]) and _ascii(t["content"]):
            keep_ids.add(t["id"])
    for t, i in vocab.items():
        if BYTE_TOKEN.fullmatch(t) or (_ascii(t) and len(t.replace("\u2581", " ")) == 1):
            keep_ids.add(i)       # bytes and single ASCII characters: anything can still be spelled
    ascii_ranked = sorted((r, t) for t, r in rank.items() if _ascii(t) and t in vocab)
    keep_ids.update(vocab[t] for _, t in ascii_ranked[:keep])
    # Closure under the merges that make a kept token.
    todo = [by_id[i] for i in keep_ids if i in by_id]
    seen = set(todo)
    while todo:
        t = todo.pop()
        for a, b in parents.get(t, ()):
            for p in (a, b):
                if p not in seen and p in vocab:
                    seen.add(p)
                    todo.append(p)
    keep_ids.update(vocab[t] for t in seen)
    return sorted(keep_ids)


def rewrite_tokenizer(tok_json: dict, old_ids: list[int]) -> dict:
    """tokenizer.json with only `old_ids`, renumbered in their order."""
    new_of = {o: n for n, o in enumerate(old_ids)}
    out = json.loads(json.dumps(tok_json))
    model = out["model"]
    model["vocab"] = {t: new_of[i] for t, i in model["vocab"].items() if i in new_of}
    kept = model["vocab"]
    model["merges"] = [m for m in model["merges"]
                       if (lambda a, b: a in kept and b in kept and a + b in kept)(*_merge_pair(m))]
    out["added_tokens"] = [dict(t, id=new_of[t["id"]]) for t in out.get("added_tokens") or [] if t["id"] in new_of]
    pp = out.get("post_processor") or {}
    for spec in (pp.get("special_tokens") or {}).values():
        spec["ids"] = [new_of[i] for i in spec["ids"]]
    return out


def trim_vocab(src: Path, dest: Path, corpus: Iterable[str], keep: int = 16384,
               old_ids: list[int] | None = None) -> TrimResult:
    """Write `src` with a trimmed vocabulary to `dest` and check that every corpus text
    tokenises to the same tokens as before. `old_ids`: keep exactly these (a release's
    recorded vocabulary, train/release.py) instead of choosing them from `keep` and the corpus."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, dest = Path(src), Path(dest)
    tok_json = json.loads((src / "tokenizer.json").read_text())
    old_tok = Tokenizer.from_str(json.dumps(tok_json))
    texts = [t for t in corpus if t]
    old_enc = [old_tok.encode(t, add_special_tokens=False).ids for t in texts]
    old_ids = sorted(old_ids) if old_ids is not None else kept_tokens(tok_json, {i for ids in old_enc for i in ids},
                                                                      keep)
    new_json = rewrite_tokenizer(tok_json, old_ids)
    new_tok = Tokenizer.from_str(json.dumps(new_json))
    new_of = {o: n for n, o in enumerate(old_ids)}
    for text, ids in zip(texts, old_enc):
        if new_tok.encode(text, add_special_tokens=False).ids != [new_of[i] for i in ids]:
            raise TrainError(f"vocabulary trim of {src}: a corpus text tokenises differently after the trim "
                             f"({text[:60]!r}); keep more tokens (--trim-vocab) or report this")

    model = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True, dtype="auto")
    emb = model.get_input_embeddings()
    idx = torch.tensor(old_ids, dtype=torch.long)
    emb.weight = torch.nn.Parameter(emb.weight.data[idx].clone())
    emb.num_embeddings = len(old_ids)
    head = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False):
        head.weight = emb.weight
    else:
        head.weight = torch.nn.Parameter(head.weight.data[idx].clone())
    head.out_features = len(old_ids)
    model.config.vocab_size = len(old_ids)
    for cfg in (model.config, model.generation_config):
        for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            v = getattr(cfg, k, None)
            if isinstance(v, int):
                setattr(cfg, k, new_of[v])
            elif isinstance(v, list):
                setattr(cfg, k, [new_of[i] for i in v])
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    (dest / "tokenizer.json").write_text(json.dumps(new_json, ensure_ascii=False))
    for f in ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (src / f).is_file():
            shutil.copy2(src / f, dest / f)
    tok = AutoTokenizer.from_pretrained(str(dest), local_files_only=True)
    if tok.eos_token_id != model.generation_config.eos_token_id:
        raise TrainError(f"vocabulary trim of {src}: the tokenizer's end token and the model's disagree")
    return TrimResult(dest, len(tok_json["model"]["vocab"]), len(old_ids), sum(len(e) for e in old_enc))


def default_corpus() -> list[str]:
    """The texts whose tokens are kept whatever their rank: the prompt templates, the
    systems' specs (service names, units, paths), and the expert runbook's source (every
    shell snippet and module name a playbook of ours uses)."""
    import inspect
    from importlib import resources

    from e2e_reme.simulators.policies import expert as runbook
    texts = []
    for pkg, sub in (("e2e_reme.simulators.policies", "prompts"), ("e2e_reme.simulators.systems", "specs")):
        for f in sorted(resources.files(pkg).joinpath(sub).iterdir(), key=lambda p: p.name):
            if f.name.endswith((".md", ".yaml")):
                texts.append(f.read_text(encoding="utf-8"))
    texts.append(inspect.getsource(runbook))
    return texts
