"""Slot extractors for the intent router: find values in German and English requests.

A :class:`Doc` is the request tokenised once (words with offsets; e-mail addresses, URLs and
quoted text marked). Each extractor yields candidate :data:`Hit` s — ``(value, start, end)``
with character offsets — best first; the router takes the first candidate that does not
overlap a slot found before. Typed extractors return canonical values:

- ``periods``: ``Q3``, ``Q3 2024``, ``October``, ``March 2025``, ``last month``, ``2024``
- ``dates``: ``Tuesday``, ``tomorrow``, ``day after tomorrow``, ``2025-03-14``, ``03-12``
- ``times``: ``HH:MM`` (``10 Uhr`` → ``10:00``, ``3pm`` → ``15:00``)
- ``urls``: with scheme (a bare ``portal.example.com`` becomes ``https://portal.example.com``)

Free-text slots (a ticket summary, an analysis topic) come from :func:`residual`: the longest
run of words left once the intent's keywords and the other slots are taken out, trimmed of
stop words — so they work for any word order instead of one regex per sentence.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

Hit = tuple[str, int, int]
"""A candidate value and its character span ``[start, end)`` in the request."""


def normalize(word: str) -> str:
    """Case-folded, umlauts spelled out (ä→ae, ß→ss), other accents dropped."""
    word = word.casefold().replace("ä", "ae").replace("ö", "oe").replace("ü", "ue")
    if word.isascii():
        return word
    return "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c))


def typo_prefix(word: str, stem: str) -> bool:
    """True when ``word`` starts with ``stem`` but for one typo.

    The first letter must match. Stems under 7 letters allow a dropped, doubled or swapped
    letter only; substitutions would make 'suche' match 'sache'.
    """
    n = len(stem)
    if word[:1] != stem[:1] or len(word) < n - 1:
        return False
    return any(_one_edit(word[:k], stem, substitute=n >= 7) for k in (n - 1, n, n + 1)
               if k <= len(word))


def _one_edit(a: str, b: str, *, substitute: bool) -> bool:
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        if len(diff) == 1:
            return substitute
        return (len(diff) == 2 and diff[1] == diff[0] + 1
                and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    if abs(len(a) - len(b)) != 1:
        return False
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    i = 0
    while i < len(short) and short[i] == long_[i]:
        i += 1
    return short[i:] == long_[i + 1:]


# ---------------------------------------------------------------------------- document

# Every pattern that starts with a repeated class is anchored with a look-behind, so a long
# word is scanned once rather than from each of its letters (quadratic on 8 kB of "aaaa").
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_URL = re.compile(r"\bhttps?://[^\s<>\"'„“”«»]+", re.I)
_TLDS = ("com|de|org|net|io|eu|at|ch|co|uk|info|biz|app|dev|ai|nl|fr|it|es|be|pl|se|us|"
         "local|internal|intern|example|test")
_BARE_URL = re.compile(
    rf"(?<![\w@./:-])(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+(?:{_TLDS})(?::\d{{2,5}})?"
    r"(?:/[^\s<>\"'„“”«»]*)?(?![\w@-])", re.I)
_QUOTED = re.compile(r'"[^"\n]{1,300}"|„[^“”"\n]{1,300}[“”"]|“[^”\n]{1,300}”|«[^»\n]{1,300}»'
                     r"|(?<!\w)'[^'\n]{1,300}'(?!\w)")
_WORD = re.compile(r"\w+")
_BREAKS = frozenset(",;:!?()[]{}\"„“”«»–—|\n")


@dataclass(frozen=True, slots=True)
class Tok:
    """One word of the request."""

    start: int
    end: int
    text: str
    norm: str
    masked: bool
    """Inside an e-mail address or URL: never a keyword, name or free text."""
    quoted: bool
    """Inside quotes: content, so never a keyword."""


class Doc:
    """The request, tokenised once per routing call; extractors memoise on it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.emails: list[Hit] = [(m.group(), m.start(), m.end()) for m in _EMAIL.finditer(text)]
        self.urls: list[Hit] = []
        for m in _URL.finditer(text):
            value = m.group().rstrip(".,;:!?)")
            self.urls.append((value, m.start(), m.start() + len(value)))
        for m in _BARE_URL.finditer(text):
            if not self._inside(m.start(), self.urls):
                value = m.group().rstrip(".,;:!?)")
                self.urls.append(("https://" + value, m.start(), m.start() + len(value)))
        hard = self._mask(self.emails + self.urls)
        soft = self._mask([(m.group(), m.start(), m.end()) for m in _QUOTED.finditer(text)])
        self.tokens = [
            Tok(m.start(), m.end(), m.group(), normalize(m.group()),
                hard[m.start()] == 1, soft[m.start()] == 1)
            for m in _WORD.finditer(text)
        ]
        self.has_upper = any(c.isupper() for c in text)
        self.memo: dict[str, list[Hit]] = {}

    def _mask(self, spans: Sequence[Hit]) -> bytearray:
        """One byte per character: 1 inside one of ``spans``."""
        mask = bytearray(len(self.text))
        for _, start, end in spans:
            mask[start:end] = b"\x01" * (end - start)
        return mask

    @staticmethod
    def _inside(pos: int, spans: Sequence[Hit]) -> bool:
        return any(start <= pos < end for _, start, end in spans)

    def boundary(self, i: int) -> bool:
        """Punctuation (a clause break) between token ``i - 1`` and token ``i``."""
        if i <= 0 or i >= len(self.tokens):
            return True
        prev = self.tokens[i - 1]
        gap = self.text[prev.end:self.tokens[i].start]
        if prev.masked and self.tokens[i].masked and not any(c.isspace() for c in gap):
            return False  # the dots and slashes inside one address or URL
        if any(c in _BREAKS for c in gap) or (len(gap) > 1 and gap.strip() == "-"):
            return True
        # "2. OG", "Dr. Müller", "Co. KG": a dot after a number or abbreviation goes on.
        return "." in gap and not (prev.text.isdigit() or len(prev.text) <= 4)

    def token_range(self, start: int, end: int) -> range:
        """Indices of the tokens inside the character span."""
        idx = [i for i, t in enumerate(self.tokens) if start <= t.start < end]
        return range(idx[0], idx[-1] + 1) if idx else range(0)


