"""Finding and checking SparseML recipes before any training starts."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

from sparsebert.errors import UserError


class RecipeError(UserError):
    pass


def recipe_path(name_or_path: str) -> Path:
    """A recipe file: a path, or the name of one shipped in ``recipes/`` (e.g. ``sparsebert``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = importlib.resources.files("sparsebert.recipes") / f"{name_or_path}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    raise RecipeError(f"recipe not found: {name_or_path}")


def parse_recipe_args(text: str | None, flag: str = "--recipe-args", example: str = '{"final_sparsity": 0.9}') -> dict:
    if not text:
        return {}
    try:
        args = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecipeError(f"{flag} is not valid JSON: {e.msg}") from None
    if not isinstance(args, dict):
        raise RecipeError(f"{flag} must be a JSON object, e.g. '{example}'")
    return args


def recipe_variables(path: Path) -> dict:
    """The recipe's top-level variables (``num_epochs``, ``final_sparsity``...), as written."""
    import yaml

    try:
        variables = yaml.safe_load(_strip_tags(Path(path).read_text()))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: malformed YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(variables, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping")
    return {k: v for k, v in variables.items() if not k.endswith("modifiers") and k != "version"}


def pruning_targets(path: Path) -> list[tuple[list[str], float, bool]]:
    """Each pruning modifier's ``params`` (names or ``re:`` patterns), ``final_sparsity``, and
    whether it ranks its matrices together (global: the target holds for them as a whole)."""
    return [(list(m.params), m.final_sparsity, bool(getattr(m, "global_sparsity", False)))
            for m in check_recipe(Path(path), {}) if hasattr(m, "final_sparsity") and hasattr(m, "params")]


def pruned_params(path: Path) -> list[str]:
    """The matrices a student trained with the recipe is measured and gated on."""
    return [p for params, _, _ in pruning_targets(path) for p in params]


def pruned_params_of_text(text: str) -> list[str]:
    """``pruned_params`` of a recipe given as its text."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sparsebert-recipe-") as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_text(text)
        return pruned_params(path)


def check_recipe(path: Path, recipe_args: dict) -> list:
    """Build the recipe's modifiers the way SparseML will, so a malformed file, an unknown
    modifier, an unknown variable or a target sparsity outside [0, 1) fails now with one line.
    """
    from sparseml.pytorch.optim import ScheduledModifierManager

    variables = recipe_variables(path)
    unknown = sorted(set(recipe_args) - set(variables))
    if unknown:
        raise RecipeError(f"{path}: unknown recipe variable(s) {unknown}; known: {sorted(variables)}")
    sparsity = recipe_args.get("final_sparsity", variables.get("final_sparsity"))
    if sparsity is not None and not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
        raise RecipeError(f"final_sparsity must be in [0, 1), got {sparsity!r}")
    try:
        manager = ScheduledModifierManager.from_yaml(str(path), recipe_variables=recipe_args)
    except Exception as e:  # SparseML raises bare ValueError/ConstructorError/KeyError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"{path}: invalid recipe: {first}") from None
    modifiers = list(manager.iter_modifiers())
    for modifier in modifiers:
        _check_mask_type(path, modifier)
        if isinstance(getattr(modifier, "params", None), str):  # __ALL__, __ALL_PRUNABLE__
            raise RecipeError(f"{path}: {type(modifier).__name__} params {modifier.params!r}: list the "
                              "matrices (names or re: patterns), so they can be measured and gated")
    return modifiers


def _check_mask_type(path: Path, modifier) -> None:
    """GMP takes any ``mask_type`` and fails at its first mask update, minutes into training;
    SparseML's own factory says now whether it names a mask it can make."""
    from sparseml.pytorch.sparsification.pruning.mask_creator import get_mask_creator_default

    mask_type = getattr(modifier, "mask_type", None)
    if mask_type is None:
        return
    try:
        get_mask_creator_default(mask_type)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{path}: mask_type {mask_type!r} is not one SparseML makes "
                          f"(unstructured, block4, N:M, [rows, columns]): {str(e).splitlines()[0]}") from None


def _strip_tags(text: str) -> str:
    """YAML without SparseML's ``!Modifier`` tags, to read the recipe's variables safely."""
    import re

    return re.sub(r"!\w+", "", text)
