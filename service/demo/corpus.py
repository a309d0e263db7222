"""The demo's data, made on this machine (nothing is downloaded): the docstrings of Python's
standard library for pretraining, two-digit additions written out in words for fine-tuning,
a byte-level BPE tokenizer trained on them, and fixed-length training blocks."""

from __future__ import annotations

import inspect
import random

#: standard-library modules whose docstrings make the pretraining corpus
STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "imaplib",
    "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "lzma", "mailbox", "math",
    "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform",
    "plistlib", "pprint", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors",
    "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings",
    "wave", "weakref", "xml.dom.minidom", "zipfile", "zoneinfo",
)


def stdlib_docstrings() -> list[str]:
    """Docstrings of the modules above and their public classes and functions."""
    import importlib

    docs: list[str] = []
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # a module this Python lacks: skip it
            continue
        seen = set()
        for obj in [mod, *(getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_"))]:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj)
                                          or inspect.isfunction(obj) or inspect.isbuiltin(obj)) else None
            if doc and len(doc) > 80 and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def in_words(n: int) -> str:
    """0 ≤ n < 1000 in English words: 42 → 'forty-two'."""
    if n < 20:
        return NUMBERS[n]
    if n < 100:
        return TENS[n // 10 - 2] + ("" if n % 10 == 0 else "-" + NUMBERS[n % 10])
    return in_words(n // 100) + " hundred" + ("" if n % 100 == 0 else " and " + in_words(n % 100))


def addition_task(n: int, seed: int) -> list[str]:
    """The narrow fine-tuning task: 'Q: what is forty-two plus seven? A: 42 + 7 = 49.'"""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        out.append(f"Q: what is {in_words(a)} plus {in_words(b)}? A: {a} + {b} = {a + b}.")
    return out


def train_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE of ``vocab`` tokens trained on ``texts`` (special tokens <s>, </s>,
    <pad>), as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def blocks_of(tokenizer, texts: list[str], seq_len: int) -> list[dict]:
    """The texts as one token stream (each ended by </s>) cut into training examples of
    ``seq_len`` tokens (input_ids = labels); the incomplete tail is dropped."""
    import torch

    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    out = []
    for i in range(len(stream) // seq_len):
        ids = torch.tensor(stream[i * seq_len:(i + 1) * seq_len])
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out