def _memo(fn: Callable[[Doc], Iterator[Hit]]) -> Callable[[Doc], list[Hit]]:
    """Run an extractor once per request although several intents ask for it."""
    key = fn.__name__

    def cached(doc: Doc) -> list[Hit]:
        hits = doc.memo.get(key)
        if hits is None:
            hits = doc.memo[key] = list(fn(doc))
        return hits

    cached.__name__, cached.__doc__ = key, fn.__doc__
    return cached


def phrase_hits(doc: Doc, parts: Sequence[str]) -> Iterator[list[int]]:
    """Token indices of each occurrence of a phrase, its parts matched in order in one clause.

    A part is a word prefix (``=word``: the exact word). Up to two stop words may sit between
    parts ("geh mal auf", "look it up"); after a ``...`` part up to ten words of any kind may
    ("werte die Kosten aus" for ``wert ... =aus``: German separable verbs put the particle
    last). The bounds keep this linear in the length of the request.
    """
    toks, n = doc.tokens, len(doc.tokens)

    def matches(i: int, part: str) -> bool:
        tok = toks[i]
        if tok.masked or tok.quoted:
            return False
        return tok.norm == part[1:] if part.startswith("=") else tok.norm.startswith(part)

    for i in range(n):
        if not matches(i, parts[0]):
            continue
        found, k, gap_any = [i], i, False
        for part in parts[1:]:
            if part == "...":
                gap_any = True
                continue
            k += 1
            skipped = 0
            while k < n and not doc.boundary(k) and not matches(k, part) and (
                    (gap_any and skipped < 10) or (skipped < 2 and toks[k].norm in STOPWORDS)):
                k, skipped = k + 1, skipped + 1
            if k >= n or doc.boundary(k) or not matches(k, part):
                break
            found.append(k)
            gap_any = False
        else:
            yield found


