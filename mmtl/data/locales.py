"""Per-locale captions kept in sidecar files next to a split's shards, and the seeded per-sample locale draw.

A split folder may hold ``captions.<locale>.json`` files (written for the emoji set by
:mod:`mmtl.datasets.emoji_locales`, or by hand for user shards): ``{"captions": {sample key: caption},
"missing": [keys]}``. The shard's own caption is locale ``en`` (:data:`ENGLISH`). A sample without a caption
in a locale is not given the English one: it is counted (``missing``) and that locale is not drawn for it.
"""
from __future__ import annotations

import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

SIDECAR = "captions.{locale}.json"
ENGLISH = "en"


def shard_keys(path: str | Path) -> list[str]:
    """Sample keys of a local WebDataset tar (member names up to the first '.', basename only), in order."""
    keys: dict[str, None] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            if m.isfile():
                keys.setdefault(m.name.rsplit("/", 1)[-1].split(".", 1)[0], None)
    return list(keys)


def sidecar_locales(split_dir: str | Path) -> list[str]:
    """Locales with a sidecar in ``split_dir`` (sorted), ``en`` not included."""
    prefix, suffix = SIDECAR.split("{locale}")
    return sorted(p.name[len(prefix):-len(suffix)] for p in Path(split_dir).glob(SIDECAR.format(locale="*")))


def split_dir_of(spec) -> Path:
    """The folder of a shard spec: the folder itself, or the parent of a shard file / the first list entry."""
    first = spec[0] if isinstance(spec, (list, tuple)) else spec
    p = Path(str(first).removeprefix("file://"))
    return p if p.is_dir() else p.parent


def load_locale(split_dir: str | Path, locale: str) -> dict[str, str]:
    """``{sample key: caption}`` of ``locale`` in ``split_dir``.

    Raises:
        ValueError: no sidecar for ``locale``; the message lists the locales that have one.
    """
    path = Path(split_dir) / SIDECAR.format(locale=locale)
    if not path.is_file():
        have = sidecar_locales(split_dir)
        raise ValueError(f"no captions for locale {locale!r} in {split_dir}; available: "
                         f"{', '.join([ENGLISH, *have])} (emoji: mmtl datasets emoji --locales {locale})")
    return dict(json.loads(path.read_text(encoding="utf-8"))["captions"])


def resolve_locales(split_dir: str | Path, spec: str | list[str]) -> list[str]:
    """``"all"`` -> ``en`` + every sidecar locale; a list / ``"de,fr"`` -> checked list (ValueError naming the
    available ones when a code has no sidecar)."""
    have = [ENGLISH, *sidecar_locales(split_dir)]
    if isinstance(spec, str):
        if spec.strip() == "all":
            return have
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in spec if s not in have]
    if unknown or not spec:
        raise ValueError(f"unknown locale(s) {', '.join(unknown) or '(none given)'} for {split_dir}; available: "
                         f"{', '.join(have)}")
    return list(dict.fromkeys(spec))


@dataclass
class LocaleMix:
    """Draws one caption per (sample, epoch) among the locales that have one, with weights ``mix``.

    ``mix``: ``{locale: weight}`` (``en`` = the shard's caption); weights need not sum to 1. The draw is
    ``random.Random(f"{seed}:{epoch}:{key}")``: the same seed, epoch and key give the same locale on any
    worker and in any order. ``counts`` tallies drawn locales and ``missing:<locale>`` (a weighted locale with
    no caption for the sample).
    """

    captions: dict[str, dict[str, str]]
    mix: dict[str, float]
    seed: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, split_dir: str | Path, mix: dict[str, float], seed: int = 0) -> LocaleMix:
        """Load the sidecars of the weighted locales; ValueError for a locale without one or no positive weight."""
        if not mix or all(w <= 0 for w in mix.values()) or any(w < 0 for w in mix.values()):
            raise ValueError(f"locale mix {mix}: weights must be >= 0 with at least one > 0")
        caps = {loc: load_locale(split_dir, loc) for loc in mix if loc != ENGLISH}
        return cls(captions=caps, mix=dict(mix), seed=seed)

    def pick(self, key: str, epoch: int, has) -> str | None:
        """The locale drawn for sample ``key`` in ``epoch`` among the weighted locales for which ``has(locale)``
        is true (others counted as ``missing:<locale>``); None when there is none."""
        options, weights = [], []
        for loc, w in self.mix.items():
            if w <= 0:
                continue
            if not has(loc):
                self.counts[f"missing:{loc}"] = self.counts.get(f"missing:{loc}", 0) + 1
                continue
            options.append(loc)
            weights.append(w)
        if not options:
            return None
        loc = random.Random(f"{self.seed}:{epoch}:{key}").choices(options, weights)[0]
        self.counts[loc] = self.counts.get(loc, 0) + 1
        return loc

    def caption(self, key: str, english: str, epoch: int) -> tuple[str, str]:
        """(caption, locale) for sample ``key`` in ``epoch`` (:meth:`pick`); when no weighted locale has a caption
        the English one is used and counted as ``fallback_en``."""
        loc = self.pick(key, epoch, lambda lc: lc == ENGLISH or key in self.captions[lc])
        if loc is None:
            self.counts["fallback_en"] = self.counts.get("fallback_en", 0) + 1
            return english, ENGLISH
        return (english if loc == ENGLISH else self.captions[loc][key]), loc


def caption_mix(spec, split_dir: str | Path) -> dict[str, float] | None:
    """``data.caption_locales`` -> ``{locale: weight}``: None stays None, ``"all"`` = weight 1 for ``en`` and
    every sidecar locale of ``split_dir``, a dict is checked against the sidecars (ValueError naming the
    available ones)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        return {loc: 1.0 for loc in resolve_locales(split_dir, spec)}
    resolve_locales(split_dir, list(spec))
    return {str(k): float(v) for k, v in spec.items()}
