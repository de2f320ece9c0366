"""Small, deterministic corpora for the data tests."""
from __future__ import annotations

import random

_WORDS = (
    "the of and to in that is was he for it with as his on be at by had not are but from or have an "
    "they which one you were her all she there would their we him been has when who will more no if "
    "out so said what up its about into than them can only other new some could time these two may "
    "then do first any my now such like our over man me even most made after also did many before "
    "must through back years where much your way well down should because each just those people "
    "Mr how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come since "
    "against go came right used take three"
).split()
# Characters that exercise byte-level BPE beyond ASCII: accents, CJK, emoji, control characters.
_EXOTIC = ("café", "naïve", "Ünïcödé", "日本語のテキスト", "😀🚀", "tab\there", "crlf\r\n", "zero\u200bwidth")


def make_documents(count: int, seed: int = 0, words_per_doc: tuple[int, int] = (30, 120)) -> list[str]:
    """Deterministic, non-trivial documents: paragraphs of common words with some exotic text."""
    rng = random.Random(seed)
    documents = []
    for index in range(count):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(*words_per_doc))]
        if index % 3 == 0:
            words.insert(rng.randrange(len(words)), rng.choice(_EXOTIC))
        text = " ".join(words).capitalize() + ".\n"
        if index % 4 == 1:
            text += "\n  Second paragraph, indented.  \n"
        documents.append(text)
    return documents


# The text of the small BPE tokenizer that the chat-data tests (SFT, preference) share.
CHAT_TOKENIZER_TEXT = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello, how are you today? I am fine.",
                       "Numbers 0123456789 and symbols <>|_ are here too."] * 5
