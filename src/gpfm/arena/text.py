"""Word-level text handling for the generative arena tasks: normalisation, vocabulary, encode/decode.

Normalisation (`tokenize`), applied identically to training reports, references and generated text:

- Unicode NFKC, then lower-case.
- Apostrophes are removed inside words ("patient's" -> "patients").
- A period is kept as its own token ``.`` (sentence boundary, as in R2Gen/HistGen report cleaning) and runs of
  periods collapse to one; decimal numbers keep their point ("3.5").
- Every other punctuation mark or symbol (, ; : ( ) / - % ...) separates words and is dropped:
  "well-differentiated" -> "well differentiated".

`tokenize(" ".join(tokenize(s))) == tokenize(s)`, so normalised text stored in predictions.csv can be re-scored.

`Vocab` maps tokens to ids with four specials: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3. It is built
from training texts only (tokens seen at least `min_freq` times), so unseen words become ``<unk>``.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from gpfm.io import GpfmError

log = logging.getLogger("gpfm.arena")

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_TOKEN = re.compile(r"\d+(?:\.\d+)+|[^\W_]+|\.")
_APOSTROPHE = re.compile(r"(?<=\w)['\u2019](?=\w)")


def tokenize(text: str) -> list[str]:
    """Normalised word tokens of `text` (see the module docstring for the rules)."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = _APOSTROPHE.sub("", text)
    out: list[str] = []
    for tok in _TOKEN.findall(text):
        if tok == "." and (not out or out[-1] == "."):
            continue  # no leading period, no runs of periods
        out.append(tok)
    return out


def normalize(text: str) -> str:
    """`tokenize` joined by single spaces: the form references and hypotheses are scored in."""
    return " ".join(tokenize(text))


@dataclass(frozen=True)
class Vocab:
    """Token <-> id table; ids 0..3 are the specials."""

    tokens: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if tuple(self.tokens[:len(SPECIALS)]) != SPECIALS:
            raise GpfmError(f"a vocabulary must start with {', '.join(SPECIALS)}")
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})

    @classmethod
    def build(cls, texts: Iterable[str], min_freq: int = 3, max_size: int | None = None) -> Vocab:
        """Vocabulary of the tokens seen at least `min_freq` times (most frequent first, ties alphabetical)."""
        if min_freq < 1:
            raise GpfmError(f"min_freq must be >= 1, got {min_freq}")
        counts = Counter(t for s in texts for t in tokenize(s))
        kept = sorted((t for t, c in counts.items() if c >= min_freq and t not in SPECIALS),
                      key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[:max(0, max_size - len(SPECIALS))]
        return cls(SPECIALS + tuple(kept))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        idx = self._index
        return [idx.get(t, UNK) for t in tokens]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, stopping at <eos> and skipping <pad>/<bos>; <unk> stays visible as "<unk>"."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            words.append(self.tokens[i] if 0 <= i < len(self.tokens) else SPECIALS[UNK])
        return " ".join(words)


def encode_batch(vocab: Vocab, texts: Sequence[str], max_len: int, what: str = "report") -> np.ndarray:
    """(N, max_len + 2) int64 ids: <bos> tokens <eos>, <pad>-filled; texts over `max_len` tokens are cut.

    One logged warning says how many were truncated (an over-long report is not an error: its start is kept).
    """
    if max_len < 1:
        raise GpfmError(f"max_len must be >= 1, got {max_len}")
    out = np.full((len(texts), max_len + 2), PAD, dtype=np.int64)
    cut = 0
    longest = 0
    for i, text in enumerate(texts):
        ids = vocab.encode(tokenize(text))
        longest = max(longest, len(ids))
        if len(ids) > max_len:
            cut += 1
            ids = ids[:max_len]
        out[i, 0] = BOS
        out[i, 1:len(ids) + 1] = ids
        out[i, len(ids) + 1] = EOS
    if cut:
        log.warning("%d of %d %ss are longer than max_len=%d tokens (longest %d) and were truncated; raise "
                    "settings.decoder.max_len to keep them whole", cut, len(texts), what, max_len, longest)
    return out
