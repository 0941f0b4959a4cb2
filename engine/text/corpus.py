"""Real multilingual text, written by others, for checking and timing the preprocessor.

Two sources, both read deterministically (same lines, same order, every run):

- `cldr_lines()`: the Unicode CLDR data that the pinned PyPI package `babel` ships (names of
  languages, territories, scripts, currencies, months and days, as translated in every base locale
  of CLDR, in about a hundred scripts). Names are joined into lines of 1 to 80 names with ", ", so
  that there are short lines and lines far longer than 128 tokens. Always available.
- `gettext_lines()`: translated program messages from the machine's gettext catalogs
  (/usr/share/locale/*/LC_MESSAGES/*.mo: GLib, GTK, Linux-PAM, coreutils, apt, grep, ...), real
  sentences with punctuation, placeholders and multi-line help texts, plus the English originals.
  Empty where the machine has no catalogs.
"""

from __future__ import annotations

import gettext
import glob
import os

_CLDR_CHUNKS = (1, 3, 1, 8, 2, 24, 1, 5, 80)
GETTEXT_ROOT = "/usr/share/locale"
GETTEXT_CATALOGS = ("glib20.mo", "gtk20.mo", "gdk-pixbuf.mo", "Linux-PAM.mo", "coreutils.mo",
                    "apt.mo", "grep.mo")


def cldr_lines() -> list[str]:
    """Lines of CLDR names from `babel` (raises ImportError without it)."""
    from babel import Locale, localedata

    seen: set[str] = set()
    lines: list[str] = []
    k = 0
    for ident in sorted(i for i in localedata.locale_identifiers() if "_" not in i):
        loc = Locale.parse(ident)
        names: list[str] = []
        for attr in ("languages", "territories", "scripts", "currencies"):
            names.extend(v for _, v in sorted(getattr(loc, attr).items()) if isinstance(v, str))
        for table in (loc.months, loc.days):
            for context in sorted(table):
                for width in sorted(table[context]):
                    names.extend(v for _, v in sorted(table[context][width].items()) if isinstance(v, str))
        fresh = []
        for name in names:
            if name and name not in seen:
                seen.add(name)
                fresh.append(name)
        i = 0
        while i < len(fresh):
            size = _CLDR_CHUNKS[k % len(_CLDR_CHUNKS)]
            k += 1
            lines.append(", ".join(fresh[i:i + size]))
            i += size
    return lines


def _catalog(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return gettext.GNUTranslations(f)._catalog
    except Exception:  # a catalog in a legacy encoding or a damaged one: not ours to judge
        return {}


def gettext_lines(root: str = GETTEXT_ROOT, per_catalog: int = 20, english: int = 3000) -> list[str]:
    """Up to `per_catalog` translated messages of each catalog in each language (evenly spaced over
    the msgids), then up to `english` distinct English originals. [] when there are no catalogs."""
    lines: list[str] = []
    msgids: set[str] = set()
    for lang_dir in sorted(glob.glob(os.path.join(root, "*", "LC_MESSAGES"))):
        for name in GETTEXT_CATALOGS:
            path = os.path.join(lang_dir, name)
            if not os.path.isfile(path):
                continue
            catalog = _catalog(path)
            items = sorted((k if isinstance(k, str) else f"{k[0]}\x00{k[1]}", v) for k, v in catalog.items()
                           if (k if isinstance(k, str) else k[0]) and isinstance(v, str) and v)
            msgids.update(k.split("\x00")[0] for k, _ in items)
            if items:
                step = max(1, len(items) // per_catalog)
                lines.extend(v for _, v in items[::step][:per_catalog])
    originals = sorted(msgids)
    if originals:
        step = max(1, len(originals) // english)
        lines.extend(originals[::step][:english])
    return lines
