"""The per-document stages of data preparation: normalization, quality filters, privacy scrubbing
and the blocklist. Each is a plain function of one document's text, so that the pipeline can run
it in any worker and a test can run it alone.

The quality filters are the heuristics published for large web corpora (Gopher, Rae et al. 2021,
appendix A; C4, Raffel et al. 2020; FineWeb's line-punctuation filter). Their thresholds are
``QualityConfig``'s defaults, each documented there.
"""
from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

# --- 1. normalization ---------------------------------------------------------------------------

_SPACES = re.compile(r"[^\S\n]+")  # runs of whitespace other than newlines
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize(text: str, nfc: bool = True, whitespace: bool = True) -> str:
    """Unicode NFC; inside lines every run of spaces and tabs becomes one space, lines lose their
    leading and trailing spaces, line ends become \\n, and more than one blank line becomes one."""
    if nfc:
        text = unicodedata.normalize("NFC", text)
    if whitespace:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
        text = _BLANK_RUNS.sub("\n\n", text).strip()
    return text


# --- 2. quality filters -------------------------------------------------------------------------

@dataclass
class QualityConfig:
    enabled: bool = True
    # Gopher: documents of 50 to 100,000 words.
    min_words: int = 50
    max_words: int = 100_000
    # Gopher: mean word length (characters) within [3, 10].
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    # Gopher: at least 80% of words contain an alphabetic character.
    min_alpha_word_fraction: float = 0.8
    # Gopher: at most 0.1 symbols ('#' and ellipses) per word.
    max_symbol_word_ratio: float = 0.1
    # Gopher: at most 30% of lines duplicate an earlier line, holding at most 20% of the characters.
    max_duplicate_line_fraction: float = 0.3
    max_duplicate_line_char_fraction: float = 0.2
    # Gopher: the most frequent n-gram (n = 2, 3, 4 words) covers at most 20%, 18%, 16% of the
    # characters; n-grams that occur more than once (n = 5..10) cover at most 15%..10% of them.
    max_top_ngram_char_fraction: dict[str, float] = field(
        default_factory=lambda: {"2": 0.20, "3": 0.18, "4": 0.16})
    max_duplicate_ngram_char_fraction: dict[str, float] = field(
        default_factory=lambda: {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11, "10": 0.10})
    # FineWeb: at least 12% of lines end in terminal punctuation (C4 keeps only such lines).
    min_punctuated_line_fraction: float = 0.12


_END_PUNCTUATION = (".", "!", "?", '"', "'", "\u201d", "\u2019", ";", ":")
_ALPHA_WORD = re.compile(r"\S*[^\W\d_]\S*")  # a word with a letter in it


def _ngram_stats(hashes, lengths, n: int) -> tuple[int, int]:
    """(characters of the most frequent word n-gram's occurrences if it occurs more than once,
    characters of the words covered by n-grams that occur more than once), from the words' hashes
    and lengths (numpy arrays)."""
    import numpy as np

    count = len(hashes) - n + 1
    if count < 1:
        return 0, 0
    with np.errstate(over="ignore"):
        grams = hashes[:count].copy()
        for j in range(1, n):
            grams = grams * np.uint64(0x100000001B3) ^ hashes[j:j + count]
    _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
    per_gram = counts[inverse]
    top_chars = 0
    best = int(per_gram.argmax())
    if per_gram[best] > 1:
        top_chars = int(lengths[best:best + n].sum()) * int(per_gram[best])
    starts = (per_gram > 1).astype(np.int64)
    covered = np.convolve(starts, np.ones(n, dtype=np.int64))[:len(hashes)] > 0
    return top_chars, int(lengths[covered].sum())