# ------------------------------------------------------------------------------ words


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


STOPWORDS = _wordset("""
aber alle als also am an auch auf aus bei beim bin bis bitte da dann das dass dem den der des
dich die dies diese diesem diesen dieser doch du durch ein eine einem einen einer eines er es
etwas euch fuer gern gerne hab habe haben hallo hast hat hey hi ich ihm ihn ihr ihre im in ins
ist ja jetzt kann kannst koennen koenntest koennte koennten mach mache machen mal man mein
meine meinem meinen meiner mich mir mit moechte muss nach nen noch nur ob oder schon sehr sein
seine sich sie sind so soll sollte ueber um und uns unser unsere vom von vor war waere was weil
wenn wer wie wir wird wo wollen wuerde wuerdest wuerden zu zum zur danke dank vielen brauche
brauchen benoetige neu neue neues neuen aktuell aktuelle aktuellen letzte letzten neueste
a about after all also an and any are as at be been but by can could did do does for from get
give had has have hello her here him his how i if in into is it its just let me my need new
next now of on or our out please pls plz run should so some than thank thanks that the their
them then there these they this those to too up us very want was we were what when where
which who why will with would you your s t kindly quick quickly
""")
"""Words trimmed from the edges of free-text values and never part of a name."""

_MONTHS = {
    "januar": 1, "january": 1, "jan": 1, "jaenner": 1, "jänner": 1, "februar": 2,
    "february": 2, "feb": 2, "märz": 3, "maerz": 3, "march": 3, "mrz": 3, "april": 4,
    "apr": 4, "mai": 5, "may": 5, "juni": 6, "june": 6, "jun": 6, "juli": 7, "july": 7,
    "jul": 7, "august": 8, "aug": 8, "september": 9, "sept": 9, "sep": 9, "oktober": 10,
    "october": 10, "okt": 10, "oct": 10, "november": 11, "nov": 11, "dezember": 12,
    "december": 12, "dez": 12, "dec": 12,
}
_MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August",
                "September", "October", "November", "December")
_WEEKDAYS = {
    "montag": "Monday", "monday": "Monday", "dienstag": "Tuesday", "tuesday": "Tuesday",
    "tue": "Tuesday", "mittwoch": "Wednesday", "wednesday": "Wednesday", "wed": "Wednesday",
    "donnerstag": "Thursday", "thursday": "Thursday", "thu": "Thursday", "freitag": "Friday",
    "friday": "Friday", "fri": "Friday", "samstag": "Saturday", "sonnabend": "Saturday",
    "saturday": "Saturday", "sonntag": "Sunday", "sunday": "Sunday",
}
_NAME_STOP = _wordset("""
pdf crm datev sap mail email e rechnung rechnungen invoice invoices ticket meeting termin call
uhr portal export betreff subject thema topic heute morgen uebermorgen today tomorrow tonight
nachricht message q1 q2 q3 q4
""") | {normalize(m) for m in _MONTHS if len(m) > 3} | set(_WEEKDAYS)
_INTRO = _wordset("""firma fa company kunde kunden kundin customer client mandant mandanten
account unternehmen lieferant lieferanten supplier vendor""")
_KEEP_INTRO = frozenset({"firma"})  # "Firma X" is how people name a company: keep it
_LEGAL = _wordset("""gmbh ag kg kgaa se ug ohg gbr ltd limited inc llc corp corporation plc
sa sarl bv nv ab oy lp llp""")
_LEGAL_CAPS = _wordset("ag kg se ug sa ab bv nv oy lp")  # 'ab', 'se' are words too
_ARTICLES = _wordset("""dem der den die the my our meinem meiner meinen unserem unserer
unseren einem einer a an""")
_LEADING = re.compile(r"^(?:(?:the|a|an|der|die|das|den|dem|ein|eine|einen)\s+)+", re.I)


