"""The course's text: corpus files and their split, the tokenizer, prompts and held-out text.

The bundled teacher trains on text every machine has: the ``.py`` sources of the
running interpreter's standard library, mixed with the sources of ``torch`` and
``transformers``. This module finds those files, splits them, records them in a
manifest, trains the tokenizer, and cuts prompts and evaluation text from them;
:mod:`qdlib.teacher` trains the model, and the draft side (distillation data,
evaluation sets, the benchmark) reads its prompts from here.

    >>> from qdlib.corpus import corpus_files
    >>> files = corpus_files("stdlib")
    >>> files[0].split in ("train", "val")
    True

The split is by file and deterministic (a hash of the relative path), and is
recorded with sizes and sha256 sums in ``outputs/teacher/manifest.json``; the
source files themselves are never copied into the repository.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from . import paths
from .errors import ConfigError
from .settings.names import SOURCES

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
VAL_PERCENT = 4  # stdlib files whose path hash falls below this percentage are held out
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3", "testing"}


@dataclass(frozen=True)
class CorpusFile:
    source: str  # "stdlib", "torch" or "transformers"
    relpath: str  # path relative to the source root, with forward slashes
    path: Path
    split: str  # "train" or "val"


def source_root(source: str) -> Path:
    """Folder that holds one corpus source on this machine."""
    if source == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    if source in ("torch", "transformers"):
        mod = __import__(source)
        return Path(mod.__file__).resolve().parent
    raise ConfigError(f"unknown corpus source {source!r}; allowed: {', '.join(SOURCES)}")


def split_of(source: str, relpath: str) -> str:
    """Deterministic split by file: a stable hash of the path, not of its content."""
    if source != "stdlib":
        return "train"  # only standard-library files are held out (the quality bars use them)
    h = int(hashlib.sha1(relpath.encode()).hexdigest(), 16)
    return "val" if h % 100 < VAL_PERCENT else "train"


def corpus_files(source: str) -> list[CorpusFile]:
    """All corpus files of one source, sorted, with test packages and idlelib left out."""
    root = source_root(source)
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        relpath = rel.as_posix()
        out.append(CorpusFile(source, relpath, p, split_of(source, relpath)))
    return out


def read_source(path: Path) -> str | None:
    """File text as UTF-8, or None for a file that is not valid UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_manifest(sources=SOURCES) -> dict:
    """The corpus manifest: every file with its source, split, size and sha256."""
    import tokenizers
    import transformers

    files = []
    for src in sources:
        for f in corpus_files(src):
            if read_source(f.path) is None:
                continue
            files.append([f.source, f.relpath, f.split, f.path.stat().st_size, sha256_file(f.path)])
    return {
        "format_version": 1,
        "python_version": platform.python_version(),
        "package_versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "split_rule": f"stdlib files with int(sha1(relpath), 16) % 100 < {VAL_PERCENT} are held out (val)",
        "columns": ["source", "relpath", "split", "size", "sha256"],
        "files": files,
    }