def quality_reason(text: str, cfg: QualityConfig) -> str:
    """'' when the document passes every filter, else the first failed filter's name."""
    import numpy as np

    words = text.split()
    n = len(words)
    if n < cfg.min_words:
        return "too_few_words"
    if n > cfg.max_words:
        return "too_many_words"
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=n)
    word_chars = max(1, int(lengths.sum()))
    if not cfg.min_mean_word_length <= word_chars / n <= cfg.max_mean_word_length:
        return "mean_word_length"
    if len(_ALPHA_WORD.findall(text)) / n < cfg.min_alpha_word_fraction:
        return "alpha_words"
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    if symbols / n > cfg.max_symbol_word_ratio:
        return "symbol_word_ratio"
    lines = [line for line in text.split("\n") if line.strip()]
    seen: set[str] = set()
    dup_lines = dup_line_chars = 0
    for line in lines:
        if line in seen:
            dup_lines += 1
            dup_line_chars += len(line)
        seen.add(line)
    chars = max(1, sum(len(line) for line in lines))
    if lines and dup_lines / len(lines) > cfg.max_duplicate_line_fraction:
        return "duplicate_lines"
    if dup_line_chars / chars > cfg.max_duplicate_line_char_fraction:
        return "duplicate_line_chars"
    # Python's string hash is fixed within a process, which is all counting inside one document needs.
    lowered = text.lower().split()
    hashes = np.fromiter(map(hash, lowered), dtype=np.int64, count=len(lowered)).view(np.uint64)
    # An n-gram that repeats contains a shorter one that repeats: past the first n without
    # repeats, every longer n has none either (0 characters), and is not computed.
    clean_from = None
    for which, table, name in ((0, cfg.max_top_ngram_char_fraction, "top_{}gram"),
                               (1, cfg.max_duplicate_ngram_char_fraction, "duplicate_{}grams")):
        for k, limit in sorted(table.items(), key=lambda kv: int(kv[0])):
            chars = 0 if clean_from is not None and int(k) >= clean_from else _ngram_stats(hashes, lengths, int(k))[which]
            if chars == 0 and clean_from is None:
                clean_from = int(k)
            if chars / word_chars > limit:
                return name.format(k)
    if lines and sum(1 for line in lines if line.endswith(_END_PUNCTUATION)) / len(lines) \
            < cfg.min_punctuated_line_fraction:
        return "punctuated_lines"
    return ""


# --- 5. privacy scrubbing -----------------------------------------------------------------------

PLACEHOLDERS = {"secret": "<SECRET>", "email": "<EMAIL>", "card": "<CARD_NUMBER>", "ipv6": "<IPV6>",
                "ipv4": "<IPV4>", "phone": "<PHONE>"}

_SECRET = re.compile(
    r"\bAKIA[0-9A-Z]{16}\b"                      # AWS access key id
    r"|\bgh[pousr]_[A-Za-z0-9]{36}\b"           # GitHub token
    r"|\bgithub_pat_[A-Za-z0-9_]{40,}"          # GitHub fine-grained token
    r"|\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}"       # OpenAI-style key
    r"|\b(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"          # Slack
    r"|\bAIza[0-9A-Za-z_-]{35}"                 # Google API key
    r"|\bhf_[A-Za-z0-9]{30,}"                   # Hugging Face token
    r"|(?<=[=:] )[A-Za-z0-9+/_-]{32,}={0,2}(?![\w+/=-])"  # a long key-like value after 'x: ' or 'x= '
    r"|(?<=[=:])[A-Za-z0-9+/_-]{32,}={0,2}(?![\w+/=-])")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]|\.\d)")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w])")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _is_ipv6(match: str) -> bool:
    if match.count(":") < 2:
        return False
    try:
        ipaddress.IPv6Address(match)
    except ValueError:
        return False
    return True


_KINDS = (("secret", _SECRET, None), ("email", _EMAIL, None), ("card", _CARD, _is_card),
          ("ipv6", _IPV6, _is_ipv6), ("ipv4", _IPV4, None), ("phone", _PHONE, None))
# Cheap screens: a kind's pattern runs only on a text where this finds something (each item of
# the kind contains such a run), which most documents do not have.
_SCREENS = {"secret": re.compile(r"[A-Za-z0-9_+/=-]{16,}"), "email": re.compile("@"),
            "card": re.compile(r"\d"), "ipv6": re.compile(r"[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:"),
            "ipv4": re.compile(r"\d"), "phone": re.compile(r"\d")}


def scrub(text: str, kinds: tuple[str, ...] = tuple(PLACEHOLDERS)) -> tuple[str, Counter]:
    """The text with each private item of ``kinds`` replaced by its typed placeholder, and how many
    of each kind were replaced. Kinds run in a fixed order (secrets first, phone numbers last) so
    that a card number or an address is never taken for a phone number."""
    counts: Counter = Counter()
    for kind, pattern, check in _KINDS:
        if kind not in kinds or not _SCREENS[kind].search(text):
            continue

        def replace(m: re.Match, kind=kind, check=check) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        text = pattern.sub(replace, text)
    return text, counts


# --- 6. blocklist -------------------------------------------------------------------------------

def read_blocklist(text: str) -> list[str]:
    """One word or phrase per line; blank lines and lines starting with '#' are skipped."""
    return [line.strip().lower() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def blocklist_pattern(words: list[str]) -> re.Pattern | None:
    if not words:
        return None
    alternatives = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def blocklist_hits(text: str, pattern: re.Pattern | None) -> int:
    return 0 if pattern is None else sum(1 for _ in pattern.finditer(text))