def _nameish(tok: Tok) -> bool:
    return not (tok.masked or tok.norm in STOPWORDS or tok.norm in _NAME_STOP
                or tok.norm in _INTRO or tok.text.isdigit())


def _name_run(doc: Doc, j: int, *, lower_ok: bool, limit: int = 4) -> int:
    """End (exclusive) of the name starting at token ``j``; ``j`` when there is none.

    Capitalised words (or lower-case ones when ``lower_ok``), joined by nothing but spaces,
    ``&``, ``-`` or ``und``/``and`` before another capitalised word.
    """
    toks, n = doc.tokens, len(doc.tokens)
    if j >= n or not _nameish(toks[j]):
        return j
    upper = toks[j].text[:1].isupper() or toks[j].text[:1].isdigit()
    if not upper and not lower_ok:
        return j
    k = j + 1
    while k < n and k - j < limit and not doc.boundary(k):
        tok = toks[k]
        if (upper and tok.norm in ("und", "and") and k + 1 < n and not doc.boundary(k + 1)
                and toks[k + 1].text[:1].isupper() and _nameish(toks[k + 1])):
            k += 2
            continue
        if not _nameish(tok) or (tok.text[:1].isupper() or tok.text[:1].isdigit()) != upper:
            break
        k += 1
    return k


def _span(doc: Doc, i: int, k: int) -> Hit:
    start, end = doc.tokens[i].start, doc.tokens[k - 1].end
    return doc.text[start:end], start, end


# -------------------------------------------------------------------------- extractors


@_memo
def emails(doc: Doc) -> Iterator[Hit]:
    """E-mail addresses, in order."""
    yield from doc.emails


@_memo
def urls(doc: Doc) -> Iterator[Hit]:
    """URLs, with ``https://`` added to bare domains."""
    yield from sorted(doc.urls, key=lambda h: h[1])


@_memo
def quoted(doc: Doc) -> Iterator[Hit]:
    """Text in quotes ("…", „…“, «…», '…'), without the quotes."""
    for m in _QUOTED.finditer(doc.text):
        yield m.group()[1:-1].strip(), m.start(), m.end()


@_memo
def companies(doc: Doc) -> Iterator[Hit]:
    """Company names: "Müller GmbH", "ACME AG", "Contoso Ltd", "Firma X", "Kunde Weber"."""
    toks, n = doc.tokens, len(doc.tokens)
    for i, tok in enumerate(toks):  # 1. a legal form and up to three words before it
        if tok.norm not in _LEGAL or tok.masked or i == 0:
            continue
        if tok.norm in _LEGAL_CAPS and not tok.text.isupper():
            continue
        if i + 1 < n and not doc.boundary(i + 1) and toks[i + 1].norm in _LEGAL | {"co"}:
            continue  # "GmbH & Co. KG": the longer name ends later
        j = i
        while j > 0 and i - j < 4 and not doc.boundary(j) and _nameish(toks[j - 1]) and (
                toks[j - 1].text[:1].isupper() or not doc.has_upper or toks[j - 1].norm == "co"):
            j -= 1
        if j < i:
            yield doc.text[toks[j].start:tok.end], toks[j].start, tok.end
    for i, tok in enumerate(toks):  # 2. "Firma X", "Kunde Weber", "customer Contoso"
        if tok.norm not in _INTRO or tok.masked:
            continue
        j = i + 1
        if j < n and toks[j].norm in ("namens", "named", "called"):
            j += 1
        if j < n and doc.boundary(j):
            continue
        k = _name_run(doc, j, lower_ok=not doc.has_upper)
        if k > j:
            first = i if tok.norm in _KEEP_INTRO else j
            yield _span(doc, first, k)