def heldout_files(manifest: dict) -> tuple[list[Path], list[str]]:
    """Held-out stdlib files of this interpreter whose hashes match the manifest.

    Returns ``(matching_paths, problems)``; tests skip with the problems as the
    reason when this interpreter's standard library differs from the manifest's.
    """
    root = source_root("stdlib")
    good, problems = [], []
    for src, rel, split, size, sha in manifest["files"]:
        if src != "stdlib" or split != "val":
            continue
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != sha:
            problems.append(f"{rel}: content differs (Python {platform.python_version()} vs {manifest['python_version']})")
        else:
            good.append(p)
    return good, problems


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts, vocab_size: int = 8192):
    """Byte-level BPE with end-of-text and padding tokens, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, bos_token=EOS_TOKEN,
        model_max_length=1024, clean_up_tokenization_spaces=False,
    )




def pad_id(source, default: int = 0) -> int:
    """``source.pad_token_id`` (a tokenizer or a model config), or ``default`` when it has none.

    >>> from types import SimpleNamespace as NS
    >>> pad_id(NS(pad_token_id=1)), pad_id(NS(pad_token_id=None)), pad_id(NS(pad_token_id=None), default=7)
    (1, 0, 7)
    """
    pad = getattr(source, "pad_token_id", None)
    return default if pad is None else pad


# --------------------------------------------------------------------------- prompts and held-out text


def tokenize_corpus(tokenizer, files: list[CorpusFile]) -> torch.Tensor:
    """Concatenate files as ``<eos> file <eos> file ...`` token ids (int16)."""
    texts = [t for t in (read_source(f.path) for f in files) if t is not None]
    ids = []
    eos = tokenizer.eos_token_id
    for i in range(0, len(texts), 64):
        for enc in tokenizer(texts[i : i + 64], add_special_tokens=False)["input_ids"]:
            ids.append(eos)
            ids.extend(enc)
    return torch.tensor(ids, dtype=torch.int16)


def heldout_prompts(tokenizer, texts, n_prompts: int = 50, prompt_tokens: int = 64, seed: int = 0) -> list[list[int]]:
    """Deterministic prompts cut from held-out texts: ``prompt_tokens`` ids each.

    Prompts start at line boundaries spread over the held-out files, so they are
    ordinary code the teacher never trained on.
    """
    g = torch.Generator().manual_seed(seed)
    per_text = max(1, math.ceil(n_prompts / max(len(texts), 1)))
    prompts = []
    for text in texts:
        lines = text.splitlines(keepends=True)
        starts = [i for i in range(len(lines)) if lines[i].strip()]
        if not starts:
            continue
        picks = torch.randperm(len(starts), generator=g)[: per_text * 3].tolist()
        got = 0
        for k in picks:
            ids = tokenizer("".join(lines[starts[k] :]), add_special_tokens=False)["input_ids"]
            if len(ids) >= prompt_tokens + 128:
                prompts.append(ids[:prompt_tokens])
                got += 1
            if got == per_text:
                break
    return prompts[:n_prompts]


def random_prompts(stream: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``length`` ids from random places of ``stream`` (deterministic for ``seed``): ``(n, length)``."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(stream) - length, (n,), generator=g).tolist()
    return torch.stack([stream[s : s + length].long() for s in starts])



def heldout_texts(manifest_path=None) -> list[str]:
    """Texts of the held-out standard-library files whose hashes match the committed manifest.

    Falls back to every listed held-out file that exists when none match (another
    Python version), so analyses still run; the quality tests skip instead.
    """
    manifest_path = manifest_path or paths.TEACHER_DIR / "manifest.json"
    manifest = json.loads(Path(manifest_path).read_text())
    good, _ = heldout_files(manifest)
    if not good:
        root = source_root("stdlib")
        good = [root / f[1] for f in manifest["files"] if f[0] == "stdlib" and f[2] == "val" and (root / f[1]).is_file()]
    return [t for t in (read_source(p) for p in good) if t]


# --------------------------------------------------------------------------- evaluation on held-out text


def bits_per_byte(model, tokenizer, texts, *, context: int = 256, stride: int = 128, batch_size: int = 16) -> dict:
    """Bits per UTF-8 byte of ``texts`` under ``model`` (sliding windows).

    Each text is scored as ``<eos> text``; every token is predicted once, with at
    least ``context - stride`` tokens of left context where the text allows.
    Returns ``{"bpb", "nats_per_token", "tokens", "bytes"}``.
    """
    model_device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    windows = []  # (ids, n_scored)
    n_bytes = 0
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        ids = [eos] + tokenizer(text, add_special_tokens=False)["input_ids"]
        n = len(ids)
        start, scored_until = 0, 1
        while scored_until < n:
            end = min(start + context, n)
            windows.append((ids[start:end], end - scored_until))
            scored_until = end
            start = max(0, end - (context - stride)) if end < n else end
            start = min(start, max(0, n - context)) if end < n else start
    total_nll, total_tok = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            width = max(len(w) for w, _ in chunk)
            x = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, (w, _) in enumerate(chunk):
                x[j, : len(w)] = torch.tensor(w)
                mask[j, : len(w)] = 1
            logits = model(input_ids=x.to(model_device), attention_mask=mask.to(model_device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V)
            nll = -logp.gather(-1, x[:, 1:].to(model_device).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            for j, (w, n_scored) in enumerate(chunk):
                L = len(w)
                total_nll += nll[j, L - 1 - n_scored : L - 1].sum().item()
                total_tok += n_scored
    return {
        "bpb": total_nll / math.log(2) / max(n_bytes, 1),
        "nats_per_token": total_nll / max(total_tok, 1),
        "tokens": total_tok,
        "bytes": n_bytes,
    }


def _nll(model, ids: list[int]) -> torch.Tensor:
    """``-log p(ids[t+1] | ids[:t+1])`` for every t: ``(len(ids) - 1,)``."""
    x = torch.tensor([ids], device=next(model.parameters()).device)
    logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
    return -logp.gather(-1, x[0, 1:, None]).squeeze(-1).cpu()


@torch.no_grad()
def loss_by_position(model, tokenizer, texts, *, context: int = 1024, short: int = 256, bucket: int = 128,
                     max_windows: int = 16) -> list[dict]:
    """Next-token loss (nats) by position, with the whole window as context and with at most ``short`` tokens of it.

    The bundled teacher was trained on 256-token windows while its config allows 1,024 positions; this measures what
    happens beyond 256. Each text long enough gives one window (``<eos>`` + its first ``context - 1`` tokens), at
    most ``max_windows``. ``nats`` predicts every token from all tokens before it in the window; ``nats_short``
    predicts the same tokens from windows of ``short`` tokens sliding by ``short // 2`` (each token sees between
    ``short // 2`` and ``short`` tokens), the context length the teacher was trained on. Returns one row per
    ``bucket`` positions: ``{"start", "end", "nats", "nats_short", "tokens"}``.
    """
    rows = []
    for text in texts:
        ids = [tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= context:
            rows.append(ids[:context])
        if len(rows) == max_windows:
            break
    if not rows:
        raise ConfigError(f"no text has {context} tokens; pass longer texts or a smaller context")
    full, cut = torch.zeros(context - 1), torch.zeros(context - 1)
    for ids in rows:  # one window at a time: the long context is the point, not the batch
        full += _nll(model, ids)
        cut[: short - 1] += _nll(model, ids[:short])
        for a in range(short // 2, context - short // 2, short // 2):  # window a..a+short scores its second half
            b = min(a + short, context)
            cut[a + short // 2 - 1 : b - 1] += _nll(model, ids[a:b])[short // 2 - 1 :]
    full, cut = full / len(rows), cut / len(rows)
    return [{"start": a, "end": min(a + bucket, context - 1), "nats": full[a : a + bucket].mean().item(),
             "nats_short": cut[a : a + bucket].mean().item(), "tokens": len(rows) * len(full[a : a + bucket])}
            for a in range(0, context - 1, bucket)]


def repeated_ngram_share(ids, n: int = 4) -> float:
    """Share of n-grams in ``ids`` that already occurred earlier in ``ids``.

    >>> repeated_ngram_share([1, 2, 3, 4, 1, 2, 3, 4])
    0.2
    """
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    seen, rep = set(), 0
    for g in grams:
        rep += g in seen
        seen.add(g)
    return rep / len(grams)


def greedy_repetition(model, prompts, new_tokens: int = 128, batch_size: int = 16) -> dict:
    """Mean share of repeated 4-grams in greedy continuations of ``prompts``.

    Prompts of the same length are continued together, ``batch_size`` at a time (no padding is
    needed, so each row is its own greedy continuation up to float rounding).
    """
    device = next(model.parameters()).device
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    shares: list[float] = [0.0] * len(prompts)
    for n, idx in by_len.items():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            x = torch.tensor([prompts[i] for i in chunk], device=device)  # (b, n)
            out = model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 attention_mask=torch.ones_like(x), pad_token_id=model.config.pad_token_id)
            for j, i in enumerate(chunk):
                shares[i] = repeated_ngram_share(out[j, n:].tolist())
    return {"mean": sum(shares) / len(shares), "per_prompt": shares}
