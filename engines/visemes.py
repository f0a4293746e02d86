"""Phonemes → visemes: the mouth shape to draw while each sound plays.

The set is the 15 visemes of Meta's Oculus LipSync (``sil``, ``PP``, ``FF``,
``TH``, ``DD``, ``kk``, ``CH``, ``SS``, ``nn``, ``RR``, ``aa``, ``E``, ``ih``,
``oh``, ``ou``). Chosen over the 22 of Microsoft's SAPI/Azure because it is the
set avatar tooling already speaks (Oculus/Meta LipSync, Ready Player Me,
VRM/three-vrm blend shapes, Unity and Unreal lip-sync plug-ins), and because
15 shapes are what a portrait artist can reasonably draw; Azure's 22 split
vowels finer than a drawn mouth shows.

The table covers the IPA symbols espeak-ng writes for Piper voices (every
symbol of the bundled voice's ``phoneme_id_map``, which is Piper's full
default map) and so the phonemes of both English (``en-us``) and Brazilian
Portuguese (``pt-br``) voices; ``tests/test_visemes.py`` checks each. A
phoneme label may carry modifiers (stress before it, length, nasalisation and
other diacritics after it): its viseme is that of its first base symbol.
"""

from __future__ import annotations

VISEMES = ("sil", "PP", "FF", "TH", "DD", "kk", "CH", "SS", "nn", "RR", "aa", "E", "ih", "oh", "ou")
"""The 15 Oculus/Meta LipSync visemes, in their documented order."""

PAUSES = frozenset("^$_ !'(),-.:;?\"#↓↑…")
"""Symbols that are not sounds: Piper's sentence start/end and pad, word breaks, punctuation
and intonation marks. They are silence (``sil``) and separate words."""

MODIFIERS_BEFORE = frozenset("ˈˌ")
"""Stress marks: espeak writes them just before the stressed vowel; they belong to it."""

MODIFIERS_AFTER = frozenset("ːˑʰʲʷˤ˞\u0303\u0327\u032a\u032f\u0329\u033a\u033b\u031d\u030a0123456789")
"""Length, aspiration, palatalisation, rhoticity, combining diacritics (nasal ̃, dental ̪,
non-syllabic ̯, syllabic ̩ …) and tone digits: they modify the symbol before them."""

_TABLE = {
    "PP": "pbmɓʙɸβʘ",
    "FF": "fvɱʋⱱ",
    "TH": "θð",
    "DD": "tdʈɖɗɾɽǀǁǂǃ",
    "kk": "kgɡqɢɠʛcɟʄxɣχħʕhɦʜʢʡʔŋɴɰ",
    "CH": "ʃʒɕʑʂʐçʝɧ",
    "SS": "szʦ",
    "nn": "nlɲɳɫɭʎʟɬɮɺ",
    "RR": "rɹɻʀʁɚɝ",
    "aa": "aɑɐɒæʌɶ",
    "E": "eɛəɘɜεɤ",
    "ih": "iɪɨᵻjɯ",
    "oh": "oɔɵøœɞ",
    "ou": "uʊʉwʍyʏɥ",
}

VISEME_OF: dict[str, str] = {symbol: viseme for viseme, symbols in _TABLE.items() for symbol in symbols}
"""Base IPA symbol → viseme."""


def viseme(label: str) -> str:
    """The viseme of a phoneme label (``"ˈɑː"`` → ``aa``); ``sil`` for pauses and unknown symbols."""
    for ch in label:
        if ch in VISEME_OF:
            return VISEME_OF[ch]
        if ch not in MODIFIERS_BEFORE and ch not in MODIFIERS_AFTER:
            return "sil"
    return "sil"