@_memo
def persons(doc: Doc) -> Iterator[Hit]:
    """Who comes along: the name or address after "mit"/"with" ("mit Herrn Müller")."""
    toks, n = doc.tokens, len(doc.tokens)
    for i, tok in enumerate(toks):
        if tok.norm not in ("mit", "with") or tok.masked:
            continue
        j = i + 1
        while j < n and toks[j].norm in _ARTICLES and not doc.boundary(j):
            j += 1
        if j >= n or doc.boundary(j):
            continue
        if toks[j].masked:
            yield from (h for h in doc.emails if h[1] <= toks[j].start < h[2])
            continue
        k = _name_run(doc, j, lower_ok=True, limit=3)
        if k > j:
            yield _span(doc, j, k)


def clean_name(doc: Doc, start: int, end: int) -> Hit | None:
    """Trim a regex capture to the name at its start ("Stark Industries and" → ...)."""
    idx = doc.token_range(start, end)
    if not idx:
        return None
    k = _name_run(doc, idx[0], lower_ok=not doc.has_upper)
    return _span(doc, idx[0], min(k, idx[-1] + 1)) if k > idx[0] else None


def clean_text(doc: Doc, start: int, end: int) -> Hit | None:
    """Trim a free-text capture: whitespace, quotes, end punctuation, leading articles."""
    raw = doc.text[start:end]
    lead = len(raw) - len(raw.lstrip(" \t\"'„“«"))
    value = raw.strip(" \t\"'„“”«»").rstrip(".!?,;")
    article = _LEADING.match(value)
    if article:
        lead += article.end()
        value = value[article.end():]
    return (value, start + lead, start + lead + len(value)) if value else None


def pattern_hits(doc: Doc, patterns: Sequence[re.Pattern[str]], slot: str,
                 cleaner: Callable[[Doc, int, int], Hit | None] = clean_text) -> Iterator[Hit]:
    """The named group ``slot`` of every match of every pattern, cleaned."""
    for pattern in patterns:
        if slot not in pattern.groupindex:
            continue
        for m in pattern.finditer(doc.text):
            if m.group(slot):
                hit = cleaner(doc, *m.span(slot))
                if hit is not None:
                    yield hit


_COLON = re.compile(r"(?<![\d/]):(?=\s)")


@_memo
def after_colon(doc: Doc) -> Iterator[Hit]:
    """Everything after the first "word: " ("Ticket: Drucker im 2. OG defekt")."""
    m = _COLON.search(doc.text)
    if m:
        hit = clean_text(doc, m.end(), len(doc.text))
        if hit is not None:
            yield hit


_MONTH_RE = "|".join(sorted(_MONTHS, key=len, reverse=True))
_YEAR = r"((?:19|20)\d{2})"
_Q = re.compile(r"\bQ([1-4])(?:\s*[/-]?\s*((?:19|20)\d{2}|'\d{2}))?\b", re.I)
_QWORD = re.compile(r"\b(?:([1-4])\.\s*|(erst|zweit|dritt|viert|first|second|third|fourth)"
                    rf"\w*\s+)(?:quartal|quarter)\w*(?:\s+(?:of\s+)?{_YEAR})?", re.I)
_ORDINALS = {"erst": 1, "zweit": 2, "dritt": 3, "viert": 4, "first": 1, "second": 2,
             "third": 3, "fourth": 4}
_REL = re.compile(r"\b(letzt|vorig|vergangen|last|previous|past|dies|this|current|aktuell|"
                  r"laufend)\w*\s+(monat|month|quartal|quarter|jahr|year|woche|week)", re.I)
_REL_ONE = re.compile(r"\b(vormonat|vorquartal|vorjahr|vorwoche|ytd|year to date)\b", re.I)
_REL_WORDS = {"monat": "month", "quartal": "quarter", "jahr": "year", "woche": "week",
              "vormonat": "last month", "vorquartal": "last quarter", "vorjahr": "last year",
              "vorwoche": "last week", "ytd": "year to date", "year to date": "year to date"}
