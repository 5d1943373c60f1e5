"""A font with Japanese glyphs for every plot, from a PyPI package rather than the system.

matplotlib's own DejaVu Sans has no kana or kanji, so a Japanese verb or label is drawn as
empty boxes. The `japanize-matplotlib` wheel ships IPAexGothic (IPA Font License) as a plain
file; we register that file with matplotlib's font manager and put it after DejaVu Sans in the
family list, so Latin text looks as before and each glyph DejaVu lacks falls back to
IPAexGothic (matplotlib >= 3.6 falls back per glyph). The package's own module is never
imported: it sets the global rc on import and needs `distutils`, which Python 3.12 removed.

Used by `inspect` (verbs, lengths) before it draws; `use_japanese_font()` is idempotent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

FONT_PACKAGE = "japanize_matplotlib"
FONT_FILE = "fonts/ipaexg.ttf"  # inside the package folder
FONT_NAME = "IPAexGothic"
LATIN_FONT = "DejaVu Sans"  # matplotlib's default, bundled with it


def japanese_font_path() -> Path:
    """The IPAexGothic file inside the installed `japanize-matplotlib` wheel."""
    spec = importlib.util.find_spec(FONT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the `japanize-matplotlib` package is not installed (pip install japanize-matplotlib); "
                           f"plots need its {FONT_NAME} font for Japanese text")
    path = Path(next(iter(spec.submodule_search_locations))) / FONT_FILE
    if not path.is_file():
        raise RuntimeError(f"{path}: {FONT_NAME} is missing from the japanize-matplotlib package")
    return path


def use_japanese_font() -> str:
    """Register IPAexGothic and make it the fallback after DejaVu Sans; returns the font's name."""
    import matplotlib
    from matplotlib import font_manager

    path = japanese_font_path()
    if not any(Path(entry.fname) == path for entry in font_manager.fontManager.ttflist):
        font_manager.fontManager.addfont(str(path))
    # A list of concrete families (not the generic "sans-serif") is what turns on per-glyph fallback.
    matplotlib.rcParams["font.family"] = [LATIN_FONT, FONT_NAME]
    return FONT_NAME
