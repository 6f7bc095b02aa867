"""Architecture rules that CI enforces (ARCHITECTURE.md): the import-linter layers contract, no cross-folder
imports of private names, one place per registry, and the "where to add" table naming files that exist."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mmtl"


def _modules():
    for f in sorted(PKG.rglob("*.py")):
        yield f, ast.parse(f.read_text(), filename=str(f))


def test_layers_contract_holds():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    out = subprocess.run([exe, str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def test_no_private_names_imported_across_folders():
    bad = []
    for f, tree in _modules():
        here = f.parent
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmtl"):
                target = PKG.parent / Path(*node.module.split("."))
                folder = target if target.is_dir() else target.parent
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__") and folder != here:
                        bad.append(f"{f.relative_to(ROOT)}:{node.lineno} imports {node.module}.{alias.name}")
    assert not bad, "\n".join(bad)


def test_no_import_strings_for_dispatch():
    offenders = [str(f.relative_to(ROOT)) for f, _ in _modules() if "import_module(" in f.read_text()]
    assert offenders == []


def test_strategy_and_recipe_registries_cover_every_kind():
    from mmtl.recipes import RECIPES, recipe_for
    from mmtl.strategies import STRATEGIES

    assert set(STRATEGIES) == {"frozen", "full", "lora", "prompt_tuning", "cross_attention", "self_supervised"}
    from mmtl.models.family import TextGeneration, capability
    from mmtl.models.registry import family_names, get_family

    assert set(RECIPES) == {"contrastive", "prompt_learning", "fusion", "captioning", "self_supervised"}
    generative = {capability(get_family(f), TextGeneration) for f in family_names()} - {None}
    assert {s.recipe for s in STRATEGIES.values()} | {g.recipe_name() for g in generative} == set(RECIPES)
    assert recipe_for("frozen", "blip").__name__ == "CaptioningRecipe"
    assert recipe_for("lora").__name__ == "ContrastiveRecipe" and recipe_for("cross_attention").__name__ == "FusionRecipe"
    assert recipe_for("self_supervised").__name__ == "SelfSupervisedRecipe"


def test_unknown_strategy_kind_is_refused_with_the_known_ones():
    import pytest

    from mmtl.recipes import recipe_for
    from mmtl.strategies import get_strategy

    with pytest.raises(ValueError, match=r"strategy.kind='dino' is unknown \(known: frozen, full, lora"):
        get_strategy("dino")
    with pytest.raises(ValueError, match=r"strategy.kind='dino' is unknown"):
        recipe_for("dino")


def test_architecture_md_names_files_that_exist():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    paths = set(re.findall(r"`(mmtl/[\w/]+\.py)`", text))
    assert len(paths) >= 10
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing


def test_a_new_strategy_needs_only_its_registry_entry(monkeypatch):
    """ARCHITECTURE.md: a contrastive strategy is its file + one STRATEGIES entry: no recipe or schema change."""
    from conftest import tiny_pipeline
    from mmtl.config import build_pipeline
    from mmtl.models import build_model
    from mmtl.recipes import check_pipeline, recipe_for
    from mmtl.recipes.contrastive import ContrastiveRecipe
    from mmtl.strategies import STRATEGIES, apply_strategy
    from mmtl.strategies.base import Strategy, freeze

    class HeadsOnlyText(Strategy):
        kind = "heads_only_text"

        def apply(self, model, cfg, zero_stage=None):
            freeze(model)
            freeze(model.text_head, False)

    monkeypatch.setitem(STRATEGIES, "heads_only_text", HeadsOnlyText())
    pipe = build_pipeline(tiny_pipeline({"train": "x", "val": None, "test": "y"}, Path("/tmp/unused"),
                                        strategy={"kind": "heads_only_text"}))
    check_pipeline(pipe)
    assert recipe_for("heads_only_text") is ContrastiveRecipe
    model = build_model(pipe.model)
    counts = apply_strategy(model, pipe.strategy)
    assert counts["params_trainable"] == sum(p.numel() for p in model.text_head.parameters())