_MONTH = re.compile(rf"\b({_MONTH_RE})\b\.?(?:\s+{_YEAR})?", re.I)
_YEAR_ONLY = re.compile(rf"(?<![-.\d]){_YEAR}\b(?![-.]\d)")


@_memo
def periods(doc: Doc) -> Iterator[Hit]:
    """Reporting periods: quarters, months, relative periods, years."""
    text = doc.text
    for m in _Q.finditer(text):
        year = m.group(2) or ""
        year = "20" + year[1:] if year.startswith("'") else year
        yield f"Q{m.group(1)} {year}".strip(), m.start(), m.end()
    for m in _QWORD.finditer(text):
        q = m.group(1) or str(_ORDINALS[m.group(2).casefold()])
        yield f"Q{q} {m.group(3) or ''}".strip(), m.start(), m.end()
    for m in _REL.finditer(text):
        which = "last" if normalize(m.group(1)) in (
            "letzt", "vorig", "vergangen", "last", "previous", "past") else "this"
        unit = normalize(m.group(2))
        yield f"{which} {_REL_WORDS.get(unit, unit)}", m.start(), m.end()
    for m in _REL_ONE.finditer(text):
        yield _REL_WORDS[m.group(1).casefold()], m.start(), m.end()
    for m in _MONTH.finditer(text):
        word = m.group(1).casefold()
        before = text[:m.start()].split()[-1:]
        if word == "may" and not m.group(2) and before[:1] not in (["in"], ["for"], ["of"]):
            continue  # "may" is mostly the verb
        name = _MONTH_NAMES[_MONTHS[word] - 1]
        yield f"{name} {m.group(2) or ''}".strip(), m.start(), m.end()
    for m in _YEAR_ONLY.finditer(text):
        yield m.group(1), m.start(), m.end()


_WEEKDAY = re.compile(rf"\b({'|'.join(sorted(_WEEKDAYS, key=len, reverse=True))})\b", re.I)
_ISO_DATE = re.compile(r"\b((?:19|20)\d{2})-(\d{1,2})-(\d{1,2})\b")
_DMY = re.compile(r"\b(\d{1,2})\.(\d{1,2})\.((?:19|20)?\d{2})?(?!\d)")
_DAY_MONTH = re.compile(
    rf"\b(\d{{1,2}})(?:\.|st|nd|rd|th)?\s+(?:of\s+)?({_MONTH_RE})\b\.?(?:\s+{_YEAR})?", re.I)
_MONTH_DAY = re.compile(
    rf"\b({_MONTH_RE})\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s+{_YEAR})?", re.I)
_REL_DAY = re.compile(r"\b(übermorgen|uebermorgen|day after tomorrow|heute|today|tonight|"
                      r"morgen|tomorrow|nächste woche|naechste woche|next week)\b", re.I)
_REL_DAYS = {"uebermorgen": "day after tomorrow", "heute": "today", "tonight": "today",
             "morgen": "tomorrow", "naechste woche": "next week"}


def _date(year: str | None, month: int, day: int) -> str | None:
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return None
    if year is None:
        return f"{month:02d}-{day:02d}"
    full = int(year) + (2000 if len(year) == 2 else 0)
    return f"{full:04d}-{month:02d}-{day:02d}"


