"""Country codes and English names.

Names come from pycountry (ISO 3166-1): the short ``common_name`` where pycountry has one ("Bolivia",
"South Korea", "Taiwan", "Vietnam", "Iran"), else ``name``, except for a few ISO names written in inverted
"X, Y of" form that pycountry gives no common name for (overrides below). ``XK`` (Kosovo) is not in
ISO 3166-1 but is used by GeoNames; it is added by hand. An unknown code is its own name.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable, Sequence

from gazetteer.errors import InputError

# ISO names that read badly in a label and have no pycountry common_name; plus XK, which pycountry lacks.
NAME_OVERRIDES = {
    "CD": "Democratic Republic of the Congo",
    "FM": "Micronesia",
    "PS": "Palestine",
    "VG": "British Virgin Islands",
    "VI": "U.S. Virgin Islands",
    "VA": "Vatican City",
    "XK": "Kosovo",
}

# Codes people type that are not ISO 3166-1 alpha-2 (used only for "did you mean" hints).
COMMON_ALIASES = {"UK": "GB", "EL": "GR"}


@functools.lru_cache(maxsize=None)
def country_name(cc: str) -> str:
    """ISO2 code -> English display name (see module docstring); unknown codes return the code itself."""
    if cc in NAME_OVERRIDES:
        return NAME_OVERRIDES[cc]
    import pycountry

    record = pycountry.countries.get(alpha_2=cc)
    if record is None:
        return cc
    return getattr(record, "common_name", None) or record.name


def parse_country_codes(value: str | Iterable[str] | None, available: Sequence[str]) -> tuple[str, ...] | None:
    """``"FR,de"`` or ``["FR", "DE"]`` -> sorted unique upper-case codes, each one of `available`.

    None/empty passes through as None (no restriction). InputError for an unknown code, naming it and
    suggesting the closest known code (by spelling, alias such as UK -> GB, or English name).
    """
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    codes = [str(item).strip().upper() for item in items if str(item).strip()]
    if not codes:
        return None
    known = set(available)
    for code in codes:
        if code not in known:
            raise InputError(f"--within: unknown country code {code!r}{_suggest(code, available)} "
                             "(expected ISO 3166-1 alpha-2 codes with places in GeoNames, e.g. FR,DE)")
    return tuple(sorted(set(codes)))


def _suggest(code: str, available: Sequence[str]) -> str:
    if code in COMMON_ALIASES and COMMON_ALIASES[code] in available:
        alias = COMMON_ALIASES[code]
        return f"; did you mean {alias} ({country_name(alias)})?"
    by_name = {country_name(cc).upper(): cc for cc in available}
    if code in by_name:
        return f"; did you mean {by_name[code]} ({country_name(by_name[code])})?"
    names = difflib.get_close_matches(code, list(by_name), n=1, cutoff=0.75)
    if len(code) > 3 and names:
        cc = by_name[names[0]]
        return f"; did you mean {cc} ({country_name(cc)})?"
    close = difflib.get_close_matches(code, list(available), n=1, cutoff=0.0)
    if close:
        return f"; did you mean {close[0]} ({country_name(close[0])})?"
    return ""
