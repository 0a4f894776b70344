"""Built-in model cards: what the tuner knows about a model without reading any file.

A card (``models/<key>.yaml`` in the shipped catalogs, :func:`tuner.paths.catalog_dir`; edited in the repository's
``profiles/``) holds the GGUF hyperparameters of one model, the Hub repos that carry its GGUFs, known file sizes,
sampling presets and notes. Together with the quant recipes (``models/_recipes.yaml``: which ggml type
llama-quantize gives each tensor class, derived from src/llama-quant.cpp) a card yields the full
:class:`~tuner.layout.ModelLayout` of any of its quants offline: the tensor names and shapes come from
:func:`tuner.shapes.tensor_shapes` (the one shape table of the package), the types from the recipe, and
:func:`tuner.layout.layout_from_metadata` does the rest, as for a real header.

Uploaders do not ship llama-quantize's plain recipes: unsloth keeps every tensor outside the routed experts at q8_0,
for one. ``_recipes.yaml`` also holds their **mixes** (same schema, with where each comes from and how sure it is),
and a card maps each repo's quants to the mix its files carry (``repos[].mixes``). A plan is sized for the file it
names: :func:`quant_mix` picks the repo's own mix, or, when it is not recorded, the largest known file of that quant
(never a smaller one) with a note saying so. The card's known sizes check every mix (tests/test_cards.py).

``qwen3.5-35b-a3b:Q4_K_M`` names a card and a quant; :func:`card_candidates` is a card's whole ladder (the plain
quants, plus the uploader's own such as ``UD-Q4_K_XL`` where the repo's mix is recorded).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from tuner.candidate import QuantCandidate
from tuner.errors import TunerError
from tuner.flags import FLAGS, Kind
from tuner.ggml import GgmlType, ggml_type, tensor_bytes
from tuner.layout import ModelLayout, layout_from_metadata
from tuner.paths import CATALOG_ENV, catalog_dir, load_yaml
from tuner.shapes import tensor_shapes
from tuner.units import GiB, fmt_bytes
from tuner.untrusted import check_repo_id

CARDS_SUBDIR = "models"
RECIPES_FILE = "_recipes.yaml"  # files starting with "_" are not cards
DEFAULT_CARD = "qwen3.5-35b-a3b"
# The sampling-preset keys a card may set: each is the key of its llama-server flag in tuner.flags.FLAGS.
SAMPLING_KEYS: tuple[str, ...] = ("temp", "top_p", "top_k", "min_p", "presence_penalty")
REASONING_OFF_ARGS: tuple[str, ...] = tuple(FLAGS["reasoning"].to_args("off"))
HUB_MAX_FILE_BYTES = 50 * 10**9  # the Hub's per-file limit: bigger quants come split
# tensor_type_fallback (llama-quant.cpp:390-444): a row that is not a whole number of blocks gets a 32-block type.
_FALLBACK_TYPES: dict[str, str] = {
    "iq1_s": "iq4_nl", "iq1_m": "iq4_nl", "iq2_xxs": "iq4_nl", "iq2_xs": "iq4_nl", "iq2_s": "iq4_nl",
    "iq3_xxs": "iq4_nl", "iq3_s": "iq4_nl", "iq4_xs": "iq4_nl", "q2_K": "q4_0", "q3_K": "q4_0", "tq1_0": "q4_0",
    "tq2_0": "q4_0", "q4_K": "q5_0", "q5_K": "q5_1", "q6_K": "q8_0",
}
# Recipe class of a tensor, by its name after ``blk.N.`` (first match wins); see _recipes.yaml.
_BLOCK_RECIPE_CLASSES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), c) for p, c in (
        (r"^ffn_(gate|up|gate_up)_exps\.", "experts_gate_up"),
        (r"^ffn_down_exps\.", "experts_down"),
        (r"^ffn_(gate|up)_shexp\.", "shared_gate_up"),
        (r"^ffn_down_shexp\.", "shared_down"),
        (r"^ffn_gate_inp\.weight$", "router"),
        (r"^ffn_(gate|up)\.", "ffn_gate_up"),
        (r"^ffn_down\.", "ffn_down"),
        (r"^attn_q\.weight$", "attn_q"),
        (r"^attn_k\.weight$", "attn_k"),
        (r"^attn_v\.weight$", "attn_v"),
        (r"^attn_output\.weight$", "attn_output"),
        (r"^attn_qkv\.weight$", "deltanet_qkv"),
        (r"^attn_gate\.weight$", "deltanet_gate"),
        (r"^ssm_out\.weight$", "deltanet_out"),
        (r"^ssm_(alpha|beta)\.weight$", "deltanet_alpha_beta"),
        (r"^nextn\.eh_proj\.weight$", "mtp_proj"),
        (r"(norm\.weight|^ssm_conv1d\.weight|^ssm_a|^ssm_dt\.bias|^ffn_gate_inp_shexp\.weight)$", "small"),
    )
)
RECIPE_CLASSES: tuple[str, ...] = (
    "experts_gate_up", "experts_down", "shared_gate_up", "shared_down", "ffn_gate_up", "ffn_down", "attn_q",
    "attn_k", "attn_v", "attn_output", "deltanet_qkv", "deltanet_gate", "deltanet_out", "deltanet_alpha_beta",
    "mtp_proj", "router", "small", "token_embd", "output",
)
#: How sure a mix is (see _recipes.yaml): llama-quantize's own recipe, a real header's type counts, known sizes
#: reproduced to the byte, or a file size alone.
CONFIDENCES: tuple[str, ...] = ("llama-quantize", "header", "size", "guess")
_WHERE_RE = re.compile(r"^layer\s*<\s*(?:(\d+)|n\s*/\s*(\d+))$")
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


# --- recipes ------------------------------------------------------------------------------------------------------

def use_more_bits(layer: int, n_layer: int) -> bool:
    """llama-quant.cpp:452-454, with C integer semantics (``%`` truncates toward zero)."""
    eighth = n_layer // 8
    if layer < eighth or layer >= 7 * n_layer // 8:
        return True
    return (layer - eighth) % 3 == 2  # layer >= eighth here, so Python and C agree


@dataclass(frozen=True)
class TypeRule:
    """The ggml type of one tensor class; ``upgrade`` replaces it on the layers ``where`` selects."""

    type: str
    upgrade: str | None = None
    where: str | None = None  # "more_bits" | "layer < K" | "layer < n/K"

    def type_for(self, layer: int | None, n_layer_all: int) -> str:
        if self.upgrade is None or self.where is None or layer is None:
            return self.type
        if self.where == "more_bits":
            hit = use_more_bits(layer, n_layer_all)
        else:
            m = _WHERE_RE.match(self.where)
            if not m:
                raise TunerError(f"quant recipe: cannot read layer rule {self.where!r}")
            limit = int(m.group(1)) if m.group(1) else n_layer_all // int(m.group(2))
            hit = layer < limit
        return self.upgrade if hit else self.type


@dataclass(frozen=True)
class Recipe:
    """One llama-quantize file type (``quant`` is its label), or an uploader's mix (``quant`` is the mix's name):
    the ggml type of every tensor class, where it comes from and how sure it is (:data:`CONFIDENCES`)."""

    quant: str
    ftype: str
    types: Mapping[str, TypeRule]
    source: str = ""
    confidence: str = "llama-quantize"

    @property
    def name(self) -> str:
        return self.quant

    def type_name(self, recipe_class: str, layer: int | None, n_layer_all: int) -> str:
        rule = self.types.get(recipe_class)
        if rule is None:
            raise TunerError(f"quant recipe {self.quant} has no type for tensor class {recipe_class!r}")
        return rule.type_for(layer, n_layer_all)


def recipe_class(name: str) -> str:
    """The recipe class of a tensor (see ``_recipes.yaml``)."""
    if name == "token_embd.weight":
        return "token_embd"
    if name == "output.weight":
        return "output"
    if name == "output_norm.weight":
        return "small"
    m = _BLOCK_RE.match(name)
    if m:
        for pattern, cls in _BLOCK_RECIPE_CLASSES:
            if pattern.search(m.group(2)):
                return cls
    raise TunerError(f"no quant recipe class for tensor {name!r}")


def _parse_rule(value: Any, where: str) -> TypeRule:
    if isinstance(value, str):
        rule = TypeRule(value)
    elif isinstance(value, dict) and "type" in value:
        rule = TypeRule(str(value["type"]), value.get("upgrade"), value.get("where"))
    else:
        raise TunerError(f"{where}: expected a ggml type or {{type, upgrade, where}}, got {value!r}")
    for name in (rule.type, rule.upgrade):
        if name is not None:
            ggml_type(name)  # raises on a typo
    if rule.upgrade is not None and rule.where != "more_bits" and not _WHERE_RE.match(str(rule.where)):
        raise TunerError(f"{where}: cannot read layer rule {rule.where!r}")
    return rule


def _parse_recipe(name: str, body: Any, source: Path, *, mix: bool) -> Recipe:
    what = "mix" if mix else "recipe"
    types = body.get("types") if isinstance(body, dict) else None
    if not isinstance(types, dict):
        raise TunerError(f"{source}: {what} {name} has no 'types' mapping")
    unknown = [str(c) for c in types if c not in RECIPE_CLASSES]
    if unknown:
        raise TunerError(f"{source}: {what} {name} names unknown tensor classes {', '.join(unknown)}")
    missing = [c for c in RECIPE_CLASSES if c not in types]
    if missing and not mix:  # a mix may leave out the classes its models lack (a MoE mix has no dense FFN)
        raise TunerError(f"{source}: recipe {name} lacks tensor classes {', '.join(missing)}")
    rules = {c: _parse_rule(v, f"{source}: {name}.{c}") for c, v in types.items()}
    confidence = str(body.get("confidence", "guess" if mix else "llama-quantize"))
    if confidence not in CONFIDENCES or (mix and confidence == "llama-quantize"):
        raise TunerError(f"{source}: {what} {name}: confidence must be one of {', '.join(CONFIDENCES[1:])}, "
                         f"got {confidence!r}")
    if mix and not str(body.get("source", "")).strip():
        raise TunerError(f"{source}: mix {name} does not say where it comes from ('source')")
    return Recipe(name, str(body.get("ftype", "")), rules, " ".join(str(body.get("source", "")).split()),
                  confidence)


def _parse_recipes(data: Any, source: Path) -> tuple[dict[str, Recipe], dict[str, Recipe]]:
    """(plain recipes by upper-case quant label, uploaders' mixes by lower-case name)."""
    if not isinstance(data, dict) or not isinstance(data.get("recipes"), dict):
        raise TunerError(f"{source}: expected a 'recipes' mapping")
    recipes = {str(q).upper(): _parse_recipe(str(q), body, source, mix=False) for q, body in data["recipes"].items()}
    mixes_data = data.get("mixes") or {}
    if not isinstance(mixes_data, dict):
        raise TunerError(f"{source}: 'mixes' must be a mapping")
    mixes: dict[str, Recipe] = {}
    for name, body in mixes_data.items():
        if str(name).upper() in recipes:
            raise TunerError(f"{source}: mix {name} has the name of a llama-quantize recipe")
        mixes[str(name).lower()] = _parse_recipe(str(name), body, source, mix=True)
    return recipes, mixes


# --- cards --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CardRepo:
    """A Hub repo that carries the model's GGUFs, and how its files are named."""

    repo: str
    file: str  # "{quant}" template of a single-file quant
    split_file: str | None = None  # "{quant}", "{shard}", "{count}" template of a split quant
    splits: Mapping[str, int] = field(default_factory=dict)  # known shard counts per quant
    mtp: bool = False  # whether its GGUFs keep the MTP block
    mmproj: str | None = None
    mmproj_bytes: int = 0
    chat_template_fixed: date | None = None  # the day its uploads got the fixed chat template
    mtp_sidecar: str | None = None  # "{quant}" template of its MTP heads kept apart (mtp-<Model>-<QUANT>.gguf)
    mixes: Mapping[str, str] = field(default_factory=dict)  # quant label -> recipe or mix name its file carries
    plain: bool = False  # its files are llama-quantize's plain recipes (checked against known sizes)

    def mix_name(self, quant: str) -> str | None:
        """The recipe or mix the repo's ``quant`` file carries, if recorded (plain repos: the quant's recipe)."""
        for label, name in self.mixes.items():
            if label.lower() == quant.lower():
                return name
        return quant if self.plain else None

    def files_for(self, quant: str, file_bytes: int) -> tuple[str, ...]:
        """The expected file name(s) of ``quant``: split when known to be, or when over the Hub's file limit."""
        count = self.splits.get(quant) or (-(-file_bytes // HUB_MAX_FILE_BYTES) if self.split_file else 1)
        if count <= 1 or not self.split_file:
            return (self.file.format(quant=quant),)
        return tuple(self.split_file.format(quant=quant, shard=f"{i:05d}", count=f"{count:05d}")
                     for i in range(1, count + 1))


@dataclass(frozen=True)
class KnownSize:
    """A real file size recorded on the card, to check the recipes against."""

    repo: str
    quant: str
    file_bytes: int | None  # whole file(s), header included
    tensor_bytes: int | None  # tensor data only (llama-bench "size", rounded)
    recipe: str  # "llama-quantize" (plain recipe), "uploader" (the uploader's own mix), "mmproj"
    note: str = ""
    calibration: bool = False  # the card's header_bytes was derived from this file, so it cannot check the recipe


@dataclass(frozen=True, eq=False)
class ModelCard:
    """What the tuner knows about one model without reading any of its files."""

    key: str
    name: str
    arch: str
    aliases: tuple[str, ...]
    vocab_size: int
    tie_embeddings: bool
    mtp_layers: int
    gguf: Mapping[str, Any]  # GGUF metadata values, keys without the "<arch>." prefix
    header_bytes: int
    default_repo: str
    repos: tuple[CardRepo, ...]
    quants: tuple[str, ...]  # the ladder, best first
    quality_order: tuple[str, ...]  # quant labels, best first
    known_sizes: tuple[KnownSize, ...]
    sampling_presets: Mapping[str, Mapping[str, float]]
    default_preset: str
    reasoning_off: tuple[str, ...]
    notes: tuple[str, ...]
    recipes: Mapping[str, Recipe]
    path: str = ""
    mixes: Mapping[str, Recipe] = field(default_factory=dict)  # uploaders' mixes, by lower-case name
    official_repo: str | None = None  # the original model's Hub repo: its chat template is the current one
    chat_template_fixed: date | None = None  # the day the official chat template was fixed (every uploader's date)

    def template_fixed_on(self, repo: str | None) -> date | None:
        """The day ``repo``'s files got the fixed chat template: the repo's own date on the card, else the card's."""
        for r in self.repos:
            if repo and r.repo.lower() == repo.lower() and r.chat_template_fixed:
                return r.chat_template_fixed
        return self.chat_template_fixed

    def mtp_sources(self) -> list[str]:
        """Where this model's MTP head can be had: repos whose GGUFs keep it, and repos with sidecar heads."""
        out = [r.repo for r in self.repos if r.mtp]
        out += [f"{r.repo} ({r.mtp_sidecar.format(quant='<QUANT>')})" for r in self.repos if r.mtp_sidecar]
        return out

    def repo(self, name: str | None = None) -> CardRepo:
        want = (name or self.default_repo).lower()
        for r in self.repos:
            if r.repo.lower() == want:
                return r
        raise TunerError(f"card {self.key} lists no repo {name!r} (it lists: {', '.join(r.repo for r in self.repos)})")

    def repo_quants(self, repo: str | None = None) -> tuple[str, ...]:
        """The quants a repo offers: the card's ladder, then its own quants whose mix is recorded (``UD-Q4_K_XL``)."""
        extra = [q for q in self.repo(repo).mixes if q.upper() not in {x.upper() for x in self.quants}]
        return (*self.quants, *extra)

    def quant(self, label: str, repo: str | None = None) -> str:
        """The card's spelling of a quant label (case-insensitive) of ``repo`` (default: the card's default repo);
        TunerError listing them if unknown."""
        quants = self.repo_quants(repo)
        for q in quants:
            if q.lower() == label.strip().lower():
                return q
        raise TunerError(f"{self.key} has no quant {label!r} (known: {', '.join(quants)})")

    def recipe(self, quant: str) -> Recipe:
        """llama-quantize's plain recipe of a ladder quant."""
        q = self.quant(quant)
        found = self.recipes.get(q.upper())
        if found is None:
            raise TunerError(f"no quant recipe for {q} (recipes: {', '.join(sorted(self.recipes))})")
        return found

    def named_recipe(self, name: str) -> Recipe:
        """A plain recipe (by quant label) or an uploader's mix (by name)."""
        found = self.recipes.get(name.upper()) or self.mixes.get(name.lower())
        if found is None:
            raise TunerError(f"{self.key}: no recipe or mix named {name!r}")
        return found

    def _preset(self, preset: str | None) -> tuple[str, Mapping[str, float]]:
        name = preset or self.default_preset
        values = self.sampling_presets.get(name)
        if values is None:
            raise TunerError(f"{self.key} has no sampling preset {name!r} "
                             f"(presets: {', '.join(self.sampling_presets)})")
        return name, values

    def sampling_args(self, preset: str | None = None) -> list[str]:
        """llama-server sampling flags of a preset (default: the card's default preset)."""
        _, values = self._preset(preset)
        args: list[str] = []
        for key, value in values.items():
            row = FLAGS[key]
            args += row.to_args(int(value) if row.kind is Kind.INT else value)
        return args

    def reasoning_args(self, preset: str | None = None) -> list[str]:
        """``--reasoning off`` for presets that turn thinking off, else nothing."""
        name, _ = self._preset(preset)
        return list(REASONING_OFF_ARGS) if name in self.reasoning_off else []

    def shape_key(self) -> tuple[Any, ...]:
        """What :func:`match_card` compares (see :func:`layout_shape_key`), read from the card's GGUF values the way
        a real header is read."""
        return layout_shape_key(layout_from_metadata(card_metadata(self), ()))


def preset_args(card_key: str | None, layout: ModelLayout, preset: str | None = None) -> list[str]:
    """The sampling flags (``--temp`` …, and ``--reasoning off`` for presets without thinking) of ``preset``
    (default: the card's default) for a model: its card by key, else the card its shapes match; [] when it matches
    none and no preset was asked for."""
    card = load_card(card_key) if card_key else match_card(layout)
    if card is None:
        if preset:
            raise TunerError(f"--preset {preset} needs a model tuner has a card for, and "
                             f"{layout.name or 'this model'} matches none")
        return []
    return [*card.sampling_args(preset), *card.reasoning_args(preset)]


def layout_shape_key(layout: ModelLayout) -> tuple[Any, ...]:
    """A model's shape: arch, layers, widths, heads, experts, DeltaNet dims (and the FFN width of dense models)."""
    return (layout.arch, layout.n_layer, layout.n_embd, layout.n_head[0] if layout.n_head else 0,
            layout.n_head_kv[0] if layout.n_head_kv else 0, layout.head_k, layout.n_expert, layout.n_ff_exp,
            layout.n_ff if not layout.n_expert else 0, layout.ssm_d_inner, layout.ssm_d_state)


def _require(data: dict[str, Any], key: str, source: Path) -> Any:
    if key not in data:
        raise TunerError(f"model card {source} lacks '{key}'")
    return data[key]


def _parse_card(data: Any, source: Path, recipes: dict[str, Recipe], mixes: dict[str, Recipe]) -> ModelCard:
    if not isinstance(data, dict):
        raise TunerError(f"model card {source} is not a mapping")
    repos = []
    for r in _require(data, "repos", source) or []:
        if r.get("mmproj") and not r.get("mmproj_bytes"):  # --vision must reserve its weights
            raise TunerError(f"model card {source}: repo {r.get('repo')} names an mmproj but no mmproj_bytes")
        repos.append(CardRepo(
            repo=str(r["repo"]), file=str(r["file"]), split_file=r.get("split_file"),
            splits={str(k): int(v) for k, v in (r.get("splits") or {}).items()}, mtp=bool(r.get("mtp", False)),
            mmproj=r.get("mmproj"), mmproj_bytes=int(r.get("mmproj_bytes", 0)),
            chat_template_fixed=_date(r.get("chat_template_fixed"), f"repo {r.get('repo')}", source),
            mtp_sidecar=str(r["mtp_sidecar"]) if r.get("mtp_sidecar") else None,
            mixes={str(k): str(v) for k, v in (r.get("mixes") or {}).items()}, plain=bool(r.get("plain", False))))
    known = []
    for k in data.get("known_sizes") or []:
        gib = k.get("tensor_gib")
        known.append(KnownSize(
            repo=str(k["repo"]), quant=str(k["quant"]),
            file_bytes=int(k["file_bytes"]) if k.get("file_bytes") is not None else None,
            tensor_bytes=round(float(gib) * GiB) if gib is not None else None,
            recipe=str(k.get("recipe", "uploader")), note=str(k.get("note", "")),
            calibration=bool(k.get("calibration", False))))
    presets = {str(n): {str(k): float(v) for k, v in vals.items()}
               for n, vals in (_require(data, "sampling_presets", source) or {}).items()}
    for name, vals in presets.items():
        unknown = [k for k in vals if k not in SAMPLING_KEYS]
        if unknown:
            raise TunerError(f"model card {source}: preset {name} has unknown keys {', '.join(unknown)}")
    card = ModelCard(
        key=str(_require(data, "key", source)).lower(),
        name=str(_require(data, "name", source)),
        arch=str(_require(data, "arch", source)),
        aliases=tuple(str(a).lower() for a in data.get("aliases") or ()),
        vocab_size=int(_require(data, "vocab_size", source)),
        tie_embeddings=bool(data.get("tie_embeddings", False)),
        mtp_layers=int(data.get("mtp_layers", 0)),
        gguf=dict(_require(data, "gguf", source)),
        header_bytes=int(data.get("header_bytes", 0)),
        default_repo=str(_require(data, "default_repo", source)),
        repos=tuple(repos),
        quants=tuple(str(q) for q in _require(data, "quants", source)),
        quality_order=tuple(str(q) for q in data.get("quality_order") or data["quants"]),
        known_sizes=tuple(known),
        sampling_presets=presets,
        default_preset=str(_require(data, "default_preset", source)),
        reasoning_off=tuple(str(p) for p in data.get("reasoning_off") or ()),
        notes=tuple(str(n) for n in data.get("notes") or ()),
        recipes=recipes,
        path=str(source),
        mixes=mixes,
        official_repo=_official_repo(data.get("official_repo"), source),
        chat_template_fixed=_date(data.get("chat_template_fixed"), "the card", source),
    )
    card.repo()  # the default repo must be listed
    card._preset(None)
    for q in card.quants:
        if q.upper() not in recipes:
            raise TunerError(f"model card {source}: no recipe for quant {q}")
    for r in card.repos:
        for label, name in r.mixes.items():
            if name.upper() not in recipes and name.lower() not in mixes:
                raise TunerError(f"model card {source}: repo {r.repo} maps {label} to {name!r}, which is neither "
                                 "a recipe nor a mix in " + RECIPES_FILE)
    return card


def _date(value: Any, what: str, source: Path) -> date | None:
    """An ISO date from a card (``"2026-02-27"``, or YAML's unquoted date); TunerError for anything else."""
    if value is None or value == "":
        return None
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise TunerError(f"model card {source}: {what}'s chat_template_fixed {value!r} is not a date (YYYY-MM-DD)") \
            from None


def _official_repo(value: Any, source: Path) -> str | None:
    if value is None:
        return None
    try:
        return check_repo_id(value, what="official_repo")
    except TunerError as exc:
        raise TunerError(f"model card {source}: {exc}") from None


def _cards_dir() -> Path:
    return catalog_dir() / CARDS_SUBDIR


_CACHE: dict[tuple[Any, ...], tuple[ModelCard, ...]] = {}
_LAYOUTS: dict[tuple[str, str, str, bool], ModelLayout] = {}  # (card path, key, recipe name, mtp): built once


def _load_all() -> tuple[ModelCard, ...]:
    folder = _cards_dir()
    if not folder.is_dir():
        raise TunerError(f"no model cards: {folder} is not a folder",
                         hint=f"{CATALOG_ENV} must name the folder holding models/")
    files = sorted(p for p in folder.glob("*.yaml") if not p.name.startswith("_"))
    recipes_path = folder / RECIPES_FILE
    stamp = (str(folder), *((p.name, p.stat().st_mtime_ns) for p in [*files, recipes_path] if p.exists()))
    cached = _CACHE.get(stamp)
    if cached is not None:
        return cached
    try:
        recipes, mixes = _parse_recipes(load_yaml(recipes_path), recipes_path)
        cards = tuple(_parse_card(load_yaml(p), p, recipes, mixes) for p in files)
    except FileNotFoundError as error:
        raise TunerError(f"cannot read {error.filename}") from None
    except yaml.YAMLError as error:
        raise TunerError(f"model cards: bad YAML ({' '.join(str(error).split())})") from None
    except (KeyError, TypeError, ValueError) as error:
        raise TunerError(f"model cards in {folder}: malformed entry ({error!r})") from None
    _CACHE.clear()
    _LAYOUTS.clear()  # layouts of the cards this reload replaces
    _CACHE[stamp] = cards
    return cards


def list_cards() -> list[ModelCard]:
    """Every built-in card, the default (Qwen3.5-35B-A3B) first."""
    cards = sorted(_load_all(), key=lambda c: c.key)
    return sorted(cards, key=lambda c: c.key != DEFAULT_CARD)


def find_card(key: str) -> ModelCard | None:
    want = key.strip().lower()
    for card in _load_all():
        if want == card.key or want in card.aliases or want == card.name.lower():
            return card
    return None


def load_card(key: str) -> ModelCard:
    """A card by key, alias or model name, case-insensitive (``qwen3.5-35b-a3b``, ``Qwen3.5-35B-A3B``)."""
    card = find_card(key)
    if card is None:
        raise TunerError(f"no model card {key!r} (cards: {', '.join(c.key for c in list_cards())})")
    return card


# --- layouts from cards -------------------------------------------------------------------------------------------

def card_metadata(card: ModelCard, *, mtp: bool = False) -> dict[str, Any]:
    """GGUF metadata the card stands for (what a converted file's header would say, tokenizer aside)."""
    meta: dict[str, Any] = {"general.architecture": card.arch, "general.name": card.name}
    meta.update({f"{card.arch}.{k}": v for k, v in card.gguf.items()})
    if mtp and card.mtp_layers:
        meta[f"{card.arch}.block_count"] = int(card.gguf["block_count"]) + card.mtp_layers
        meta[f"{card.arch}.nextn_predict_layers"] = card.mtp_layers
    return meta


def recipe_tensors(card: ModelCard, recipe: Recipe, *,
                   mtp: bool = False) -> list[tuple[str, GgmlType, tuple[int, ...], int]]:
    """(name, ggml type, shape, bytes) of every tensor of the card's model quantized with ``recipe``."""
    if mtp and card.mtp_layers != 1:
        raise TunerError(f"{card.key}: only one MTP layer is supported, the card says {card.mtp_layers}")
    meta = card_metadata(card, mtp=mtp)
    n_layer_all = int(meta[f"{card.arch}.block_count"])
    out = []
    for name, shape, _role in tensor_shapes(meta, card.vocab_size, tied_embeddings=card.tie_embeddings):
        m = _BLOCK_RE.match(name)
        layer = int(m.group(1)) if m else None
        tname = recipe.type_name(recipe_class(name), layer, n_layer_all)
        t = ggml_type(tname)
        if shape and shape[0] % t.block_size:
            t = ggml_type(_FALLBACK_TYPES.get(t.name, "f16"))
            if shape[0] % t.block_size:
                t = ggml_type("f16")
        out.append((name, t, tuple(shape), tensor_bytes(t, shape)))
    return out


def recipe_layout(card: ModelCard, recipe: Recipe | str, *, mtp: bool = False, label: str | None = None
                  ) -> ModelLayout:
    """The full layout of the card's model quantized with ``recipe`` (a :class:`Recipe`, or a recipe or mix name),
    built without any file; ``file_bytes`` is tensor data plus the card's typical header. ``label`` names it in
    ``source`` (``card:QUANT``; default the recipe's name)."""
    rec = card.named_recipe(recipe) if isinstance(recipe, str) else recipe
    cache_key = (card.path, card.key, rec.name, mtp)
    found = _LAYOUTS.get(cache_key)
    if found is None:
        tensors = recipe_tensors(card, rec, mtp=mtp)
        data_bytes = sum(t[3] for t in tensors)
        found = layout_from_metadata(card_metadata(card, mtp=mtp), tensors, file_bytes=data_bytes + card.header_bytes,
                                     source=f"{card.key}:{rec.name}")
        _LAYOUTS[cache_key] = found
    want = f"{card.key}:{label or rec.name}"
    return found if found.source == want else replace(found, source=want)


@dataclass(frozen=True)
class MixChoice:
    """The tensor mix a plan of ``repo``'s ``quant`` is sized with: the repo's own (``recorded``), or the largest
    known file of that quant; ``note`` says what a plan must tell about it (None when nothing)."""

    recipe: Recipe
    repo: str
    quant: str
    recorded: bool
    note: str | None = None


def quant_mix(card: ModelCard, quant: str, repo: str | None = None) -> MixChoice:
    """The mix of ``repo``'s ``quant`` file (default repo when None): the recorded one; else, never a smaller
    file than one known, the largest among the other repos' recorded mixes of that quant and llama-quantize's own
    recipe of it, with a note saying so."""
    card_repo = card.repo(repo)
    q = card.quant(quant, card_repo.repo)
    name = card_repo.mix_name(q)
    if name is not None:
        rec = card.named_recipe(name)
        note = (f"{card_repo.repo} {q}: tensor types assumed from the file's size alone ({rec.name} in "
                f"{RECIPES_FILE})" if rec.confidence == "guess" else None)
        return MixChoice(rec, card_repo.repo, q, True, note)
    options: list[tuple[int, str, Recipe]] = []
    for other in card.repos:
        other_name = other.mix_name(q) if other is not card_repo else None
        if other_name is not None:
            rec = card.named_recipe(other_name)
            options.append((_data_bytes(card, rec), f"{other.repo}'s", rec))
    if q.upper() in card.recipes:
        rec = card.recipes[q.upper()]
        options.append((_data_bytes(card, rec), "llama-quantize's own recipe", rec))
    if not options:
        raise TunerError(f"{card.key}: no tensor mix known for {card_repo.repo} {q}")
    size, what, rec = max(options, key=lambda o: o[0])
    note = (f"{card_repo.repo} {q}: its tensor mix is not recorded, so the plan is sized as the largest {q} known "
            f"({what}, {fmt_bytes(size + card.header_bytes)})")
    return MixChoice(rec, card_repo.repo, q, False, note)


def _data_bytes(card: ModelCard, recipe: Recipe) -> int:
    return sum(t.nbytes for t in recipe_layout(card, recipe).tensors)


def card_layout(card: ModelCard, quant: str, *, mtp: bool | None = None, repo: str | None = None) -> ModelLayout:
    """The full layout of ``repo``'s (default: the card's default repo's) ``quant`` file, built without any file:
    the tensor mix :func:`quant_mix` picks. ``mtp`` None: as the repo ships it. ``file_bytes`` is tensor data plus
    the card's typical header."""
    card_repo = card.repo(repo)
    choice = quant_mix(card, quant, card_repo.repo)
    return recipe_layout(card, choice.recipe, mtp=card_repo.mtp if mtp is None else mtp, label=choice.quant)


def card_candidates(card: ModelCard, repo: str | None = None) -> list[QuantCandidate]:
    """A repo's ladder (default: the card's default repo) as planner candidates (source "card"), best quality
    first, each sized with its file's tensor mix (:func:`quant_mix`; its note, if any, in ``notes``)."""
    card_repo = card.repo(repo)
    out = []
    for q in card.repo_quants(card_repo.repo):
        choice = quant_mix(card, q, card_repo.repo)
        layout = recipe_layout(card, choice.recipe, mtp=card_repo.mtp, label=q)
        out.append(QuantCandidate(
            quant=q, layout=layout, files=card_repo.files_for(q, layout.file_bytes), file_bytes=layout.file_bytes,
            source="card", repo=card_repo.repo, revision=None, mmproj=card_repo.mmproj,
            mmproj_bytes=card_repo.mmproj_bytes if card_repo.mmproj else 0, card_key=card.key,
            notes=(choice.note,) if choice.note else ()))
    return rank_by_quality(out, card)


def match_card(layout: ModelLayout) -> ModelCard | None:
    """The card whose shapes the layout has (arch, layers, widths, heads, experts, DeltaNet dims), or None.
    Several cards with one shape (Qwen3.5 / Qwen3.6 35B-A3B) are told apart by the model's name."""
    key = layout_shape_key(layout)
    matches = [c for c in list_cards() if c.shape_key() == key]
    if not matches:
        return None
    name = _squash(layout.name)
    for card in sorted(matches, key=lambda c: -len(c.name)):
        if _squash(card.name) in name or any(_squash(a) in name for a in card.aliases):
            return card
    return matches[0]


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9.]", "", text.lower())


# --- quality ------------------------------------------------------------------------------------------------------

def rank_by_quality(candidates: Sequence[QuantCandidate], card: ModelCard | None) -> list[QuantCandidate]:
    """Candidates best first, each with ``quality_rank`` set (higher = better).

    Order by bits per weight, then put the labels the card's ``quality_order`` knows in its order (within the
    positions they already hold), so measured exceptions (Q4_K_M above the larger UD-Q4_K_XL) win over size."""
    ordered = sorted(candidates, key=lambda c: (-c.bits_per_weight, c.quant))
    if card is not None:
        known = {q.lower(): i for i, q in enumerate(card.quality_order)}
        slots = [i for i, c in enumerate(ordered) if c.quant.lower() in known]
        listed = sorted((ordered[i] for i in slots), key=lambda c: known[c.quant.lower()])
        for slot, cand in zip(slots, listed, strict=True):
            ordered[slot] = cand
    n = len(ordered)
    return [replace(c, quality_rank=n - i) for i, c in enumerate(ordered)]


def known_size_rows(card: ModelCard) -> list[dict[str, Any]]:
    """Each known real size beside what the card plans for that file: llama-quantize's recipe for a plain row,
    the repo's file mix (:func:`quant_mix`) for an uploader's; ``mix``, ``recorded`` and ``confidence`` say which.
    A ``calibration`` row is the file the card's ``header_bytes`` was taken from: it agrees by construction. Rows
    whose quant the repo does not offer (not in the ladder, no mix recorded) are left out."""
    rows = []
    for k in card.known_sizes:
        if k.recipe == "mmproj" or not _has_repo(card, k.repo):
            continue
        if k.recipe == "llama-quantize":
            if k.quant.upper() not in card.recipes:
                continue
            choice = MixChoice(card.recipes[k.quant.upper()], k.repo, k.quant, True)
        else:
            try:
                choice = quant_mix(card, k.quant, k.repo)
            except TunerError:
                continue
        layout = recipe_layout(card, choice.recipe, mtp=card.repo(k.repo).mtp)
        data = sum(t.nbytes for t in layout.tensors)
        real = k.file_bytes if k.file_bytes is not None else k.tensor_bytes
        computed = layout.file_bytes if k.file_bytes is not None else data
        rows.append({"repo": k.repo, "quant": k.quant, "recipe": k.recipe, "real_bytes": real,
                     "computed_bytes": computed, "what": "file" if k.file_bytes is not None else "tensor data",
                     "error": (computed - real) / real if real else 0.0, "note": k.note,
                     "calibration": k.calibration, "mix": choice.recipe.name, "recorded": choice.recorded,
                     "confidence": choice.recipe.confidence})
    return rows


def _has_repo(card: ModelCard, repo: str) -> bool:
    return any(r.repo.lower() == repo.lower() for r in card.repos)


def iter_recipe_types(card: ModelCard, quant: str, *, mtp: bool = False, repo: str | None = None,
                      recipe: str | None = None) -> Iterable[tuple[str, str, str]]:
    """(tensor name, recipe class, ggml type name) for every tensor of a card's quant, spelled out: the mix of
    ``repo``'s file (as :func:`card_layout` plans it), or the named ``recipe`` or mix."""
    rec = card.named_recipe(recipe) if recipe else quant_mix(card, quant, repo).recipe
    for name, t, _shape, _nbytes in recipe_tensors(card, rec, mtp=mtp):
        yield name, recipe_class(name), t.name