@_memo
def dates(doc: Doc) -> Iterator[Hit]:
    """Meeting dates: ISO or German dates, "12. März", weekdays, "morgen"/"tomorrow"."""
    text = doc.text
    found: list[tuple[str | None, re.Match[str]]] = []
    found += [(_date(m[1], int(m[2]), int(m[3])), m) for m in _ISO_DATE.finditer(text)]
    found += [(_date(m[3], int(m[2]), int(m[1])), m) for m in _DMY.finditer(text)]
    found += [(_date(m[3], _MONTHS[m[2].casefold()], int(m[1])), m)
              for m in _DAY_MONTH.finditer(text)]
    found += [(_date(m[3], _MONTHS[m[1].casefold()], int(m[2])), m)
              for m in _MONTH_DAY.finditer(text)]
    found += [(_WEEKDAYS[m[1].casefold()], m) for m in _WEEKDAY.finditer(text)]
    for m in _REL_DAY.finditer(text):
        if re.search(r"\b(?:guten|good)\s+$", text[:m.start()], re.I):
            continue  # "Guten Morgen" is a greeting
        word = normalize(m[1])
        found.append((_REL_DAYS.get(word, word), m))
    for value, m in found:
        if value:
            yield value, m.start(), m.end()


_T_AMPM = re.compile(r"\b(\d{1,2})(?::(\d{2}))?\s*([ap])\.?\s?m\b\.?", re.I)
_T_UHR = re.compile(r"\b(\d{1,2})(?:[:.](\d{2}))?\s*uhr\b", re.I)
_T_HHMM = re.compile(r"\b(\d{1,2}):(\d{2})\b")
_T_HALB = re.compile(r"\bhalb\s+(\d{1,2})\b", re.I)
_T_AT = re.compile(r"\b(?:um|at|ab|gegen|around)\s+(\d{1,2})\b(?![.:]\d|\s*(?:uhr|[ap]\.?\s?m\b))",
                   re.I)


@_memo
def times(doc: Doc) -> Iterator[Hit]:
    """Clock times as ``HH:MM``: "10 Uhr", "10:30", "3pm", "halb 10", "um 10"."""
    text = doc.text
    for m in _T_AMPM.finditer(text):
        hour, minute = int(m[1]), int(m[2] or 0)
        if 1 <= hour <= 12 and minute < 60:
            hour = hour % 12 + (12 if m[3].lower() == "p" else 0)
            yield f"{hour:02d}:{minute:02d}", m.start(), m.end()
    for pattern in (_T_UHR, _T_HHMM, _T_AT):
        for m in pattern.finditer(text):
            hour, minute = int(m[1]), int(m[2] or 0) if pattern is not _T_AT else 0
            if hour < 24 and minute < 60:
                yield f"{hour:02d}:{minute:02d}", m.start(), m.end()
    for m in _T_HALB.finditer(text):
        if 1 <= int(m[1]) <= 24:
            yield f"{int(m[1]) - 1:02d}:30", m.start(), m.end()


def residual(doc: Doc, blank: set[int], content: set[int]) -> Hit | None:
    """The free text left when the ``blank`` tokens (keywords, other slots) are removed.

    Runs of remaining words are split at punctuation and trimmed of stop words. The best
    run holds a content keyword (``strip: false`` group), touches a removed keyword or slot,
    and is longest — in that order.
    """
    toks, n = doc.tokens, len(doc.tokens)
    best: tuple[int, int] | None = None
    best_key: tuple[bool, bool, int, int] | None = None
    i = 0
    while i < n:
        if i in blank or toks[i].masked:
            i += 1
            continue
        j = i + 1
        while j < n and j not in blank and not toks[j].masked and not doc.boundary(j):
            j += 1
        touches = ((i > 0 and i - 1 in blank and not doc.boundary(i))
                   or (j < n and j in blank and not doc.boundary(j)))
        s, e = i, j
        while s < e and toks[s].norm in STOPWORDS:
            s += 1
        while e > s and toks[e - 1].norm in STOPWORDS:
            e -= 1
        if s < e:
            key = (any(k in content for k in range(s, e)), touches, e - s, -s)
            if best_key is None or key > best_key:
                best, best_key = (s, e), key
        i = j
    if best is None:
        return None
    value, start, _ = _span(doc, *best)
    stripped = value.strip("\"'„“”«»")
    return stripped, start + value.index(stripped), start + value.index(stripped) + len(stripped)
